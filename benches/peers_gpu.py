#!/usr/bin/env python3
"""Score-CAM peers on one GPU, for the side-by-side comparison with scorecam-gpu.

VGG16 (torchvision, random weights, fixed seed), 224x224 random images, target layer
features.29 (512 channels), target class = top-1.  Reports ms/image (CUDA-synchronized,
warm-up first, then the median over several images) for:

  tuned     PyTorch eager, FP16, channels_last, official Score-CAM semantics
            (haofanwang/Score-CAM): base forward, bilinear upsample (align_corners=False)
            of all channels, flat channels skipped, min-max masks, masked inputs in batches
            of --mask-batch (256), softmax, score of class c, combine, ReLU, min-max.
  compiled  the same with the masked forward under torch.compile (only with --compile).
  bound     torch.compile(mode="max-autotune") FP16 channels_last VGG16 forward at the mask
            batch, throughput only (only with --compile-bound): ms per forward x (channels + 1)
            passes per image, a lower bound of any Score-CAM built on that forward; the eager
            forward is timed the same way beside it.  Runs last; a compile error or
            --compile-timeout is recorded under "compile_bound" instead of ending the run.
  gradcam   pytorch-grad-cam 1.5.7 ScoreCAM as a user runs it: FP32, its default batch of
            16 masked inputs, targets=None (top-1).  Slow: only --gradcam-images images.
            Skipped with a message when pytorch_grad_cam is not importable.

--engine-json FILE takes the JSON of `scorecam-gpu bench --json` (top-level "ms_per_image":
{"1": ms, "8": ms, ...} and "device") and prints engine vs peers with ratios.
A JSON summary goes to stdout last (and to --json-out FILE if given; that file is rewritten
after every peer, so a run killed part-way still leaves what it measured).

On the GPU host (no package index) install the wheels from .whl/ first, see benches/README.md:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 benches/peers_gpu.py --engine-json engine.json
CPU smoke test of the logic (tiny sizes):
    python3 benches/peers_gpu.py --device cpu --channels 8 --size 64 --images 2 --gradcam-images 1
    python3 benches/peers_gpu.py --device cpu --channels 8 --size 64 --skip-tuned --skip-gradcam \
        --compile-bound default --mask-batch 4 --bound-iters 2
The torch.compile bound alone (benches/gpu_check.sh runs it as its own last step):
    python3 benches/peers_gpu.py --skip-tuned --skip-gradcam --compile-bound --compile-timeout 300 \
        --json-out peers_compile.json
"""

import argparse
import json
import os
import signal
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam draws tqdm bars per batch

import torch
import torch.nn.functional as F
import torchvision

# --------------------------------------------------------------------------- pytorch-grad-cam import
# pytorch_grad_cam/__init__.py imports every CAM, so importing it needs cv2, matplotlib, scipy,
# sklearn and tqdm even though ScoreCAM only calls tqdm.tqdm and cv2.resize.  The GPU host has
# none of them and no package index, and their wheels are too big to carry (~150 MB).  So for
# the modules that are missing (only those), stub modules are put in place: tqdm.tqdm is the
# identity, cv2.resize is the same bilinear (half-pixel centres, edge clamp, no antialias, as
# cv2.INTER_LINEAR) done with torch, everything else raises if it is ever called.  Those stubs
# do not change what ScoreCAM computes (checked against the real cv2 to ~2e-7).
SHIM_ROOTS = ("cv2", "tqdm", "matplotlib", "scipy", "sklearn")


class _Placeholder:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, a):
        if a.startswith("__"):
            raise AttributeError(a)
        return _Placeholder(self._name + "." + a)

    def __call__(self, *a, **k):
        raise RuntimeError("%s is a stub: the module is not installed here" % self._name)


def _cv2_resize(img, dsize, dst=None, fx=None, fy=None, interpolation=1):
    import numpy as np
    if interpolation != 1:
        raise RuntimeError("cv2 stub: only INTER_LINEAR is implemented")
    a = np.asarray(img, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(a))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    w, h = int(dsize[0]), int(dsize[1])
    r = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0]
    r = r[0] if a.ndim == 2 else r.permute(1, 2, 0)
    return r.contiguous().numpy()


class _StubFinder:
    """importlib meta-path finder + loader that makes stub packages for the given roots."""

    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        import importlib.util
        if fullname.split(".")[0] in self.roots:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        import types

        class _Stub(types.ModuleType):
            def __getattr__(self, a):
                if a.startswith("__"):
                    raise AttributeError(a)
                return _Placeholder(self.__name__ + "." + a)

        return _Stub(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        module.__scorecam_stub__ = True
        if module.__name__ == "tqdm":
            module.tqdm = lambda iterable=None, *a, **k: iterable
        elif module.__name__ == "cv2":
            module.INTER_LINEAR = 1
            module.resize = _cv2_resize


def install_gradcam_shims(force=False):
    """Stub the import-only dependencies of pytorch_grad_cam that are missing (all of them with
    force=True, for testing).  Returns the stubbed root names."""
    import importlib.util
    roots = [r for r in SHIM_ROOTS if force or importlib.util.find_spec(r) is None]
    if roots:
        for name in list(sys.modules):
            if name.split(".")[0] in roots or name.startswith("pytorch_grad_cam"):
                del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder(roots))
    return roots


def import_gradcam(shims="auto"):
    """-> (ScoreCAM class or None, error text or None, list of stubbed modules)."""
    stubbed = []
    if shims == "force":
        stubbed = install_gradcam_shims(force=True)
    for attempt in range(2):
        try:
            from pytorch_grad_cam import ScoreCAM
            return ScoreCAM, None, stubbed
        except ImportError as e:  # a missing dependency of the package, or the package itself
            missing = (getattr(e, "name", None) or "").split(".")[0]
            if attempt == 0 and shims == "auto" and missing in SHIM_ROOTS:
                stubbed = install_gradcam_shims()
                continue
            return None, "%s: %s" % (type(e).__name__, e), stubbed
        except Exception as e:  # a broken install
            return None, "%s: %s" % (type(e).__name__, e), stubbed
    return None, "unreachable", stubbed

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TARGET_RELU = 29  # torchvision vgg16 features.29 = ReLU after conv5_3


# --------------------------------------------------------------------------- helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    imgs = []
    for _ in range(n):
        u8 = torch.randint(0, 256, (1, 3, size, size), generator=g).float() / 255.0
        imgs.append((u8 - MEAN) / STD)
    return imgs


def build_vgg16(seed):
    torch.manual_seed(seed)
    return torchvision.models.vgg16(weights=None).eval()


class TunedScoreCAM:
    """Official Score-CAM semantics, written for speed in plain PyTorch.

    The base forward is split at the target layer so no hooks are needed.  The combine uses
    linearity of bilinear upsampling: sum_k s_k up(A_k) == up(sum_k s_k A_k)."""

    def __init__(self, model, device, dtype, mask_batch, channels=None, compile_mode=None,
                 relu_idx=TARGET_RELU, channels_last=None):
        self.device, self.dtype, self.mask_batch = device, dtype, mask_batch
        self.cl = (device.type == "cuda") if channels_last is None else channels_last
        self.channels = channels
        m = model.to(device=device, dtype=dtype)
        if self.cl:
            m = m.to(memory_format=torch.channels_last)
        self.model = m
        self.head_in = m.features[: relu_idx + 1]
        self.tail = torch.nn.Sequential(m.features[relu_idx + 1:], m.avgpool, torch.nn.Flatten(1), m.classifier)
        self.masked_forward = m
        if compile_mode:
            self.masked_forward = torch.compile(m, mode=compile_mode, dynamic=False)

    def _cl(self, t):
        return t.contiguous(memory_format=torch.channels_last) if self.cl else t

    @torch.inference_mode()
    def __call__(self, x, class_idx=None):
        x = self._cl(x.to(device=self.device, dtype=self.dtype))
        S = x.shape[-1]
        a = self.head_in(x)                      # [1,K,h,w]
        logits = self.tail(a)
        c = int(logits.argmax(1)) if class_idx is None else class_idx
        if self.channels is not None:
            a = a[:, : self.channels]
        k = a.shape[1]
        # plain [K,S,S] layout (a is channels_last on the GPU): masks[i:j] are then contiguous
        up = F.interpolate(a.contiguous(), size=(S, S), mode="bilinear", align_corners=False)[0]
        flat = up.view(k, -1)
        mn = flat.amin(1)
        mx = flat.amax(1)
        rng = mx - mn
        keep = rng > 0                            # official: skip channels with max == min
        inv = torch.where(keep, 1.0 / rng.float(), torch.zeros_like(rng, dtype=torch.float32)).to(self.dtype)
        masks = (up - mn[:, None, None]) * inv[:, None, None]                          # [K,S,S]
        scores = torch.empty(k, device=self.device, dtype=torch.float32)
        for i in range(0, k, self.mask_batch):
            mb = masks[i: i + self.mask_batch]
            if self.cl:  # build NHWC directly: [1,S,S,3] * [B,S,S,1]
                inp = (x.permute(0, 2, 3, 1) * mb[..., None]).permute(0, 3, 1, 2)   # channels_last view
            else:
                inp = x * mb[:, None]                                                # [B,3,S,S]
            out = self.masked_forward(inp)
            scores[i: i + mb.shape[0]] = torch.softmax(out.float(), dim=1)[:, c]
        scores = torch.where(keep, scores, torch.zeros_like(scores))
        low = torch.einsum("k,khw->hw", scores, a[0].float())                          # sum s_k A_k
        cam = F.interpolate(low[None, None], size=(S, S), mode="bilinear", align_corners=False)[0, 0]
        cam = F.relu(cam)
        lo, hi = cam.min(), cam.max()
        cam = torch.where(hi > lo, (cam - lo) / (hi - lo), torch.zeros_like(cam))
        return cam, c, scores


def time_per_image(fn, images, warmup, device):
    for i in range(warmup):
        fn(images[i % len(images)])
    sync(device)
    times = []
    for img in images:
        sync(device)
        t0 = time.perf_counter()
        fn(img)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def load_engine(path):
    with open(path) as f:
        j = json.load(f)
    ms = j.get("ms_per_image") if isinstance(j, dict) else None
    if not isinstance(ms, dict):
        raise ValueError("%s: no top-level \"ms_per_image\" object" % path)
    out = {}
    for k, v in ms.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            pass
    return out, j.get("device", "?")


def print_table(rows, engine_best):
    w = max(len(r[0]) for r in rows) + 2
    print("\n%-*s %12s %14s" % (w, "system", "ms/image", "vs engine best"))
    for name, ms in rows:
        ratio = ("%.2fx" % (ms / engine_best)) if engine_best else "-"
        print("%-*s %12.2f %14s" % (w, name, ms, ratio))
    print("(ratio = system ms / engine's best ms: >1 means the engine is that many times faster)\n")


# --------------------------------------------------------------------------- torch.compile bound

class CompileTimeout(BaseException):
    """Raised by SIGALRM: a BaseException so that no `except Exception` inside torch swallows it."""


def _on_alarm(signum, frame):
    raise CompileTimeout()


def _time_forward(fn, x, iters, device, mark_step=False):
    """ms per call of fn(x), averaged over iters back-to-back calls (one sync at the end)."""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None) if mark_step else None
    with torch.no_grad():
        for _ in range(3):
            if mark:
                mark()
            fn(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            if mark:
                mark()
            fn(x)
        sync(device)
    return (time.perf_counter() - t0) * 1e3 / iters


def forward_bound(args, device, dtype, channels, mode):
    """The masked-forward bound: VGG16 (FP16, channels_last on the GPU) forward at batch
    --mask-batch, eager and under torch.compile(mode=MODE, dynamic=False); ms/image =
    ms per forward / batch x (channels + 1).  Never raises: failures land in "error"."""
    b, passes = args.mask_batch, channels + 1
    cl = device.type == "cuda"
    res = {"key": "torch_compile_%s_forward_bound" % mode, "mode": mode, "batch": b,
           "passes_per_image": passes, "dtype": str(dtype).replace("torch.", ""), "channels_last": cl,
           "size": args.size, "iters": args.bound_iters}
    try:
        model = build_vgg16(args.seed).to(device=device, dtype=dtype)
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(b, 3, args.size, args.size, generator=g).to(device=device, dtype=dtype)
        if cl:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        ms = _time_forward(model, x, args.bound_iters, device)
        res["eager_forward_ms_per_batch"] = ms
        res["eager_ms_per_image_bound"] = ms / b * passes
        print("eager forward, batch %d: %.3f ms (%.0f img/s) -> %.2f ms/image for %d passes"
              % (b, ms, b / ms * 1e3, res["eager_ms_per_image_bound"], passes), flush=True)
    except Exception as e:
        res["error"] = "eager forward: %s: %s" % (type(e).__name__, str(e)[-1500:])
        return res
    timeout = int(args.compile_timeout or 0)
    old = None
    if timeout > 0 and hasattr(signal, "SIGALRM"):
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(timeout)
    t0 = time.perf_counter()
    try:
        cm = torch.compile(model, mode=mode, dynamic=False)
        with torch.no_grad():
            cm(x)
        sync(device)
        res["compile_s"] = time.perf_counter() - t0
        print("torch.compile(mode=%r): first call %.1f s" % (mode, res["compile_s"]), flush=True)
        ms = _time_forward(cm, x, args.bound_iters, device, mark_step=True)
        res["forward_ms_per_batch"] = ms
        res["images_per_s"] = b / ms * 1e3
        res["ms_per_image_bound"] = ms / b * passes
        res["speedup_vs_eager"] = res["eager_forward_ms_per_batch"] / ms
        print("compiled forward, batch %d: %.3f ms (%.0f img/s) -> %.2f ms/image for %d passes"
              % (b, ms, res["images_per_s"], res["ms_per_image_bound"], passes), flush=True)
    except CompileTimeout:
        res["error"] = "timed out after %d s (--compile-timeout), %s" % (
            timeout, "while timing" if "compile_s" in res else "while compiling")
        res["timed_out"] = True
    except Exception as e:
        res["error"] = "%s: %s" % (type(e).__name__, str(e)[-1500:])
    finally:
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    if "error" in res:
        print("torch.compile bound: %s" % res["error"], flush=True)
    return res


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default=None,
                    help="tuned peer precision (default fp16 on cuda, fp32 on cpu)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=None,
                    help="use only the first N channels of features.29 (smoke tests); default all 512")
    ap.add_argument("--images", type=int, default=5, help="timed images for the tuned peer")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mask-batch", type=int, default=256)
    ap.add_argument("--gradcam-images", type=int, default=2, help="timed images for pytorch-grad-cam (slow)")
    ap.add_argument("--skip-gradcam", action="store_true")
    ap.add_argument("--gradcam-shims", choices=["auto", "off", "force"], default="auto",
                    help="stub pytorch_grad_cam's import-only deps (cv2, matplotlib, scipy, sklearn, "
                         "tqdm) when missing (auto), never (off), or always (force, for testing)")
    ap.add_argument("--compile", nargs="?", const="max-autotune", default=None, metavar="MODE",
                    help="also time the tuned peer with torch.compile (default mode max-autotune; "
                         "compilation takes minutes)")
    ap.add_argument("--compile-bound", nargs="?", const="max-autotune", default=None, metavar="MODE",
                    help="last, time the VGG16 forward at --mask-batch under torch.compile (default mode "
                         "max-autotune) and report ms per (channels + 1) forwards as a lower bound")
    ap.add_argument("--compile-timeout", type=float, default=0,
                    help="give up the --compile-bound compile+timing after this many seconds (0: never)")
    ap.add_argument("--bound-iters", type=int, default=20, help="timed forwards for --compile-bound")
    ap.add_argument("--skip-tuned", action="store_true",
                    help="skip the tuned eager Score-CAM (and its check), e.g. for a --compile-bound-only run")
    ap.add_argument("--no-check", action="store_true", help="skip the fp16-vs-fp32 agreement check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-json", default=None, help="JSON from `scorecam-gpu bench --json`")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available (use --device cpu for a smoke test)")
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = "cpu"
    K = args.channels or 512

    summary = {
        "device": dev_name, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "size": args.size, "channels": K, "mask_batch": args.mask_batch,
        "tuned_dtype": str(dtype).replace("torch.", ""), "ms_per_image": {}, "runs_ms": {}, "notes": [],
    }
    images = make_images(max(args.images, args.gradcam_images, 1), args.size, args.seed)

    def save():
        if args.json_out:
            tmp = args.json_out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(tmp, args.json_out)

    save()
    # (a) tuned eager
    tuned = None
    if args.skip_tuned:
        summary["notes"].append("tuned eager Score-CAM skipped (--skip-tuned)")
    else:
        tuned = TunedScoreCAM(build_vgg16(args.seed), device, dtype, args.mask_batch, args.channels)
        med, runs = time_per_image(tuned, images[: args.images], args.warmup, device)
        summary["ms_per_image"]["pytorch_tuned_eager"] = med
        summary["runs_ms"]["pytorch_tuned_eager"] = runs
        print("tuned eager (%s, mask batch %d): %.2f ms/image" % (summary["tuned_dtype"], args.mask_batch, med), flush=True)
        save()

    if tuned is not None and not args.no_check:
        ref = TunedScoreCAM(build_vgg16(args.seed), device, torch.float32, args.mask_batch, args.channels)
        cam_a, c_a, _ = tuned(images[0])
        cam_r, c_r, _ = ref(images[0])
        diff = float((cam_a.float() - cam_r).abs().max())
        summary["check_vs_fp32"] = {"max_abs_map_diff": diff, "same_class": c_a == c_r}
        print("check: tuned %s vs fp32 map max |diff| %.4g, same class %s" % (summary["tuned_dtype"], diff, c_a == c_r))
        del ref
        save()
    del tuned

    # (c) torch.compile
    if args.compile:
        try:
            comp = TunedScoreCAM(build_vgg16(args.seed), device, dtype, args.mask_batch, args.channels,
                                 compile_mode=args.compile)
            t0 = time.perf_counter()
            comp(images[0])
            sync(device)
            summary["compile_first_call_s"] = time.perf_counter() - t0
            med, runs = time_per_image(comp, images[: args.images], args.warmup, device)
            key = "pytorch_tuned_compile_%s" % args.compile
            summary["ms_per_image"][key] = med
            summary["runs_ms"][key] = runs
            print("tuned compiled (%s): %.2f ms/image (first call %.1f s)" % (args.compile, med, summary["compile_first_call_s"]), flush=True)
            del comp
        except Exception as e:
            msg = "tuned Score-CAM under torch.compile(%s) failed: %s: %s" % (args.compile, type(e).__name__, str(e)[-1000:])
            print(msg, flush=True)
            summary["notes"].append(msg)
        save()

    # (b) pytorch-grad-cam
    GradCamScoreCAM = None
    if args.skip_gradcam:
        summary["notes"].append("pytorch-grad-cam skipped (--skip-gradcam)")
    else:
        GradCamScoreCAM, err, stubbed = import_gradcam(args.gradcam_shims)
        summary["gradcam_stubbed_modules"] = stubbed
        if stubbed:
            print("pytorch-grad-cam: stubbed missing import-only modules %s" % ", ".join(stubbed))
        if GradCamScoreCAM is None:
            msg = "pytorch-grad-cam not importable (%s): skipped; install the wheels in .whl/ (benches/README.md)" % err
            print(msg)
            summary["notes"].append(msg)
    if GradCamScoreCAM is not None:
        model32 = build_vgg16(args.seed).to(device)
        reshape = None
        if args.channels:
            n = args.channels
            reshape = lambda t: t[:, :n]  # noqa: E731 (smoke tests: fewer channels)
        cam = GradCamScoreCAM(model=model32, target_layers=[model32.features[TARGET_RELU]], reshape_transform=reshape)

        def run_gc(img):
            return cam(input_tensor=img.to(device), targets=None)

        try:
            med, runs = time_per_image(run_gc, images[: args.gradcam_images], 1, device)
            summary["ms_per_image"]["pytorch_grad_cam_1.5.7"] = med
            summary["runs_ms"]["pytorch_grad_cam_1.5.7"] = runs
            summary["gradcam_batch_size"] = getattr(cam, "batch_size", 16)
            print("pytorch-grad-cam ScoreCAM (fp32, batch 16): %.2f ms/image" % med, flush=True)
        except Exception as e:  # keep what the other peers measured
            msg = "pytorch-grad-cam ScoreCAM failed: %s: %s" % (type(e).__name__, str(e)[-1000:])
            print(msg, flush=True)
            summary["notes"].append(msg)
        cam.activations_and_grads.release()
        del cam, model32
        save()

    # (d) torch.compile forward bound: last, it is slow (max-autotune: minutes)
    if args.compile_bound:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        summary["compile_bound"] = {"mode": args.compile_bound, "error": "started, did not finish (killed?)"}
        save()
        cb = forward_bound(args, device, dtype, K, args.compile_bound)
        summary["compile_bound"] = cb
        if "ms_per_image_bound" in cb:
            summary["ms_per_image"][cb["key"]] = cb["ms_per_image_bound"]
        save()

    # engine comparison
    eng = None
    if args.engine_json:
        try:
            eng, eng_dev = load_engine(args.engine_json)
        except (OSError, ValueError) as e:
            msg = "engine JSON not usable, no ratios: %s: %s" % (type(e).__name__, e)
            print(msg)
            summary["notes"].append(msg)
    if eng is not None:
        summary["engine"] = {"device": eng_dev, "ms_per_image": eng}
        if eng_dev != "?" and dev_name not in str(eng_dev) and str(eng_dev) not in dev_name:
            note = "engine device %r differs from peers' device %r: ratios are not like for like" % (eng_dev, dev_name)
            print("WARNING: " + note)
            summary["notes"].append(note)
        rows = [("scorecam-gpu batch %s" % b, ms) for b, ms in sorted(eng.items(), key=lambda kv: _num(kv[0]))]
        rows += [(k, v) for k, v in summary["ms_per_image"].items()]
        best = min(eng.values()) if eng else None
        if not rows:
            rows = [("(nothing measured)", float("nan"))]
        print_table(rows, best)
        summary["ratio_vs_engine_best"] = {k: (v / best if best else None) for k, v in summary["ms_per_image"].items()}

    print(json.dumps(summary, indent=1))
    save()
    if summary.get("compile_bound", {}).get("timed_out"):
        # a compile cut short may leave worker processes that would hold up the exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return summary


def _num(s):
    try:
        return float(s)
    except ValueError:
        return float("inf")


if __name__ == "__main__":
    main()
