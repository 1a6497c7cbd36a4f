#!/usr/bin/env python3
"""Merge the pieces written by benches/gpu_check.sh into one JSON file, and print the README's
tables from such a file.  Standard library only (it runs on the GPU host and on dev machines).

  python3 benches/gpu_report.py merge --dir gpu-out [--out FILE] [--root .] [--budget-s 540]
      reads the files gpu_check.sh wrote in --dir (names in FILES below) and writes
      FILE (default DIR/gpu-check-<UTC date>.json).  Never fails on a missing or broken
      piece: that piece becomes {"error": "..."}.  Prints the path written.
  python3 benches/gpu_report.py table FILE.json
      Markdown for the README: the device line, the engine's figures, the peers with the ratio
      peer / engine, and the per-layer table when engine.fp16.layers exists.
  python3 benches/gpu_report.py selftest
      merge + table on fake inputs in a temporary directory (no GPU, no torch needed).

The merged JSON (top-level keys):
  schema, date (UTC), created_utc, commit, bundle (sha256 of the binary), budget_s, wall_s
  gpu          nvidia-smi at the start (name, driver_version, memory.total [MiB], clocks.max.sm,
               clocks.sm, clocks.mem [MHz], power.limit [W], temperature.gpu [C], ...), gpu.after
               the same query after the engine's benches, gpu.cudnn (engine's and PyTorch's),
               gpu.libraries (the CUDA libraries the engine was pointed at)
  steps        per step: command, exit code, wall seconds, limit, note
  tests        per test executable passed/failed/ignored, the failed tests' names, totals
  engine       fp16 / fp8 / channel_softmax: `scorecam-gpu bench --json` verbatim, or {"error"}
  peers        peers_gpu.py's --json-out verbatim; peers.compile_bound from the compile run
  ratios       per engine precision and image count: engine ms/image, each peer's ms/image and
               the ratio peer / engine (> 1: the engine is that many times faster)
  targets      the speed issue's targets, each met, unmet or unknown (a figure missing), and for
               a precision that misses its speed target where its time goes: the layers of one
               mask batch's forward by share, with their % of the GPU's dense peak
"""

import argparse
import csv
import datetime
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

SCHEMA = "scorecam-gpu-check/1"

# What gpu_check.sh writes into its output directory.
FILES = {
    "steps": "steps.tsv",            # name \t rc \t wall_s \t limit_s \t command \t note
    "gpu_fields": "gpu.fields",      # the --query-gpu field list used (comma separated)
    "gpu": "gpu.csv",                # nvidia-smi --format=csv,noheader,nounits, at the start
    "gpu_after": "gpu_after.csv",    # the same after the engine's benches
    "libs": "libs.txt",              # the CUDA libraries found for the engine, one path a line
    "tests": "tests.log",            # target/gpu-bundle/run.sh
    "engine_fp16": ("engine_fp16.json", "engine_fp16.err"),
    "engine_fp8": ("engine_fp8.json", "engine_fp8.err"),
    "engine_channel_softmax": ("engine_cs.json", "engine_cs.err"),
    "peers": ("peers.json", "peers.log"),
    "peers_compile": ("peers_compile.json", "peers_compile.log"),
}
# engine key in the merged JSON -> (FILES key, step name)
ENGINE_PIECES = [("fp16", "engine_fp16"), ("fp8", "engine_fp8"),
                 ("channel_softmax", "engine_channel_softmax")]
BINARY = "target/gpu-bundle/scorecam-gpu"
TAIL = 2000  # characters of a log kept in an error record

EAGER_BOUND = "pytorch_eager_forward_bound"
PEER_LABELS = {
    "pytorch_grad_cam_1.5.7": "pytorch-grad-cam 1.5.7 `ScoreCAM` (FP32, batch 16)",
    "pytorch_tuned_eager": "PyTorch eager, FP16 channels_last, tuned Score-CAM",
}


# --------------------------------------------------------------------------- small helpers

def _read(path, limit=None):
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return f.read() if limit is None else f.read(limit)


def _tail(path, n=TAIL):
    try:
        t = _read(path)
    except OSError as e:
        return "(%s)" % e
    t = t.strip()
    return t[-n:] if len(t) > n else t


def _num(v):
    """'1980' -> 1980, '699.00' -> 699.0, '[N/A]' -> None, other text unchanged."""
    s = str(v).strip()
    if s in ("", "[N/A]", "N/A", "[Not Supported]", "Not Supported", "[Unknown Error]"):
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
        return f if math.isfinite(f) else None
    except ValueError:
        return s


def _float(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _sortkey(k):
    f = _float(k)
    return (0, f, "") if f is not None else (1, 0.0, str(k))


def load_json(path):
    """-> (object, None) or (None, error text).  Accepts a file whose last line is the object
    (a tool that printed something before its JSON)."""
    try:
        text = _read(path)
    except OSError as e:
        return None, "%s: %s" % (type(e).__name__, e)
    if not text.strip():
        return None, "%s is empty" % os.path.basename(path)
    try:
        return json.loads(text), None
    except ValueError as e:
        first = e
    # last top-level object: from the last line starting with '{' to the end
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:])), None
            except ValueError:
                continue
    return None, "%s: bad JSON (%s)" % (os.path.basename(path), first)


# --------------------------------------------------------------------------- pieces

def parse_steps(path):
    steps = {}
    try:
        text = _read(path)
    except OSError as e:
        return steps, "%s: %s" % (type(e).__name__, e)
    for line in text.splitlines():
        if not line.strip():
            continue
        p = line.split("\t")
        p += [""] * (6 - len(p))
        name, rc, wall, limit, cmd, note = p[:6]
        rec = {"command": cmd, "exit": _num(rc) if rc != "skip" else None,
               "wall_s": _float(wall), "limit_s": _num(limit)}
        if rc == "skip":
            rec["skipped"] = True
        if isinstance(rec["exit"], int) and rec["exit"] in (124, 137):
            rec["timed_out"] = True
        if note:
            rec["note"] = note
        steps[name] = rec
    return steps, None


def parse_nvidia_smi(csv_path, fields_path):
    """One row per GPU of `nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits`.
    -> dict for GPU 0 (plus "all" when there are several), or {"error"}."""
    try:
        fields = [f.strip() for f in _read(fields_path).strip().split(",") if f.strip()]
    except OSError as e:
        return {"error": "no field list: %s" % e}
    try:
        text = _read(csv_path)
    except OSError as e:
        return {"error": "%s: %s" % (type(e).__name__, e)}
    rows = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != len(fields):
            return {"error": "nvidia-smi: unexpected output", "output": text.strip()[-TAIL:]}
        rows.append({f: _num(v) for f, v in zip(fields, row)})
    if not rows:
        return {"error": "nvidia-smi: no output", "output": text.strip()[-TAIL:]}
    gpu = dict(rows[0])
    gpu["units"] = {"memory.total": "MiB", "clocks": "MHz", "power.limit": "W", "temperature.gpu": "C"}
    if len(rows) > 1:
        gpu["all"] = rows
    return gpu


_HEADER = re.compile(r"^== (.+?)\s*$")
_SUMMARY = re.compile(r"^test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored"
                      r"(?:; (\d+) measured)?(?:; (\d+) filtered out)?(?:; finished in ([\d.]+)s)?")
_TEST = re.compile(r"^test (\S+)\s+\.\.\.\s?(.*)$")
_OUTCOME = re.compile(r"^(ok|FAILED|ignored)\b")
_BLOCK = re.compile(r"^---- (\S+) (?:stdout )?----\s*$")
_LISTED = re.compile(r"^    (\S+)\s*$")


def parse_tests(path, step=None):
    """libtest / libtest-mimic output of run.sh: one "== target/gpu-bundle/tests/NAME" header
    per executable, then its tests and its "test result: ..." line."""
    try:
        text = _read(path)
    except OSError as e:
        return {"error": "%s: %s" % (type(e).__name__, e)}
    exes = []
    cur = None

    def new(name):
        return {"name": name, "result": None, "passed": 0, "failed": 0, "ignored": 0,
                "failed_tests": [], "_pending": None, "_in_failures": False, "_listing": False,
                "_seen": {"ok": 0, "FAILED": 0, "ignored": 0}}

    def add_failed(e, name):
        if name not in e["failed_tests"]:
            e["failed_tests"].append(name)

    for line in text.splitlines():
        m = _HEADER.match(line)
        if m and not line.startswith("== bench"):
            cur = new(os.path.basename(m.group(1)))
            exes.append(cur)
            continue
        if cur is None:
            if not (_SUMMARY.match(line) or _TEST.match(line)):
                continue
            cur = new("?")
            exes.append(cur)
        m = _SUMMARY.match(line)
        if m:
            if cur["result"] is not None:  # a second binary under one header: sum
                cur["result"] = "ok" if (cur["result"] == "ok" and m.group(1) == "ok") else "FAILED"
            else:
                cur["result"] = m.group(1)
            cur["passed"] += int(m.group(2))
            cur["failed"] += int(m.group(3))
            cur["ignored"] += int(m.group(4))
            if m.group(7):
                cur["finished_s"] = round(cur.get("finished_s", 0.0) + float(m.group(7)), 3)
            cur["_pending"], cur["_in_failures"], cur["_listing"] = None, False, False
            continue
        m = _TEST.match(line)
        if m:
            name, rest = m.group(1), m.group(2).strip()
            o = _OUTCOME.match(rest)
            if o:
                cur["_pending"] = None
                cur["_seen"][o.group(1)] += 1
                if o.group(1) == "FAILED":
                    add_failed(cur, name)
            else:
                cur["_pending"] = name  # output came first (--nocapture); the outcome follows
            continue
        s = line.strip()
        if cur["_pending"]:
            if s in ("ok", "FAILED", "ignored") or s.endswith(" FAILED") or s.endswith(" ok"):
                cur["_seen"]["FAILED" if s.endswith("FAILED") else ("ok" if s.endswith("ok") else "ignored")] += 1
                if s.endswith("FAILED"):
                    add_failed(cur, cur["_pending"])
                cur["_pending"] = None
                continue
        if s == "failures:":
            # the first block holds "---- NAME ----" sections with their output, the second
            # (std's libtest and libtest-mimic alike) lists the names, indented, right below
            cur["_in_failures"] = cur["_listing"] = True
            continue
        if cur["_in_failures"]:
            m = _LISTED.match(line) if cur["_listing"] else None
            if m:
                add_failed(cur, m.group(1))
                continue
            cur["_listing"] = False
            m = _BLOCK.match(line)
            if m:
                add_failed(cur, m.group(1))
    totals = {"executables": len(exes), "passed": 0, "failed": 0, "ignored": 0, "without_summary": 0}
    failed_names = []
    for e in exes:
        if e["_pending"]:
            e["running_at_end"] = e["_pending"]
        seen = e.pop("_seen")
        del e["_pending"], e["_in_failures"], e["_listing"]
        if e["result"] is None:  # count what it printed before it stopped
            e["result"] = "no summary (crashed, killed or timed out)"
            e["passed"], e["failed"], e["ignored"] = seen["ok"], seen["FAILED"], seen["ignored"]
            totals["without_summary"] += 1
        for k in ("passed", "failed", "ignored"):
            totals[k] += e[k]
        failed_names += ["%s::%s" % (e["name"], t) for t in e["failed_tests"]]
        if e["result"] != "ok" and not e["failed_tests"] and e.get("running_at_end"):
            failed_names.append("%s::%s (did not finish)" % (e["name"], e["running_at_end"]))
    ok = bool(exes) and all(e["result"] == "ok" for e in exes)
    if step is not None and step.get("exit") not in (0, None):
        ok = False
    out = {"ok": ok, "totals": totals, "failed_tests": failed_names, "executables": exes,
           "skipped_lines": sum(1 for l in text.splitlines() if "skipped:" in l)}
    if not exes:
        out["error"] = "no test output found"
        out["log_tail"] = text.strip()[-TAIL:]
    if step is not None:
        out["exit"] = step.get("exit")
        out["wall_s"] = step.get("wall_s")
        if step.get("timed_out"):
            out["timed_out"] = True
    return out


def load_piece(d, json_name, err_name, step, what):
    """A JSON piece, or {"error": why, ...} with the tail of its log."""
    jp = os.path.join(d, json_name)
    if step is not None and step.get("skipped"):
        return {"error": "skipped: %s" % step.get("note", ""), "exit": None}
    obj, err = (None, "not run") if not os.path.exists(jp) else load_json(jp)
    if isinstance(obj, dict) and obj:
        return obj
    if obj is not None and err is None:
        err = "%s is not a JSON object" % json_name
    rec = {"error": err}
    if step is None:
        rec["error"] = "%s: not run (no step record)" % what if err == "not run" else err
    else:
        if step.get("skipped"):
            rec["error"] = "skipped: %s" % step.get("note", "")
        elif step.get("timed_out"):
            rec["error"] = "timed out after %s s" % step.get("limit_s")
        rec["exit"] = step.get("exit")
    ep = os.path.join(d, err_name) if err_name else None
    if ep and os.path.exists(ep):
        t = _tail(ep)
        if t:
            rec["log_tail"] = t
            if (err == "not run" or (err or "").endswith("is empty")) and not (step or {}).get("timed_out") \
                    and not (step or {}).get("skipped"):
                # no output: the log says why (e.g. "error: unexpected argument '--precision' found")
                rec["error"] = "exit %s: %s" % (step.get("exit"), _why(t)) if step else _why(t)
    return rec


def _why(log):
    lines = [l.strip() for l in log.splitlines() if l.strip()]
    errs = [l for l in lines if re.search(r"\berror\b|panicked|Error:", l, re.I)]
    return (errs or lines or ["(empty log)"])[-1 if not errs else 0]


def find_commit(root):
    """The commit the measured binary was built from: the bundle's COMMIT file (written by
    benches/gpu_bundle.sh beside the binary), else a COMMIT file in the root, else the checkout's
    HEAD. The checkout comes second: the device's copy of it may be older than the bundle."""
    for p in (os.path.join("target", "gpu-bundle", "COMMIT"), "COMMIT"):
        try:
            t = _read(os.path.join(root, p)).strip()
            if t:
                return t.splitlines()[0].strip()
        except OSError:
            continue
    if os.path.exists(os.path.join(root, ".git")):
        try:
            r = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                               text=True, timeout=10)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def sha256(path):
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def _engine_cudnn(engine):
    for v in engine.values():
        dev = v.get("device") if isinstance(v, dict) else None
        m = re.search(r"cuDNN ([\d.]+)", str(dev or ""))
        if m:
            return m.group(1)
    return None


def _torch_cudnn(v):
    if isinstance(v, int) and v > 0:  # 91002 -> 9.10.2 (cuDNN >= 9: major*10000 + minor*100 + patch)
        return "%d.%d.%d" % (v // 10000, (v % 10000) // 100, v % 100) if v >= 10000 else str(v)
    return v


def peer_figures(peers):
    """-> {system: ms/image} of the peers (and the torch.compile bound), numbers only."""
    out = {}
    if not isinstance(peers, dict):
        return out
    ms = peers.get("ms_per_image")
    if isinstance(ms, dict):
        for k, v in ms.items():
            f = _float(v)
            if f is not None:
                out[k] = f
    cb = peers.get("compile_bound")
    if isinstance(cb, dict):
        if _float(cb.get("ms_per_image_bound")) is not None:
            out[cb.get("key") or "torch_compile_forward_bound"] = _float(cb["ms_per_image_bound"])
        if _float(cb.get("eager_ms_per_image_bound")) is not None:
            out[EAGER_BOUND] = _float(cb["eager_ms_per_image_bound"])
    return out


def compute_ratios(engine, peers):
    """Per engine precision and image count: engine ms/image, each peer's ms/image, and
    ratio = peer / engine."""
    systems = peer_figures(peers)
    out = {}
    for prec in ("fp16", "fp8"):
        e = engine.get(prec)
        ms = e.get("ms_per_image") if isinstance(e, dict) else None
        if not isinstance(ms, dict):
            continue
        per = {}
        for n in sorted(ms, key=_sortkey):
            em = _float(ms[n])
            if em is None or em <= 0:
                continue
            per[str(n)] = {
                "engine_ms_per_image": em,
                "peers": {k: {"ms_per_image": v, "ratio": round(v / em, 4)} for k, v in systems.items()},
            }
        if per:
            out[prec] = per
    f16 = out.get("fp16", {})
    f8 = out.get("fp8", {})
    sp = {n: round(f16[n]["engine_ms_per_image"] / f8[n]["engine_ms_per_image"], 4)
          for n in f16 if n in f8}
    if sp:
        out["fp8_speedup_vs_fp16"] = sp
    return out


# Dense tensor-core peaks (TFLOP/s) by GPU name: FP16 (FP32 accumulate) and FP8. H100 and H200
# SXM share them (the H200 has more and faster memory, the same SMs).
PEAKS = [("H200", 989.4, 1978.9), ("H100", 989.4, 1978.9), ("A100", 312.0, None)]

# The speed issue's targets: FP16 ≤ 20 ms/image at 8 and at 32 images, the 32-image figure within
# 5 % of the 8-image one, FP8 ≤ 10 ms/image, FP8 maps correlating ≥ 0.99 with the FP16 maps on
# every image with the same class.
FP16_MS, FP8_MS, BATCH_SPREAD, FP8_CORR = 20.0, 10.0, 0.05, 0.99


def peaks(gpu_name):
    for key, fp16, fp8 in PEAKS:
        if key in (gpu_name or ""):
            return {"fp16": fp16, "fp8": fp8}
    return {"fp16": None, "fp8": None}


def where_time_goes(e, peak, top=4):
    """The largest layers of one mask batch's forward (bench `layers`), by share of their sum."""
    rows = [x for x in (e.get("layers") or []) if isinstance(x, dict) and _float(x.get("ms"))]
    tot = sum(_float(x["ms"]) for x in rows)
    out = []
    for x in sorted(rows, key=lambda x: -_float(x["ms"]))[:top]:
        ms = _float(x["ms"])
        t = _float(x.get("tflops"))
        pk = peak["fp8"] if x.get("runs_fp8") and peak["fp8"] else peak["fp16"]
        out.append({"name": x.get("name"), "kind": x.get("kind"), "ms": ms,
                    "share": round(ms / tot, 4) if tot else None,
                    "tflops": t, "gbps": _float(x.get("gbps")),
                    "peak_fraction": round(t / pk, 4) if t and pk else None,
                    "runs_fp8": x.get("runs_fp8")})
    return out


def assess_targets(r):
    """The targets, each {target, value, limit, met (None: figure missing)}, and per precision
    that misses a speed target, where its time goes."""
    eng = r.get("engine") or {}
    pk = peaks((r.get("gpu") or {}).get("name"))

    def ms(prec, n):
        e = eng.get(prec)
        v = e.get("ms_per_image") if isinstance(e, dict) else None
        return _float(v.get(n)) if isinstance(v, dict) else None

    def check(target, value, limit, ok):
        return {"target": target, "value": value, "limit": limit,
                "met": None if value is None else bool(ok(value))}

    t = []
    for n in ("8", "32"):
        t.append(check("FP16 ms/image at %s images" % n, ms("fp16", n), FP16_MS, lambda v: v <= FP16_MS))
    a, b = ms("fp16", "8"), ms("fp16", "32")
    spread = round(b / a - 1.0, 4) if a and b else None
    t.append(check("FP16 at 32 images within 5 % of 8 images (32 ÷ 8 − 1)", spread, BATCH_SPREAD,
                   lambda v: v <= BATCH_SPREAD))
    for n in ("8", "32"):
        t.append(check("FP8 ms/image at %s images" % n, ms("fp8", n), FP8_MS, lambda v: v <= FP8_MS))
    fid = eng["fp8"].get("fp8_fidelity") if isinstance(eng.get("fp8"), dict) else None
    corr = fid.get("map_corr_vs_fp16") if isinstance(fid, dict) else None
    cmin = _float(corr.get("min")) if isinstance(corr, dict) else None
    t.append(check("FP8 map correlation with FP16, lowest image", cmin, FP8_CORR, lambda v: v >= FP8_CORR))
    same = fid.get("same_top1_class") if isinstance(fid, dict) else None
    images = fid.get("images") if isinstance(fid, dict) else None
    t.append(check("FP8 images with the FP16 top-1 class", same, images, lambda v: v == images))
    out = {"targets": t, "peak_tflops": pk}
    for prec, limit in (("fp16", FP16_MS), ("fp8", FP8_MS)):
        missed = [x for x in t if x["target"].startswith(prec.upper() + " ms") and x["met"] is False]
        e = eng.get(prec)
        if missed and isinstance(e, dict):
            out["where_time_goes_" + prec] = {
                "masked_forward_tflops": e.get("masked_forward_tflops"),
                "stages_ms_per_image": e.get("stages_ms_per_image"),
                "layers": where_time_goes(e, pk),
            }
            b = e.get("backend")
            cost = b.get("fp8_route_cost_ms") if isinstance(b, dict) else None
            if prec == "fp8" and isinstance(cost, dict):
                out["where_time_goes_fp8"]["route_cost_ms"] = cost
    return out


def merge(d, root=".", out=None, budget_s=None, date=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    date = date or now.strftime("%Y-%m-%d")
    r = {"schema": SCHEMA, "date": date, "created_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    errors = []

    def guard(name, fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # never crash: the piece becomes an error record
            errors.append("%s: %s: %s" % (name, type(e).__name__, e))
            return {"error": "%s: %s" % (type(e).__name__, e)}

    steps, err = parse_steps(os.path.join(d, FILES["steps"]))
    if err:
        errors.append("steps: " + err)
    r["commit"] = guard("commit", find_commit, root)
    r["bundle"] = {"binary": BINARY, "sha256": sha256(os.path.join(root, BINARY))}
    r["budget_s"] = budget_s
    walls = [s["wall_s"] for s in steps.values() if isinstance(s.get("wall_s"), float)]
    r["wall_s"] = round(sum(walls), 2) if walls else None

    fields = os.path.join(d, FILES["gpu_fields"])
    gpu = guard("gpu", parse_nvidia_smi, os.path.join(d, FILES["gpu"]), fields)
    after = guard("gpu_after", parse_nvidia_smi, os.path.join(d, FILES["gpu_after"]), fields)
    if isinstance(after, dict):
        after.pop("units", None)
    gpu["after_engine_bench"] = after
    try:
        gpu["libraries"] = [l.strip() for l in _read(os.path.join(d, FILES["libs"])).splitlines() if l.strip()]
    except OSError:
        gpu["libraries"] = None
    r["gpu"] = gpu
    r["steps"] = steps
    r["tests"] = guard("tests", parse_tests, os.path.join(d, FILES["tests"]), steps.get("tests"))

    engine = {}
    for key, piece in ENGINE_PIECES:
        jn, en = FILES[piece]
        engine[key] = guard("engine." + key, load_piece, d, jn, en, steps.get(piece), "engine " + key)
    r["engine"] = engine

    jn, ln = FILES["peers"]
    peers = guard("peers", load_piece, d, jn, ln, steps.get("peers"), "peers")
    jn, ln = FILES["peers_compile"]
    comp = guard("peers_compile", load_piece, d, jn, ln, steps.get("peers_compile"), "torch.compile bound")
    if isinstance(comp, dict) and "compile_bound" in comp:
        cb = comp["compile_bound"]
    elif isinstance(comp, dict) and "error" in comp:
        cb = comp
    else:
        cb = {"error": "peers_compile.json has no compile_bound"}
    if not (isinstance(peers.get("compile_bound"), dict) and "error" not in peers["compile_bound"]
            and "error" in cb):
        peers["compile_bound"] = cb
    r["peers"] = peers

    r["gpu"]["cudnn"] = {"engine": _engine_cudnn(engine),
                         "pytorch": _torch_cudnn(peers.get("cudnn")) if isinstance(peers, dict) else None}
    r["ratios"] = guard("ratios", compute_ratios, engine, peers)
    r["targets"] = guard("targets", assess_targets, r)
    if errors:
        r["merge_errors"] = errors
    out = out or os.path.join(d, "gpu-check-%s.json" % date)
    with open(out, "w") as f:
        json.dump(r, f, indent=1, sort_keys=False)
        f.write("\n")
    return out, r


# --------------------------------------------------------------------------- table

def fmt_ms(v):
    f = _float(v)
    if f is None:
        return "–"
    return "%.0f" % f if f >= 100 else ("%.1f" % f if f >= 10 else "%.2f" % f)


def fmt_x(v):
    f = _float(v)
    return "–" if f is None else "%.2f×" % f


def fmt_num(v, nd=1):
    f = _float(v)
    return "–" if f is None else ("%.*f" % (nd, f))


def _short(s, n=90):
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _peer_label(key, peers):
    if key in PEER_LABELS:
        lab = PEER_LABELS[key]
        if key == "pytorch_tuned_eager" and isinstance(peers, dict) and peers.get("mask_batch"):
            lab += ", %s masks per batch" % peers["mask_batch"]
        return lab
    cb = peers.get("compile_bound") if isinstance(peers, dict) else None
    if isinstance(cb, dict) and key == EAGER_BOUND:
        return "PyTorch eager FP16 channels_last forward, batch %s, × %s passes (lower bound)" % (
            cb.get("batch", "?"), cb.get("passes_per_image", "?"))
    if isinstance(cb, dict) and key == cb.get("key"):
        return ("`torch.compile(mode=\"%s\")` FP16 channels_last forward, batch %s, × %s passes "
                "(lower bound)" % (cb.get("mode", "?"), cb.get("batch", "?"), cb.get("passes_per_image", "?")))
    if key.startswith("pytorch_tuned_compile_"):
        return "PyTorch tuned Score-CAM, masked forward under `torch.compile(%s)`" % key[len("pytorch_tuned_compile_"):]
    return key


def table(r):
    L = []
    gpu = r.get("gpu") or {}
    cud = gpu.get("cudnn") or {}
    peers = r.get("peers") if isinstance(r.get("peers"), dict) else {}
    eng = r.get("engine") or {}
    if "error" in gpu and not gpu.get("name"):
        L.append("GPU: %s" % _short(gpu["error"]))
    else:
        after = gpu.get("after_engine_bench") or {}
        L.append("GPU: %s, driver %s, %s MiB; cuDNN %s (engine), %s (PyTorch %s); SM clock max %s MHz "
                 "(%s at start, %s after the engine's benches), memory clock %s MHz, power limit %s W, "
                 "%s °C at start" % (
                     gpu.get("name", "?"), gpu.get("driver_version", "?"), gpu.get("memory.total", "?"),
                     cud.get("engine") or "?", cud.get("pytorch") or "?", peers.get("torch", "?"),
                     gpu.get("clocks.max.sm", "?"), gpu.get("clocks.sm", "?"),
                     after.get("clocks.sm", "?") if isinstance(after, dict) else "?",
                     gpu.get("clocks.mem", "?"), fmt_num(gpu.get("power.limit"), 0),
                     gpu.get("temperature.gpu", "?")))
    L.append("Run: %s, commit %s, `benches/gpu_check.sh` (%s s)." % (
        r.get("date", "?"), (r.get("commit") or "unknown")[:12], fmt_num(r.get("wall_s"), 0)))
    t = r.get("tests") or {}
    if "totals" in t:
        tt = t["totals"]
        s = "Tests (`SCORECAM_REQUIRE_GPU=1`): %d passed, %d failed, %d ignored in %d executables" % (
            tt["passed"], tt["failed"], tt["ignored"], tt["executables"])
        if tt.get("without_summary"):
            s += ", %d without a summary" % tt["without_summary"]
        if t.get("timed_out"):
            s += ", timed out"
        if t.get("failed_tests"):
            s += "; failed: " + ", ".join("`%s`" % n for n in t["failed_tests"][:12])
            if len(t["failed_tests"]) > 12:
                s += " and %d more" % (len(t["failed_tests"]) - 12)
        L.append(s + ".")
    elif t.get("error"):
        L.append("Tests: %s." % _short(t["error"]))
    L.append("")

    # engine
    counts = set()
    for p in ("fp16", "fp8"):
        e = eng.get(p)
        if isinstance(e, dict) and isinstance(e.get("ms_per_image"), dict):
            counts |= set(e["ms_per_image"])
    counts = sorted(counts, key=_sortkey)
    f16 = eng.get("fp16") if isinstance(eng.get("fp16"), dict) else {}
    mb = f16.get("mask_batch")
    L.append("| scorecam-gpu%s | %s |" % (
        " (mask batch %s)" % mb if mb else "",
        " | ".join("%s image%s" % (n, "" if str(n) == "1" else "s") for n in counts) or "–"))
    L.append("|---|%s|" % "|".join("---:" for _ in (counts or [0])))

    def row(label, obj, key, fmt):
        if not isinstance(obj, dict):
            return
        if "error" in obj and key not in obj:
            L.append("| %s | %s |" % (label, "error: " + _short(obj["error"], 120)))
            return
        vals = obj.get(key) if isinstance(obj.get(key), dict) else {}
        L.append("| %s | %s |" % (label, " | ".join(fmt(vals.get(n)) for n in counts) or "–"))

    row("FP16 ms / image", eng.get("fp16"), "ms_per_image", fmt_ms)
    row("FP16 masked forwards, TFLOP/s", eng.get("fp16"), "masked_forward_tflops", lambda v: fmt_num(v, 0))
    row("FP8 ms / image", eng.get("fp8"), "ms_per_image", fmt_ms)
    if isinstance(eng.get("fp8"), dict) and "ms_per_image" in eng["fp8"]:
        row("FP8 masked forwards, TFLOP/s", eng.get("fp8"), "masked_forward_tflops", lambda v: fmt_num(v, 0))
        sp = (r.get("ratios") or {}).get("fp8_speedup_vs_fp16")
        if sp:
            L.append("| FP8 speed-up over FP16 | %s |" % " | ".join(fmt_x(sp.get(str(n))) for n in counts))
    cs = eng.get("channel_softmax")
    if isinstance(cs, dict):
        row("channel-softmax FP16 ms / image", cs, "ms_per_image", fmt_ms)
    L.append("")
    fid = eng["fp8"].get("fp8_fidelity") if isinstance(eng.get("fp8"), dict) else None
    if isinstance(fid, dict) and isinstance(fid.get("map_corr_vs_fp16"), dict):
        c = fid["map_corr_vs_fp16"]
        L.append("FP8 fidelity: map correlation with the FP16 maps (same class) over %s images: "
                 "min %s, p10 %s, median %s, max %s; %s of them ≥ 0.99; same top-1 class on %s."
                 % (fid.get("images"), c.get("min"), c.get("p10"), c.get("median"), c.get("max"),
                    c.get("at_least_0_99"), fid.get("same_top1_class")))
        L.append("")

    L += graph_search_lines(eng)

    # peers
    systems = peer_figures(peers)
    rat = (r.get("ratios") or {}).get("fp16") or {}
    rcounts = [n for n in counts if str(n) in rat]
    L.append("| system (same GPU, same run) | ms / image | %s |" % (
        " | ".join("÷ engine FP16 @ %s" % n for n in rcounts) or "÷ engine"))
    L.append("|---|---:|%s|" % "|".join("---:" for _ in (rcounts or [0])))
    order = ["pytorch_grad_cam_1.5.7", "pytorch_tuned_eager", EAGER_BOUND]
    keys = [k for k in order if k in systems] + [k for k in systems if k not in order]
    for k in keys:
        L.append("| %s | %s | %s |" % (_peer_label(k, peers), fmt_ms(systems[k]), " | ".join(
            fmt_x(rat[str(n)]["peers"].get(k, {}).get("ratio")) for n in rcounts) or "–"))
    pad = " |" * len(rcounts or [0])
    if "error" in peers and not systems:
        L.append("| peers | error: %s |%s" % (_short(peers["error"], 120), pad))
    cb = peers.get("compile_bound")
    if isinstance(cb, dict) and "error" in cb and _float(cb.get("ms_per_image_bound")) is None:
        L.append("| `torch.compile(%s)` forward bound | error: %s |%s" % (
            cb.get("mode", "max-autotune"), _short(cb["error"], 100), pad))
    for n in peers.get("notes") or []:
        L.append("")
        L.append("Note: %s" % _short(n, 300))
    if rcounts:
        L.append("")
        L.append("(÷ engine = peer ms / engine ms at that image count: > 1 means the engine is faster.)")

    # per-layer
    layers = f16.get("layers")
    if layers:
        L.append("")
        L += layer_tables(layers)
    L += target_lines(r.get("targets"))
    return "\n".join(L).rstrip() + "\n"


def target_lines(tg):
    """The targets' table, and for a precision that misses its speed target, its largest layers."""
    if not isinstance(tg, dict) or not isinstance(tg.get("targets"), list):
        return []
    L = ["", "| target | value | limit | met |", "|---|---:|---:|---|"]
    for x in tg["targets"]:
        v = x.get("value")
        met = {True: "yes", False: "**no**", None: "unknown (no figure)"}[x.get("met")]
        cell = "–" if v is None else (fmt_num(v, 5) if "correlation" in x["target"] else
                                      ("%+.1f %%" % (100 * v) if "within" in x["target"] else
                                       (str(v) if isinstance(v, int) else fmt_ms(v))))
        lim = x.get("limit")
        lim = "–" if lim is None else ("%.0f %%" % (100 * lim) if "within" in x["target"] else str(lim))
        L.append("| %s | %s | %s | %s |" % (x["target"], cell, lim, met))
    for prec in ("fp16", "fp8"):
        w = tg.get("where_time_goes_" + prec)
        if not isinstance(w, dict):
            continue
        parts = []
        for y in w.get("layers") or []:
            rate = ("%.0f TFLOP/s%s" % (y["tflops"], ", %.0f %% of peak" % (100 * y["peak_fraction"])
                                        if y.get("peak_fraction") else "") if y.get("tflops")
                    else ("%.0f GB/s" % y["gbps"] if y.get("gbps") else "?"))
            parts.append("%s %.3f ms (%s of the forward; %s%s)" % (
                y["name"], y["ms"], "%.0f %%" % (100 * y["share"]) if y.get("share") is not None else "?",
                rate, ", FP8" if y.get("runs_fp8") else ""))
        L.append("")
        L.append("%s misses its speed target; the largest layers of one mask batch's forward: %s." % (
            prec.upper(), "; ".join(parts) or "(no per-layer figures)"))
        cost = w.get("route_cost_ms")
        if isinstance(cost, dict) and _float(cost.get("route")) and _float(cost.get("all_fp16")):
            L.append("")
            L.append("The FP8 route's features, as the set-up timings sum them for one mask batch: "
                     "%.3f ms, against %.3f ms all FP16." % (_float(cost["route"]), _float(cost["all_fp16"])))
    return L


def graph_search_lines(eng):
    """What each run's cuDNN graph-API plan searches met (the backend report's
    graph_api_search): why FP8 or graph plans never ran, when they did not."""
    L = []
    for p, label in (("fp16", "FP16"), ("fp8", "FP8")):
        e = eng.get(p)
        b = e.get("backend") if isinstance(e, dict) else None
        gs = b.get("graph_api_search") if isinstance(b, dict) else None
        if not isinstance(gs, dict):
            continue
        parts = []
        for kind in ("fp16", "fp8"):
            s = gs.get(kind)
            if not isinstance(s, dict) or not (s.get("graphs_built") or s.get("graphs_refused")):
                continue
            part = ("%s graphs: %s built, %s refused; %s engine configs offered, %s failed to finalize, "
                    "%s over the workspace cap, %s failed to run, %s plans timed" % (
                        kind.upper(), s.get("graphs_built"), s.get("graphs_refused"), s.get("configs_offered"),
                        s.get("finalize_failed"), s.get("over_workspace"), s.get("execute_failed"),
                        s.get("plans_timed")))
            if s.get("skipped_over_budget"):
                part += ", %s searches skipped or cut short by the time budget" % s["skipped_over_budget"]
            if s.get("from_plan_cache"):
                part += ", %s answered by the plan cache" % s["from_plan_cache"]
            errs = s.get("errors") or []
            if errs:
                part += " (first error: %s)" % _short(str(errs[0]), 160)
            parts.append(part)
        if parts:
            L.append("Graph API in the %s run: %s." % (label, "; ".join(parts)))
            L.append("")
        dc = b.get("direct_conv")
        if isinstance(dc, dict) and dc.get("check") is not None:
            checks = dc.get("checks") if isinstance(dc.get("checks"), dict) else {}
            L.append("Hand-written convs in the %s run (%s): device check %s (%s)." % (
                label, dc.get("use"), _short(str(dc.get("check")), 160),
                ", ".join("%s %s" % (k, _short(str(v), 80)) for k, v in checks.items())
                or "per shape: not reported"))
            L.append("")
        # The wgmma convs (and the fused first block) timed again on half the SMs: a ratio near
        # 2 says each SM's own work limits the kernel, one well under 2 a limit the SMs share
        # (L2 or memory bandwidth).
        scaling = []
        for x in b.get("plans") or []:
            if isinstance(x, dict) and x.get("direct_half_grid_ms") is not None and x.get("direct_ms"):
                scaling.append("stage %s %s → %s ms (×%.2f)" % (
                    x.get("stage"), fmt_ms(_float(x.get("direct_ms"))),
                    fmt_ms(_float(x.get("direct_half_grid_ms"))),
                    _float(x.get("direct_half_grid_ms")) / _float(x.get("direct_ms"))))
        fb = b.get("fused_block")
        if isinstance(fb, dict) and fb.get("half_grid_ms") is not None and fb.get("ms"):
            scaling.append("first block %s → %s ms (×%.2f)" % (
                fmt_ms(_float(fb.get("ms"))), fmt_ms(_float(fb.get("half_grid_ms"))),
                _float(fb.get("half_grid_ms")) / _float(fb.get("ms"))))
        if scaling:
            L.append("Hand-written kernels on all SMs → half of them in the %s run (×2: each SM's "
                     "own work limits it; well under: L2 or memory): %s." % (label, "; ".join(scaling)))
            L.append("")
        fp = b.get("fused_pools")
        if isinstance(fp, dict) and fp.get("check") is not None:
            parts = ["stage %s %s: fused %s ms (builds %s) vs %s + %s ms apart, %s" % (
                x.get("stage"), x.get("algo"), fmt_ms(_float(x.get("ms"))),
                ", ".join("%s %s" % (b.get("build"), fmt_ms(_float(b.get("ms"))))
                          for b in x.get("builds_ms") or [] if isinstance(b, dict)) or "none",
                fmt_ms(_float(x.get("conv_ms"))), fmt_ms(_float(x.get("pool_ms"))),
                "fused" if x.get("fused") else
                ("kept, but apart in the FP8 route" if x.get("kept") else "not kept"))
                for x in fp.get("layers") or [] if isinstance(x, dict)]
            checks = fp.get("checks") if isinstance(fp.get("checks"), dict) else {}
            L.append("Fused conv + max-pool in the %s run: device check %s (%s); %s." % (
                label, _short(str(fp.get("check")), 160),
                ", ".join("%s %s" % (k, _short(str(v), 80)) for k, v in checks.items()) or "no build",
                "; ".join(parts) or "no layer timed"))
            L.append("")
        fb = b.get("fused_block")
        if isinstance(fb, dict) and fb.get("check") is not None:
            timed = ("stages %s-%s: one kernel %s ms vs %s ms apart, %s" % (
                fb.get("stage"), (fb.get("stage") or 0) + 2, fmt_ms(_float(fb.get("ms"))),
                fmt_ms(_float(fb.get("apart_ms"))),
                "runs" if fb.get("runs") else ("kept, not run here" if fb.get("kept") else "not kept"))
                if fb.get("ms") is not None else "not timed")
            L.append("Whole first block in the %s run (%s): device check %s; %s." % (
                label, fb.get("algo"), _short(str(fb.get("check")), 160), timed))
            L.append("")
        f8 = [x for x in (b.get("fp8_fused_pools") or []) if isinstance(x, dict)]
        if f8:
            parts = []
            for x in f8:
                for o in x.get("outs") or []:
                    if isinstance(o, dict):
                        parts.append("stage %s %s out (%s): %s ms vs %s ms apart, %s" % (
                            x.get("stage"), o.get("out"), o.get("algo"), fmt_ms(_float(o.get("ms"))),
                            fmt_ms(_float(o.get("apart_ms"))),
                            "runs" if o.get("runs") else ("kept" if o.get("kept") else "not kept")))
            L.append("FP8 conv + max-pool in the %s run: %s." % (label, "; ".join(parts) or "none timed"))
            L.append("")
        # Where the set-up's seconds went (the backend's setup_s: phase, seconds).
        phases = [x for x in (b.get("setup_s") or []) if isinstance(x, dict)]
        if phases:
            parts = ["%s %.1f s" % (x.get("phase"), _float(x.get("s")) or 0.0) for x in phases]
            L.append("Set-up of the %s run (last prepare): %s." % (label, "; ".join(parts)))
            L.append("")
    return L


LAYER_PREF = ["name", "kind", "shape", "batch", "ms", "ms_per_image", "share", "tflops", "gbps", "algo"]


def layer_tables(layers):
    """engine.fp16.layers: a list of {name, kind, ms, tflops or gbps, algo, ...}, or a dict of
    such lists (e.g. per image count)."""
    if isinstance(layers, dict):
        out = []
        for k in sorted(layers, key=_sortkey):
            if isinstance(layers[k], list):
                out.append("Per layer (%s):" % k)
                out.append("")
                out += layer_tables(layers[k])
                out.append("")
        return out
    rows = [x for x in layers if isinstance(x, dict)] if isinstance(layers, list) else []
    if not rows:
        return ["Per layer: (unreadable `layers`: %s)" % _short(json.dumps(layers), 120)]
    keys = []
    for x in rows:
        for k, v in x.items():
            if k not in keys and not isinstance(v, (dict, list)):
                keys.append(k)
    keys = [k for k in LAYER_PREF if k in keys] + [k for k in keys if k not in LAYER_PREF]
    heads = {"ms": "ms", "tflops": "TFLOP/s", "gbps": "GB/s"}
    out = ["| %s |" % " | ".join(heads.get(k, k) for k in keys),
           "|%s|" % "|".join("---:" if all(isinstance(x.get(k), (int, float)) or x.get(k) is None
                                           for x in rows) else "---" for k in keys)]
    for x in rows:
        cells = []
        for k in keys:
            v = x.get(k)
            if v is None:
                cells.append("–")
            elif isinstance(v, float):
                cells.append("%.3f" % v if k.startswith("ms") else ("%.1f" % v if abs(v) >= 1 else "%.3g" % v))
            else:
                cells.append(str(v).replace("|", "/"))
        out.append("| %s |" % " | ".join(cells))
    tot = sum(_float(x.get("ms")) or 0.0 for x in rows)
    if tot:
        out.append("")
        out.append("Sum of the layers' ms: %.3f." % tot)
    return out


# --------------------------------------------------------------------------- self-test

FAKE_TESTS_LOG = """\
== target/gpu-bundle/tests/cli

running 3 tests
test a_help ... ok
test b_bench_json ... ok
test c_ignored ... ignored

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 3.19s

== target/gpu-bundle/tests/cuda_parity

running 4 tests
test new_never_panics        ... 
thread 'main' panicked at tests/cuda_parity.rs:162:13:
SCORECAM_REQUIRE_GPU is set but CUDA backend unavailable
FAILED
test preprocess_matches_cpu  ... ok
test vgg16_logits_match_cpu  ... max |d| 0.01
ok
test combine_matches_cpu     ... FAILED

failures:

---- new_never_panics ----
test panicked: SCORECAM_REQUIRE_GPU is set

---- combine_matches_cpu ----
combine differs

failures:
    new_never_panics
    combine_matches_cpu

test result: FAILED. 2 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.07s

== target/gpu-bundle/tests/images

running 2 tests
test results_log_appends_whole_groups ... ok
test std_style_failure ... FAILED

failures:

---- std_style_failure stdout ----
thread 'std_style_failure' panicked at src/x.rs:1:1:
    indented output line
    single_token_output

failures:
    std_style_failure

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.08s

== target/gpu-bundle/tests/job

running 2 tests
test first_job ... ok
test hangs_here ... 
"""

FAKE_LAYERS = [
    {"name": "conv1_1", "kind": "conv", "ms": 0.812, "tflops": 27.1, "algo": "IMPLICIT_PRECOMP_GEMM"},
    {"name": "conv1_2", "kind": "conv", "ms": 9.5, "tflops": 473.0, "algo": "graph:fused"},
    {"name": "pool1", "kind": "maxpool", "ms": 1.25, "gbps": 3900.5},
    {"name": "fc6", "kind": "gemm", "ms": 0.4, "tflops": 600.0, "algo": "cublasLt"},
]


def _fake_dir(d, complete=True):
    def w(name, text):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)

    fields = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,clocks.sm,clocks.mem,power.limit,temperature.gpu,pstate"
    w("gpu.fields", fields + "\n")
    w("gpu.csv", "NVIDIA H200, 580.95.05, 143771, 1980, 3201, 1980, 3201, 700.00, 31, P0\n")
    w("gpu_after.csv", "NVIDIA H200, 580.95.05, 143771, 1980, 3201, 1755, 3201, 700.00, 58, P0\n")
    w("libs.txt", "/usr/lib/x86_64-linux-gnu/libcudnn.so.9\n")
    w("tests.log", FAKE_TESTS_LOG)
    dev = "cuda:0: NVIDIA H200 (sm_90, cuDNN 9.14)"
    eng16 = {"ms_per_image": {"1": 31.25, "8": 19.5, "32": 18.75},
             "stages_ms_per_image": {"8": {"masked_forward": 18.9}},
             "masked_forward_tflops": {"1": 600.5, "8": 800.25, "32": 820.0},
             "layers": FAKE_LAYERS, "plans": {"256": "fused"}, "device": dev, "mode": "official",
             "mask_batch": 256, "channels": 512}
    w("engine_fp16.json", json.dumps(eng16) + "\n")
    w("engine_fp16.err", "opening cuda:0\n")
    w("engine_fp8.json", "")
    w("engine_fp8.err", "error: unexpected argument '--precision' found\n\nUsage: scorecam-gpu bench [OPTIONS]\n\n"
      "For more information, try '--help'.\n")
    w("engine_cs.json", "{not json")
    w("engine_cs.err", "")
    peers = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cudnn": 91002, "mask_batch": 256,
             "ms_per_image": {"pytorch_tuned_eager": 60.0, "pytorch_grad_cam_1.5.7": 240.0},
             "notes": []}
    w("peers.json", json.dumps(peers))
    w("peers.log", "tuned eager (float16, mask batch 256): 60.00 ms/image\n")
    cb = {"compile_bound": {"key": "torch_compile_max-autotune_forward_bound", "mode": "max-autotune",
                            "batch": 256, "passes_per_image": 513, "ms_per_image_bound": 37.5,
                            "eager_ms_per_image_bound": 50.0,
                            "compile_s": 150.0}}
    w("peers_compile.json", json.dumps(cb))
    steps = [
        ("gpu", "0", "0.21", "15", "nvidia-smi --query-gpu=...", ""),
        ("tests", "124", "180.02", "180", "target/gpu-bundle/run.sh", ""),
        ("engine_fp16", "0", "25.3", "90", "target/gpu-bundle/scorecam-gpu bench --backend cuda --images 1,8,32 --json", ""),
        ("engine_fp8", "2", "0.05", "75", "target/gpu-bundle/scorecam-gpu bench --backend cuda --precision fp8 --images 1,8,32 --json", ""),
        ("engine_channel_softmax", "0", "9.9", "40", "... --mode channel-softmax --images 8 --json", ""),
        ("peers", "0", "48.2", "120", "env -u LD_LIBRARY_PATH python3 benches/peers_gpu.py ...", ""),
        ("peers_compile", "0", "190.0", "250", "env -u LD_LIBRARY_PATH python3 benches/peers_gpu.py --compile-bound ...", ""),
    ]
    if not complete:
        steps[-1] = ("peers_compile", "skip", "0", "0", "", "PEERS_COMPILE=0")
        os.remove(os.path.join(d, "peers_compile.json"))
    w("steps.tsv", "".join("\t".join(s) + "\n" for s in steps))


def selftest():
    failures = []

    def check(cond, what):
        if not cond:
            failures.append(what)

    tmp = tempfile.mkdtemp(prefix="gpu_report_selftest.")
    try:
        root = os.path.join(tmp, "root")
        os.makedirs(root)
        with open(os.path.join(root, "COMMIT"), "w") as f:
            f.write("0123456789abcdef0123456789abcdef01234567\n")
        # 1. a full run: mixed tests, fp8 unsupported, bad channel-softmax JSON, compile bound
        d1 = os.path.join(tmp, "full")
        os.makedirs(d1)
        _fake_dir(d1)
        cmd = [sys.executable, os.path.abspath(__file__), "merge", "--dir", d1, "--root", root,
               "--budget-s", "540", "--date", "2026-11-30"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        check(p.returncode == 0, "merge exit %d: %s" % (p.returncode, p.stderr[-500:]))
        path = os.path.join(d1, "gpu-check-2026-11-30.json")
        check(p.stdout.strip().endswith(path), "merge printed %r" % p.stdout)
        with open(path) as f:
            r = json.load(f)
        check(r["commit"] == "0123456789abcdef0123456789abcdef01234567", "commit from COMMIT")
        # The bundle's COMMIT (the binary's source) wins over a root COMMIT or an older checkout.
        os.makedirs(os.path.join(root, "target", "gpu-bundle"))
        with open(os.path.join(root, "target", "gpu-bundle", "COMMIT"), "w") as f:
            f.write("fedcba9876543210fedcba9876543210fedcba98\n")
        check(find_commit(root) == "fedcba9876543210fedcba9876543210fedcba98", "commit from the bundle")
        shutil.rmtree(os.path.join(root, "target"))
        g = r["gpu"]
        check(g["name"] == "NVIDIA H200" and g["driver_version"] == "580.95.05", "gpu name/driver")
        check(g["clocks.max.sm"] == 1980 and g["power.limit"] == 700.0 and g["temperature.gpu"] == 31, "gpu numbers")
        check(g["after_engine_bench"]["clocks.sm"] == 1755, "clocks after")
        check(g["cudnn"] == {"engine": "9.14", "pytorch": "9.10.2"}, "cudnn %r" % g["cudnn"])
        t = r["tests"]
        check(t["totals"] == {"executables": 4, "passed": 6, "failed": 3, "ignored": 1, "without_summary": 1},
              "test totals %r" % t["totals"])
        check(t["failed_tests"] == ["cuda_parity::new_never_panics", "cuda_parity::combine_matches_cpu",
                                    "images::std_style_failure", "job::hangs_here (did not finish)"],
              "failed tests %r" % t["failed_tests"])
        check(t["ok"] is False and t.get("timed_out") is True, "tests not ok, timed out")
        ex = {e["name"]: e for e in t["executables"]}
        check(ex["cli"]["result"] == "ok" and ex["cli"]["finished_s"] == 3.19, "cli summary")
        check(ex["job"]["running_at_end"] == "hangs_here", "job running at end")
        e = r["engine"]
        check(e["fp16"]["layers"] == FAKE_LAYERS and e["fp16"]["plans"] == {"256": "fused"}, "fp16 verbatim")
        check(e["fp8"]["error"] == "exit 2: error: unexpected argument '--precision' found" and e["fp8"]["exit"] == 2,
              "fp8 error %r" % e["fp8"])
        check("bad JSON" in e["channel_softmax"]["error"], "cs error %r" % e["channel_softmax"])
        cb = r["peers"]["compile_bound"]
        check(cb["ms_per_image_bound"] == 37.5, "compile bound merged")
        ra = r["ratios"]["fp16"]
        check(set(ra) == {"1", "8", "32"}, "ratio counts")
        check(abs(ra["8"]["peers"]["pytorch_tuned_eager"]["ratio"] - 60.0 / 19.5) < 1e-3, "ratio eager@8")
        check(abs(ra["32"]["peers"]["torch_compile_max-autotune_forward_bound"]["ratio"] - 2.0) < 1e-9,
              "ratio compile@32")
        check("fp8" not in r["ratios"], "no fp8 ratios")
        check(r["steps"]["engine_fp16"]["wall_s"] == 25.3 and r["steps"]["tests"]["timed_out"], "steps")
        check(r["wall_s"] == round(0.21 + 180.02 + 25.3 + 0.05 + 9.9 + 48.2 + 190.0, 2), "wall total")
        check("merge_errors" not in r, "merge errors %r" % r.get("merge_errors"))
        tg = {x["target"]: x for x in r["targets"]["targets"]}
        check(tg["FP16 ms/image at 8 images"]["met"] is True and tg["FP16 ms/image at 32 images"]["met"] is True,
              "fp16 targets met %r" % tg)
        check(tg["FP16 at 32 images within 5 % of 8 images (32 ÷ 8 − 1)"]["value"] == round(18.75 / 19.5 - 1, 4),
              "spread %r" % tg)
        check(tg["FP8 ms/image at 8 images"]["met"] is None and tg["FP8 map correlation with FP16, lowest image"]["met"]
              is None, "fp8 unknown when its run failed")
        check("where_time_goes_fp16" not in r["targets"], "fp16 met: no breakdown")
        check(r["targets"]["peak_tflops"] == {"fp16": 989.4, "fp8": 1978.9}, "H200 peaks")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "table", path],
                           capture_output=True, text=True, timeout=60)
        check(p.returncode == 0, "table exit %d: %s" % (p.returncode, p.stderr[-500:]))
        tab = p.stdout
        for s in ("GPU: NVIDIA H200, driver 580.95.05", "cuDNN 9.14 (engine), 9.10.2 (PyTorch",
                  "| FP16 ms / image | 31.2 | 19.5 | 18.8 |", "| FP16 masked forwards, TFLOP/s | 600 | 800 | 820 |",
                  "| FP8 ms / image | error: ", "| PyTorch eager, FP16 channels_last, tuned Score-CAM, 256 masks per batch | 60.0 | 1.92× | 3.08× | 3.20× |",
                  "| pytorch-grad-cam 1.5.7 `ScoreCAM` (FP32, batch 16) | 240 | 7.68× | 12.31× | 12.80× |",
                  "max-autotune", "| 37.5 | 1.20× | 1.92× | 2.00× |",
                  "| PyTorch eager FP16 channels_last forward, batch 256, × 513 passes (lower bound) | 50.0 | 1.60× |",
                  "| name | kind | ms | TFLOP/s | GB/s | algo |", "| conv1_1 | conv | 0.812 | 27.1 | – | IMPLICIT_PRECOMP_GEMM |",
                  "| pool1 | maxpool | 1.250 | – | 3900.5 | – |", "failed: `cuda_parity::new_never_panics`",
                  "Tests (`SCORECAM_REQUIRE_GPU=1`): 6 passed, 3 failed, 1 ignored in 4 executables, 1 without a summary, timed out",
                  "| FP16 ms/image at 8 images | 19.5 | 20.0 | yes |", "| FP16 at 32 images within 5 % of 8 images (32 ÷ 8 − 1) | -3.9 % | 5 % | yes |",
                  "| FP8 ms/image at 32 images | – | 10.0 | unknown (no figure) |"):
            check(s in tab, "table lacks %r" % s)
        print("== merged JSON (full fake run): %s" % path)
        print("== table:\n" + tab)

        # 2. compile skipped, fp8 working
        d2 = os.path.join(tmp, "nocompile")
        os.makedirs(d2)
        _fake_dir(d2, complete=False)
        with open(os.path.join(d2, "engine_fp8.json"), "w") as f:
            json.dump({"ms_per_image": {"1": 15.0, "8": 9.75, "32": 9.5},
                       "masked_forward_tflops": {"8": 1500.0}, "device": "x",
                       "backend": {
                           "fused_block": {"check": "passed", "algo": "hand-written block", "stage": 0,
                                           "rows": 256, "ms": 1.5, "apart_ms": 3.5, "kept": True,
                                           "runs": True, "half_grid_ms": 2.7},
                           "plans": [{"stage": 5, "rows": 256, "direct_ms": 0.8,
                                      "direct_half_grid_ms": 1.2},
                                     {"stage": 7, "rows": 256, "direct_ms": 0.5,
                                      "direct_half_grid_ms": None}],
                           "graph_api_search": {
                           "fp16": {"graphs_built": 9, "graphs_refused": 0, "configs_offered": 40,
                                    "finalize_failed": 4, "over_workspace": 0, "execute_failed": 0,
                                    "plans_timed": 45, "errors": []},
                           "fp8": {"graphs_built": 8, "graphs_refused": 1, "configs_offered": 12,
                                   "finalize_failed": 12, "over_workspace": 0, "execute_failed": 0,
                                   "plans_timed": 0, "skipped_over_budget": 3,
                                   "errors": ["finalizing engine config #0: CudnnError(CUDNN_STATUS_NOT_SUPPORTED)"]}}},
                       "fp8_fidelity": {"images": 32, "same_top1_class": 32,
                                        "map_corr_vs_fp16": {"min": 0.991, "p10": 0.995,
                                                             "median": 0.998, "max": 0.9999,
                                                             "at_least_0_99": 32}}}, f)
        out2, r2 = merge(d2, root=tmp, out=None, budget_s=540, date="2026-11-30")
        check(r2["commit"] is None, "no commit in a bare root")
        check(r2["peers"]["compile_bound"]["error"].startswith("skipped: PEERS_COMPILE=0"),
              "compile skipped %r" % r2["peers"]["compile_bound"])
        check(r2["ratios"]["fp8_speedup_vs_fp16"] == {"1": round(31.25 / 15.0, 4), "8": 2.0,
                                                    "32": round(18.75 / 9.5, 4)}, "fp8 speed-up")
        check(abs(r2["ratios"]["fp8"]["8"]["peers"]["pytorch_tuned_eager"]["ratio"] - 60 / 9.75) < 1e-3, "fp8 ratio")
        tab2 = table(r2)
        check("| FP8 ms / image | 15.0 | 9.75 | 9.50 |" in tab2, "fp8 row")
        check("FP8 fidelity: map correlation with the FP16 maps (same class) over 32 images: "
              "min 0.991, p10 0.995, median 0.998" in tab2, "fp8 fidelity line")
        check("| FP8 speed-up over FP16 | 2.08× | 2.00× | 1.97× |" in tab2, "speed-up row")
        check("Graph API in the FP8 run: FP16 graphs: 9 built, 0 refused; 40 engine configs offered, 4 failed "
              "to finalize" in tab2 and "FP8 graphs: 8 built, 1 refused; 12 engine configs offered, 12 failed to "
              "finalize, 0 over the workspace cap, 0 failed to run, 0 plans timed, 3 searches skipped or cut short "
              "by the time budget (first error: finalizing engine "
              "config #0: CudnnError(CUDNN_STATUS_NOT_SUPPORTED))" in tab2, "graph search line %r" % tab2)
        check("Whole first block in the FP8 run (hand-written block): device check passed; stages 0-2: "
              "one kernel 1.50 ms vs 3.50 ms apart, runs." in tab2, "fused block line")
        check("Hand-written kernels on all SMs → half of them in the FP8 run (×2: each SM's own work "
              "limits it; well under: L2 or memory): stage 5 0.80 → 1.20 ms (×1.50); first block 1.50 → "
              "2.70 ms (×1.80)." in tab2, "half-grid line")
        check("error: skipped: PEERS_COMPILE=0" in tab2, "compile skipped row")
        tg2 = {x["target"]: x["met"] for x in r2["targets"]["targets"]}
        check(tg2["FP8 ms/image at 8 images"] is True and tg2["FP8 map correlation with FP16, lowest image"] is True
              and tg2["FP8 images with the FP16 top-1 class"] is True, "fp8 targets met %r" % tg2)
        # The H100 run before the speed work: 29.4 ms at 8 images, 37.7 at 32.
        with open(os.path.join(d2, "engine_fp16.json")) as f:
            slow = json.load(f)
        slow["ms_per_image"] = {"1": 28.7, "8": 29.4, "32": 37.7}
        with open(os.path.join(d2, "engine_fp16.json"), "w") as f:
            json.dump(slow, f)
        _, r2b = merge(d2, root=tmp, out=os.path.join(d2, "slow.json"), budget_s=540, date="2026-11-30")
        tg2b = {x["target"]: x["met"] for x in r2b["targets"]["targets"]}
        check(tg2b["FP16 ms/image at 8 images"] is False and tg2b["FP16 ms/image at 32 images"] is False
              and tg2b["FP16 at 32 images within 5 % of 8 images (32 ÷ 8 − 1)"] is False, "slow fp16 %r" % tg2b)
        w16 = r2b["targets"]["where_time_goes_fp16"]["layers"]
        check([y["name"] for y in w16] == ["conv1_2", "pool1", "conv1_1", "fc6"], "layers by time %r" % w16)
        check(abs(w16[0]["share"] - 9.5 / (0.812 + 9.5 + 1.25 + 0.4)) < 1e-3
              and abs(w16[0]["peak_fraction"] - 473.0 / 989.4) < 1e-3, "conv1_2 share and peak %r" % w16[0])
        tab2b = table(r2b)
        check("| FP16 ms/image at 8 images | 29.4 | 20.0 | **no** |" in tab2b, "slow row %r" % tab2b)
        check("FP16 misses its speed target; the largest layers of one mask batch's forward: conv1_2 9.500 ms "
              "(79 % of the forward; 473 TFLOP/s, 48 % of peak)" in tab2b, "breakdown line %r" % tab2b)

        # 3. nothing at all (the script died early): merge and table still work
        d3 = os.path.join(tmp, "empty")
        os.makedirs(d3)
        out3, r3 = merge(d3, root=tmp, out=None, budget_s=None, date="2026-11-30")
        check(os.path.exists(out3), "empty: written")
        check("error" in r3["gpu"] and "error" in r3["tests"] and "error" in r3["engine"]["fp16"]
              and "error" in r3["peers"], "empty: errors")
        check(r3["ratios"] == {}, "empty: no ratios")
        tab3 = table(r3)
        check("| FP16 ms / image | error:" in tab3, "empty: table %r" % tab3)

        # 4. garbage everywhere
        d4 = os.path.join(tmp, "garbage")
        os.makedirs(d4)
        for name in ("steps.tsv", "gpu.fields", "gpu.csv", "tests.log", "engine_fp16.json", "peers.json",
                     "peers_compile.json"):
            with open(os.path.join(d4, name), "wb") as f:
                f.write(b"\xff\xfe[1, 2\tx\n\x00garbage")
        with open(os.path.join(d4, "engine_fp8.json"), "w") as f:
            f.write("[1, 2, 3]")
        out4, r4 = merge(d4, root=tmp, out=None, budget_s=1, date="2026-11-30")
        check("error" in r4["engine"]["fp16"] and "not a JSON object" in r4["engine"]["fp8"]["error"],
              "garbage engine %r" % r4["engine"])
        table(r4)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print("SELFTEST FAILED:")
        for f in failures:
            print("  - " + f)
        return 1
    print("selftest: ok (4 scenarios: full run, compile skipped + FP8, empty directory, garbage files)")
    return 0


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge gpu_check.sh's output directory into one JSON file")
    m.add_argument("--dir", required=True, help="gpu_check.sh's output directory ($OUT)")
    m.add_argument("--out", default=None, help="default: DIR/gpu-check-<UTC date>.json")
    m.add_argument("--root", default=".", help="project root (commit, bundle)")
    m.add_argument("--budget-s", type=float, default=None, help="the script's time budget, recorded")
    m.add_argument("--date", default=None, help="override the UTC date (YYYY-MM-DD)")
    t = sub.add_parser("table", help="Markdown tables for the README from a merged JSON file")
    t.add_argument("file")
    sub.add_parser("selftest", help="merge + table on fake inputs")
    a = ap.parse_args(argv)
    if a.cmd == "merge":
        try:
            out, _ = merge(a.dir, root=a.root, out=a.out, budget_s=a.budget_s, date=a.date)
        except Exception as e:  # last resort: still leave a JSON file saying what happened
            import traceback
            date = a.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
            out = a.out or os.path.join(a.dir, "gpu-check-%s.json" % date)
            with open(out, "w") as f:
                json.dump({"schema": SCHEMA, "date": date, "error": "merge failed: %s: %s" % (type(e).__name__, e),
                           "traceback": traceback.format_exc()}, f, indent=1)
        print(out)
        return 0
    if a.cmd == "table":
        r, err = load_json(a.file)
        if not isinstance(r, dict):
            print("error: %s" % (err or "not a JSON object"), file=sys.stderr)
            return 1
        sys.stdout.write(table(r))
        return 0
    return selftest()


if __name__ == "__main__":
    sys.exit(main())
