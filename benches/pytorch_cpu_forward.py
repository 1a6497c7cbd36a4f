#!/usr/bin/env python3
"""PyTorch CPU forward-pass baseline for VGG16 (for the CPU comparison figure).

torchvision vgg16(weights=None), eval mode, f32, torch.set_num_threads(os.cpu_count()),
random 224x224 input; times one forward at each batch size (warm-up, then the median of
several runs) and prints JSON: {"ms_per_forward": {"1": ms, "8": ms}, "ms_per_image": {...}, ...}.

    python3 benches/pytorch_cpu_forward.py [--batch-sizes 1 8] [--runs 5] [--warmup 2]
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torchvision


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()

    per_forward, per_image, all_runs = {}, {}, {}
    with torch.inference_mode():
        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, args.size, args.size)
            for _ in range(args.warmup):
                model(x)
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
            med = statistics.median(times)
            per_forward[str(bs)] = round(med, 3)
            per_image[str(bs)] = round(med / bs, 3)
            all_runs[str(bs)] = [round(t, 3) for t in times]

    print(json.dumps({
        "model": "vgg16", "dtype": "f32", "input": [3, args.size, args.size],
        "threads": threads, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cpu": cpu_name(),
        "ms_per_forward": per_forward, "ms_per_image": per_image, "runs_ms": all_runs,
    }, indent=1))


if __name__ == "__main__":
    main()
