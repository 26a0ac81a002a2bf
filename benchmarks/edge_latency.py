"""Edge latency: PyTorch vs ONNX Runtime vs OpenVINO f32 / bf16 / INT8 on this CPU.

One run, batch 1, `--threads` CPU threads (default 2, the edge PC), at each input size:
* `detector` scope: one `detect(frame at input size, prompt tokens)` call of the engine;
* `end_to_end` scope: JPEG camera frame bytes -> cv2 decode -> RGB -> INTER_AREA resize ->
  detect -> score normalisation and pixel/image threshold (what a station does per frame).
Engines are timed in interleaved rounds so background load hits them alike. fps = 1000 / mean ms
of the sequential loop. size_mb = the files the engine loads (prompt encoder + detector).

Default model: the real lite2 configuration (hidden 256, 4+4 layers, pretrained backbone from the
weight package, random transformer head: latency does not depend on the head's values), INT8
calibrated on synthetic frames. `--artifact DIR` times a real exported+quantized artifact instead.

    .venv/bin/python benchmarks/edge_latency.py                   # 224 and 256, writes results
    .venv/bin/python benchmarks/edge_latency.py --artifact runs/art --out /tmp/lat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the engines timed here (model build, one detect per runtime) live in their own module
from edge_latency_engines import build_random, engines, from_artifact, synthetic_frames

# the tiled-frame rows of edge_latency_tiled.py share the results file; this script keeps them
from edge_latency_report import TILED, write, write_merged

ENGINES = ("pytorch-fp32", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "openvino-int8")
RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = info.get("Model name", "").strip() or platform.machine()
    flags = info.get("Flags", "")
    extras = [
        f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_int8") if f in flags.split()
    ]
    return f"{name} ({', '.join(extras)})" if extras else name


def end_to_end(detect: Callable, size: int, norm: tuple, thr: tuple) -> Callable[[bytes], tuple]:
    """Frame bytes -> decision, the per-frame work of a station."""
    ic, isc, pc, psc = norm

    def run(jpeg: np.ndarray) -> tuple[bool, int]:
        bgr = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        amap, score = detect(rgb)
        defect_px = int(np.count_nonzero((amap - pc) / psc > thr[1]))
        return (score - ic) / isc > thr[0], defect_px

    return run


def time_rounds(
    jobs: dict[str, Callable[[], object]],
    rounds: int,
    per_round: int,
    warmup: int,
    pause: float = 0.3,
) -> dict[str, list[float]]:
    """Interleaved timing: every round runs each job `per_round` times.

    A pause between jobs lets the previous engine's worker threads (OpenMP/TBB spin-waits) go
    idle, so one engine's threads never steal the cores from the next one.
    """
    for job in jobs.values():
        for _ in range(warmup):
            job()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            time.sleep(pause)
            for _ in range(per_round):
                t0 = time.perf_counter()
                job()
                times[name].append((time.perf_counter() - t0) * 1000.0)
    return times


def row(engine: str, size: int, scope: str, ms: list[float], mb: float) -> dict:
    return {
        "engine": engine,
        "input_size": size,
        "scope": scope,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "fps": round(1000.0 / statistics.fmean(ms), 1),
        "size_mb": mb,
    }


def bench_size(built: dict, size: int, args: argparse.Namespace) -> list[dict]:
    table = engines(built, args.threads)
    frame = synthetic_frames(1, args.frame_h, args.frame_w, seed=5)[0]
    ok, jpeg = cv2.imencode(
        ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
    )
    assert ok
    rgb = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    jobs: dict[str, Callable[[], object]] = {}
    for name in table:
        det = table[name][0]
        jobs[f"{name}|detector"] = (lambda d: lambda: d(rgb))(det)
        e2e = end_to_end(det, size, built["norm"], built["thresholds"])
        jobs[f"{name}|end_to_end"] = (lambda f: lambda: f(jpeg))(e2e)
    times = time_rounds(jobs, args.rounds, args.per_round, args.warmup, args.pause)
    rows = []
    for key, ms in times.items():
        name, scope = key.split("|")
        rows.append(row(name, size, scope, ms, table[name][1]))
    return rows


def _provenance(result: dict) -> list[str]:
    if "command" not in result:  # files written before the script recorded it
        return []
    load = result["loadavg"]
    return [f"Command: `{result['command']}`; load average {load['before']} / {load['after']}."]


def markdown(result: dict) -> str:
    lines = [
        "# Edge latency (batch 1)",
        "",
        f"CPU: {result['cpu']}; threads: {result['threads']}; frame: {result['frame']}; "
        f"model: {result['model']}.",
        *_provenance(result),
        f"{result['method']}",
        "",
        "| input | scope | engine | p50 ms | p95 ms | fps | size MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in result["rows"] if r["scope"] != TILED):
        lines.append(
            f"| {r['input_size']} | {r['scope']} | {r['engine']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['fps']} | {r['size_mb']} |"
        )
    keys = list(next(iter(result["speedups"].values())))
    lines += [
        "",
        "## Speed-ups (ratio of p50, detector)",
        "",
        "| input | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for size, s in result["speedups"].items():
        lines.append(f"| {size} | " + " | ".join(f"{s[k]}x" for k in keys) + " |")
    lines += ["", "## Targets (issue 3)", ""]
    lines += [f"- {k}: {'met' if v else 'MISSED'}" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict], ups: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The acceptance figures of issue 3, evaluated on this run."""
    out: dict[str, bool] = {}
    for size, s in ups.items():
        if "int8_vs_pytorch" not in s:
            continue
        out[f"{size}: INT8 >= 4x PyTorch FP32 (detector p50)"] = s["int8_vs_pytorch"] >= 4
        out[f"{size}: INT8 >= 1.7x OpenVINO true f32 (detector p50)"] = (
            s["int8_vs_openvino_f32"] >= 1.7
        )
    for r in rows:
        if (r["engine"], r["scope"], r["input_size"]) == ("openvino-int8", "end_to_end", 224):
            out["224: end-to-end INT8 >= 50 fps"] = r["fps"] >= 50
    return out


def speedups(rows: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for size in sorted({r["input_size"] for r in rows if r["scope"] == "detector"}):
        p50 = {
            r["engine"]: r["p50_ms"]
            for r in rows
            if r["input_size"] == size and r["scope"] == "detector"
        }
        ups: dict[str, float] = {}
        if "openvino-int8" in p50:  # an FP32-only artifact has no INT8 rows
            ups["int8_vs_pytorch"] = round(p50["pytorch-fp32"] / p50["openvino-int8"], 2)
            ups["int8_vs_openvino_f32"] = round(p50["openvino-fp32"] / p50["openvino-int8"], 2)
        ups["bf16_vs_openvino_f32"] = round(p50["openvino-fp32"] / p50["openvino-bf16"], 2)
        out[str(size)] = ups
        for name in p50:
            if name.startswith("openvino-int8-"):
                variant = name.removeprefix("openvino-")
                out[str(size)][f"{variant}_vs_pytorch"] = round(p50["pytorch-fp32"] / p50[name], 2)
                out[str(size)][f"{variant}_vs_openvino_f32"] = round(
                    p50["openvino-fp32"] / p50[name], 2
                )
    return out


def rewrite(path: Path) -> None:
    """Recompute the derived tables (speed-ups, targets, markdown) of an edge_latency.json."""
    result = json.loads(path.read_text())
    result["speedups"] = speedups(result["rows"])
    result["targets"] = targets(result["rows"], result["speedups"])
    write(path.parent, result, markdown)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 256])
    p.add_argument("--artifact", type=Path, help="time this artifact (with int8) instead")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--pause", type=float, default=0.3, help="seconds between engine blocks")
    p.add_argument("--calib", type=int, default=32, help="INT8 calibration frames (random model)")
    p.add_argument(
        "--schemes",
        nargs="*",
        default=["float-stem"],
        help="extra INT8 schemes to time (random model only)",
    )
    p.add_argument(
        "--presets",
        nargs="*",
        default=["mixed"],
        help="extra NNCF presets to time with the full scheme (random model only)",
    )
    p.add_argument("--frame-w", type=int, default=640)
    p.add_argument("--frame-h", type=int, default=480)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    if args.artifact is not None:
        built = from_artifact(args.artifact)
        size = int(built["model"].cfg.input_size)
        try:
            rows += bench_size(built, size, args)
        finally:
            shutil.rmtree(built["state"].parent, ignore_errors=True)
        model_desc = f"the artifact at {args.artifact}; a station runs {built['shipped']}"
    else:
        for size in args.sizes:
            with tempfile.TemporaryDirectory(prefix=f"lat{size}-") as tmp:
                built = build_random(
                    size, Path(tmp), args.threads, args.calib, args.schemes, args.presets
                )
                rows += bench_size(built, size, args)
        model_desc = (
            "OneNIP tf_efficientnet_lite2, hidden 256, 4+4 layers, pretrained backbone, "
            "random head; openvino-int8 = NNCF PTQ (transformer, performance preset, scheme "
            f"full) on {args.calib} synthetic frames, float ops in bf16 (tried first by the "
            "quantize ladder); "
            "openvino-int8-f32-float-ops = the same IR with float ops in f32; "
            "openvino-int8-<scheme> = the safer rungs of the quantize ladder; "
            "openvino-int8-mixed = the mixed (asymmetric) preset; "
            "onnxruntime-int8 = ONNX Runtime quantize_static (QDQ, per-channel) "
            "on the same frames"
        )
    result = {
        "command": "python benchmarks/edge_latency.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_name(),
        "loadavg": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "threads": args.threads,
        "frame": f"{args.frame_w}x{args.frame_h} JPEG q90 (end_to_end: decode, RGB, INTER_AREA "
        "resize, detect, normalise, threshold)",
        "model": model_desc,
        "method": (
            f"interleaved rounds: {args.rounds} x {args.per_round} calls per engine and "
            f"scope after {args.warmup} warm-up calls, {args.pause} s pause between blocks; "
            "fps = 1000 / mean ms; OpenVINO "
            "fp32 = INFERENCE_PRECISION_HINT f32, bf16 = hint bf16, int8 = INT8 IR with "
            "the hint the artifact's float_ops names; PyTorch eager, inference_mode, the "
            "trained module as is."
        ),
        "rows": rows,
    }
    result["speedups"] = speedups(rows)
    result["targets"] = targets(rows, result["speedups"])
    print(write_merged(args.out, result, markdown))
    return result


if __name__ == "__main__":
    main()
