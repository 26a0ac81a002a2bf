"""Edge latency of a tiled frame: one INT8 `detect` call per tile vs all tiles in one call.

Why: a tiled station (runtime/tiling.py) runs every tile of a frame through the detector; with
`lineguard export --dynamic-batch` it sends them as ONE `detect_batch` call. Whether that pays
on an edge CPU is measured here, side by side in the interleaved rounds of edge_latency.py:
* one call per tile on the static batch-1 graph (what `lineguard export` writes by default);
* one call per tile on the dynamic-batch graph (the price of the dynamic shape alone);
* all tiles in one `detect_batch` call on the dynamic-batch graph.
Each tile carries its own position's prompt tokens (tiling prompt `per-tile`). Timed: the
detector calls of one frame's tiles (resize to the canvas, cut and stitch are identical in both
modes and stay outside). Per-tile figures are the per-frame figures / tiles.

The rows are MERGED into edge_latency.json (previous tiled rows replaced, the others kept) and
edge_latency.md is re-rendered; edge_latency.py keeps these rows when it rewrites the file.

    .venv/bin/python benchmarks/edge_latency_tiled.py                      # 1920x1080, scale 2
    .venv/bin/python benchmarks/edge_latency_tiled.py --artifact runs/art_dyn --out /tmp/lat
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import edge_latency as el  # the sibling scripts: timing, model and results helpers
from edge_latency_engines import file_mb, synthetic_frames
from edge_latency_report import TILED, write_merged
from throughput_inputs import model_config

from lineguard.runtime.tiling import cut, make_grid, prompt_tokens, to_canvas

RUNG = {"scheme": "full", "preset": "performance", "float_ops": "bf16"}  # quantize tries first
ISA = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
MODES = {  # job name -> (mode, graph)
    "per_tile_static": ("one_call_per_tile", "static-batch-1"),
    "per_tile_dynamic": ("one_call_per_tile", "dynamic-batch"),
    "batched": ("batched", "dynamic-batch"),
}


def cpu_flags() -> list[str]:
    """The SIMD flags that decide INT8/bf16 speed (the committed rows come from different CPUs)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return []
    return [f for f in ISA if f in flags]


def cpu_desc() -> str:
    name = el.cpu_name().split(" (", 1)[0]
    return f"{name} ({', '.join(cpu_flags()) or 'no AVX2'})"


def build(size: int, work: Path, threads: int, calib: int, tiny: bool) -> dict[str, dict]:
    """Random-head OneNIP exported twice (static batch 1, dynamic batch), each detector INT8 by
    NNCF with the rung `lineguard quantize` tries first, calibrated on the same synthetic frames.
    Returns graph -> {encoder, detector, rung, size}."""
    import openvino as ov
    import torch

    from lineguard.compress.export import export_graphs
    from lineguard.compress.quantize import INT8_DETECTOR, nncf_quantize
    from lineguard.runtime.engine import OpenVINORunner
    from lineguard.train.torch_model import OneNIP, OneNIPConfig

    torch.manual_seed(0)
    cfg = model_config(tiny=True) if tiny else OneNIPConfig(input_size=size)
    model = OneNIP(cfg, pretrained=True).eval()
    size = cfg.input_size
    frames = synthetic_frames(calib + 1, size, size, seed=1)
    graphs: dict[str, dict] = {}
    for graph, dynamic in (("static-batch-1", False), ("dynamic-batch", True)):
        d = work / graph
        d.mkdir(parents=True)
        export_graphs(model, d, dynamic_batch=dynamic)
        fp32 = OpenVINORunner(d / "prompt_encoder.xml", d / "detector.xml", "fp32", threads)
        tokens = fp32.encode_prompt(frames[0])
        items = [{"image": f[None], "prompt_tokens": tokens} for f in frames[1:]]
        int8 = nncf_quantize(
            d / "detector.xml", items, scheme=RUNG["scheme"], preset=RUNG["preset"]
        )
        ov.save_model(int8, str(d / INT8_DETECTOR), compress_to_fp16=False)
        rung = {
            **RUNG,
            "chosen_by": "the first rung `lineguard quantize` tries (no gate: the head is random)",
        }
        graphs[graph] = {
            "encoder": d / "prompt_encoder.xml",
            "detector": d / INT8_DETECTOR,
            "rung": rung,
            "size": size,
        }
    return graphs


def from_artifact(root: Path) -> dict:
    """An exported and quantized artifact's INT8 graphs and the rung its INT8 gate kept."""
    from lineguard.runtime.artifact import load_card

    card = load_card(root)
    if "int8" not in card.precisions:
        raise SystemExit(f"{root}: no int8 model; run `lineguard quantize` first")
    int8 = card.precisions["int8"]
    found = re.search(r"(\w+) preset, scheme ([\w-]+)", int8.method)
    rung = {
        "scheme": found[2] if found else "unknown",
        "preset": found[1] if found else "unknown",
        "float_ops": int8.float_ops,
        "chosen_by": f"the INT8 gate ({root}/model.json)",
    }
    files = int8.files
    return {
        "encoder": root / files["prompt_encoder"],
        "detector": root / files["detector"],
        "rung": rung,
        "size": int(card.input_size[0]),
    }


def model_files(path: Path) -> list[Path]:
    """A graph's files on disk: an OpenVINO IR's .xml and .bin, or one .onnx."""
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def per_round_medians(ms: list[float], per_round: int) -> list[float]:
    return [statistics.median(ms[i : i + per_round]) for i in range(0, len(ms), per_round)]


def frame_job(r: Any, tiles: np.ndarray, tokens: np.ndarray, batched: bool) -> Callable:
    """All tiles of one frame: one `detect_batch` call, or one `detect` call per tile."""
    if batched:
        return lambda: r.detect_batch(tiles, tokens)
    return lambda: [r.detect(x, tokens[i : i + 1]) for i, x in enumerate(tiles)]


def bench(graphs: dict[str, dict], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Interleaved rounds of the three modes on one frame; (rows, figures of the run)."""
    from lineguard.runtime.engine import OpenVINORunner

    w, h = args.tiled_frame
    frame = synthetic_frames(1, h, w, seed=5)[0]
    golden = synthetic_frames(1, h, w, seed=6)[0]
    size = graphs["dynamic-batch"]["size"]  # tiles are model-input sized
    grid = make_grid(w, h, size, args.tile_scale, args.overlap)
    tiles = cut(to_canvas(frame, grid), grid)
    runners, tokens, jobs = {}, {}, {}
    for key, (mode, graph) in MODES.items():
        if graph not in graphs:  # --artifact without --static-artifact
            continue
        g = graphs[graph]  # one compiled model per mode: a station only ever sees one shape
        r = OpenVINORunner(
            g["encoder"], g["detector"], "int8", args.threads, float_ops=g["rung"]["float_ops"]
        )
        runners[key], tokens[key] = r, prompt_tokens(r, golden, grid, "per-tile")
        if graph == "dynamic-batch" and not (r.batch_images and r.batch_tokens):
            raise SystemExit(
                f"{g['detector']}: static batch; export with `lineguard export --dynamic-batch`"
            )
        jobs[key] = frame_job(r, tiles, tokens[key], batched=mode == "batched")
    # not timed: one batched call returns what the calls per tile return
    maps, _ = jobs["batched"]()
    ref = np.stack([m for m, _ in jobs["per_tile_dynamic"]()])
    load_before = [round(v, 2) for v in os.getloadavg()]
    times = el.time_rounds(jobs, args.rounds, args.per_round, args.warmup, args.pause)
    load_after = [round(v, 2) for v in os.getloadavg()]
    cpu, n = cpu_desc(), grid.n
    rows = []
    for key, ms in times.items():
        mode, graph = MODES[key]
        g, r = graphs[graph], runners[key]
        p50, p95 = float(np.percentile(ms, 50)), float(np.percentile(ms, 95))
        rows.append(
            {
                "engine": "openvino-int8",
                "input_size": r.input_size[0],
                "scope": TILED,
                "mode": mode,
                "graph": graph,
                "calls_per_frame": 1 if mode == "batched" else n,
                "frame": f"{w}x{h}",
                "tile_scale": args.tile_scale,
                "tile_overlap": args.overlap,
                "canvas": f"{grid.canvas_hw[1]}x{grid.canvas_hw[0]}",
                "tiles": n,
                "p50_ms": round(p50, 2),
                "p95_ms": round(p95, 2),
                "p50_ms_per_tile": round(p50 / n, 3),
                "p95_ms_per_tile": round(p95 / n, 3),
                "fps": round(1000.0 / statistics.fmean(ms), 2),
                "size_mb": file_mb(*model_files(g["encoder"]), *model_files(g["detector"])),
                "shipped_rung": "/".join(g["rung"][k] for k in ("scheme", "preset", "float_ops")),
                "float_ops_run": r.inference_precision,
                "threads": args.threads,
                "cpu": cpu,
                "load_avg_before": load_before,
                "load_avg_after": load_after,
            }
        )
    figures = {
        "times": times,
        "grid": grid,
        "load": (load_before, load_after),
        "batched_vs_calls_max_abs_map_diff": float(np.abs(maps - ref).max()),
    }
    return rows, figures


def ratios(times: dict[str, list[float]], per_round: int) -> dict[str, float | str]:
    """Speed of batching: p50 (and p95) of one call per tile / batched (> 1: batching is faster),
    split into the dynamic graph's own cost and the gain of batching on that graph."""
    p = {k: (float(np.percentile(v, 50)), float(np.percentile(v, 95))) for k, v in times.items()}
    base = "per_tile_static" if "per_tile_static" in p else "per_tile_dynamic"
    meds = {k: per_round_medians(v, per_round) for k, v in times.items()}
    won = sum(a > b for a, b in zip(meds[base], meds["batched"], strict=True))
    out: dict[str, float | str] = {
        "baseline": MODES[base][1],
        "batched_vs_one_call_per_tile_p50": round(p[base][0] / p["batched"][0], 3),
        "batched_vs_one_call_per_tile_p95": round(p[base][1] / p["batched"][1], 3),
        "rounds_batched_faster": f"{won}/{len(meds['batched'])}",
        "batching_on_dynamic_graph_p50": round(p["per_tile_dynamic"][0] / p["batched"][0], 3),
    }
    if base == "per_tile_static":
        out["dynamic_graph_vs_static_one_call_per_tile_p50"] = round(
            p["per_tile_static"][0] / p["per_tile_dynamic"][0], 3
        )
    return out


def verdict(r: dict) -> tuple[bool, str]:
    """Whether batching beats one call per tile on this run, and what the split says."""
    ratio, won = r["batched_vs_one_call_per_tile_p50"], r["rounds_batched_faster"]
    a, b = (int(x) for x in won.split("/"))
    wins = bool(ratio > 1.0 and 2 * a > b)  # a plain bool: the result is JSON
    head = (
        f"batching {'beats' if wins else 'does NOT beat'} one call per tile: "
        f"{ratio}x at p50 ({r['batched_vs_one_call_per_tile_p95']}x at p95), faster "
        f"in {won} interleaved rounds."
    )
    split = (
        f" Split: batching itself, on the same dynamic graph, {r['batching_on_dynamic_graph_p50']}x"
    )
    if "dynamic_graph_vs_static_one_call_per_tile_p50" in r:
        split += (
            f"; the dynamic-batch graph called per tile vs the static graph "
            f"{r['dynamic_graph_vs_static_one_call_per_tile_p50']}x (their product ≈ "
            "the ratio above)"
        )
    return wins, head + split + "."


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiled-frame", default="1920x1080", help="frame WIDTHxHEIGHT")
    p.add_argument("--tile-scale", type=float, default=2.0, help="tiling scale (frame px/model px)")
    p.add_argument("--overlap", type=float, default=0.25, help="tiling overlap (as the default)")
    p.add_argument("--size", type=int, default=224, help="model input (built model; tiny: 64)")
    p.add_argument("--artifact", type=Path, help="a --dynamic-batch artifact with int8 instead")
    p.add_argument("--static-artifact", type=Path, help="the batch-1 export of the same model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-round", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pause", type=float, default=0.3, help="seconds between mode blocks")
    p.add_argument("--calib", type=int, default=32, help="INT8 calibration frames (built model)")
    p.add_argument("--tiny", action="store_true", help="tiny model (smoke runs)")
    p.add_argument("--out", type=Path, default=el.RESULTS)
    args = p.parse_args(argv)
    args.tiled_frame = tuple(int(v) for v in args.tiled_frame.lower().split("x"))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lat-tiled-") as tmp:
        if args.artifact is not None:
            graphs = {"dynamic-batch": from_artifact(args.artifact)}
            if args.static_artifact is not None:
                graphs["static-batch-1"] = from_artifact(args.static_artifact)
            model = f"artifact {args.artifact}"
            if args.static_artifact is not None:
                model += f" (static batch 1: {args.static_artifact})"
        else:
            graphs = build(args.size, Path(tmp), args.threads, args.calib, args.tiny)
            model = (
                "tiny OneNIP (lite0, 64 px, smoke run)"
                if args.tiny
                else "OneNIP tf_efficientnet_lite2, hidden 256, 4+4 layers, pretrained backbone, "
                "random head"
            ) + (
                f", exported twice (static batch 1, --dynamic-batch), "
                f"each detector NNCF PTQ on the same {args.calib} synthetic frames"
            )
        rows, fig = bench(graphs, args)
    import openvino as ov

    grid, r = fig["grid"], ratios(fig["times"], args.per_round)
    wins, text = verdict(r)
    tiled = {
        "command": "python benchmarks/edge_latency_tiled.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_desc(),
        "cpu_flags": cpu_flags(),
        "openvino_cpu_capabilities": list(
            ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        ),
        "threads": args.threads,
        "frame": "x".join(map(str, args.tiled_frame)) + " synthetic RGB",
        "tile_scale": args.tile_scale,
        "tile_overlap": args.overlap,
        "tiles": grid.n,
        "canvas": f"{grid.canvas_hw[1]}x{grid.canvas_hw[0]}",
        "input_size": grid.tile,
        "model": model,
        "shipped_rung": {g: v["rung"] for g, v in graphs.items()},
        "method": (
            f"interleaved rounds: {args.rounds} x {args.per_round} frames per mode after "
            f"{args.warmup} warm-up frame(s), {args.pause} s pause between blocks; a frame = the "
            "detector calls for all its tiles (OpenVINORunner.detect per tile with that tile's "
            "prompt tokens, or one detect_batch of all tiles with all tokens); INT8 IR with "
            "the float-ops hint its rung names (bf16 falls back to f32 without native bf16); "
            "per tile = per frame / tiles; fps = 1000 / mean ms per frame."
        ),
        "load_avg_before": fig["load"][0],
        "load_avg_after": fig["load"][1],
        "wall_s": round(time.monotonic() - start, 1),
        "batched_vs_calls_max_abs_map_diff": fig["batched_vs_calls_max_abs_map_diff"],
        "ratios": r,
        "verdict": text,
        "targets": {"batching beats one call per tile (issue 12: p50, most rounds)": wins},
    }
    print(write_merged(args.out, {"rows": rows, "tiled": tiled}, el.markdown))
    return tiled


if __name__ == "__main__":
    main()
