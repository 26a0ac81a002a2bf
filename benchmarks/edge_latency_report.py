"""edge_latency.{json,md}: one results file, written by two scripts that measure different rows.

Why a module of its own: edge_latency.py measures the batch-1 rows, edge_latency_tiled.py the
tiled-frame rows (scope `tiled_frame`, plus the `tiled` section); each run replaces only its
own kind of rows and keeps the other's, so neither script erases the other's figures, and the
markdown is always rendered from the merged JSON (never edited by hand).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

TILED = "tiled_frame"  # the scope of edge_latency_tiled.py's rows
NOISE = 0.03  # ratios within 3 % of 1 get no explanation: run-to-run noise on a shared VM

WHY_CALLS = (
    "Why batching itself gains little on a CPU (mechanism, not measured here): OpenVINO already "
    "spreads ONE tile's convolutions and MatMuls over all the threads, so a batch saves only the "
    "fixed cost of a call (setting inputs, waking the threads, per-layer dispatch), small next "
    "to a tile's compute, while N tiles per call walk N times the activations per layer, which "
    "may spill out of the caches one tile's working set fits in."
)
WHY_DYNAMIC = (
    "The dynamic-batch graph is slower per call than the static one (mechanism, not measured "
    "here): with the batch unknown until inference, the CPU plugin runs shape inference through "
    "the graph on every call and cannot fix its kernels and memory plan at compile time, as it "
    "does for the one static shape."
)


def tiled_markdown(result: dict) -> str:
    """The tiled-frame section: its own CPU, load, command, table and verdict."""
    t = result["tiled"]
    rows = [r for r in result["rows"] if r["scope"] == TILED]
    lines = [
        "",
        "## Tiled frame: one call per tile vs one batched call (issue 12)",
        "",
        f"CPU: {t['cpu']}; OpenVINO CPU capabilities: "
        f"{', '.join(t['openvino_cpu_capabilities'])}; threads: {t['threads']}; load average "
        f"(1/5/15 min) before {t['load_avg_before']}, after {t['load_avg_after']}.",
        f"Frame {t['frame']} at tile scale {t['tile_scale']} (overlap {t['tile_overlap']}): "
        f"canvas {t['canvas']}, **{t['tiles']} tiles** of {t['input_size']} px. Model: "
        f"{t['model']}.",
        f"{t['method']}",
        "",
        f"Command: `{t['command']}`",
        "",
        "| mode | graph | calls/frame | p50 ms/frame | p95 ms/frame | p50 ms/tile | "
        "p95 ms/tile | fps | shipped rung | float ops run | cpu |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['mode']} | {r['graph']} | {r['calls_per_frame']} | {r['p50_ms']} | {r['p95_ms']} "
        f"| {r['p50_ms_per_tile']} | {r['p95_ms_per_tile']} | {r['fps']} | {r['shipped_rung']} "
        f"| {r['float_ops_run']} | {r['cpu']} |"
        for r in rows
    ]
    lines += ["", f"**Verdict**: {t['verdict']}", ""]
    lines += [f"- {k}: {'met' if v else 'MISSED'}" for k, v in t["targets"].items()]
    r = t["ratios"]
    calls = r["batching_on_dynamic_graph_p50"] <= 1 + NOISE
    dynamic = r.get("dynamic_graph_vs_static_one_call_per_tile_p50", 1.0) < 1 - NOISE
    lines += ["", WHY_CALLS] if calls else []
    lines += ["", WHY_DYNAMIC] if dynamic else []
    if not all(t["targets"].values()) and not (calls or dynamic):
        lines += ["", "Both parts lie within 3 % of 1: run-to-run noise decides the verdict."]
    if result.get("cpu") and result["cpu"] != t["cpu"]:
        lines += [
            "",
            f"The batch-1 rows above were measured on another CPU ({result['cpu']}); "
            "compare the tiled rows with each other only.",
        ]
    return "\n".join(lines) + "\n"


def write(out: Path, result: dict, markdown: Callable[[dict], str]) -> str:
    """Write a complete result as edge_latency.{json,md}; `markdown` renders the batch-1 part."""
    batch1 = any(r["scope"] != TILED for r in result["rows"])
    text = markdown(result) if batch1 else "# Edge latency\n"
    if "tiled" in result:
        text += tiled_markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "edge_latency.md").write_text(text)
    return text


def write_merged(out: Path, new: dict, markdown: Callable[[dict], str]) -> str:
    """Merge one script's run into `out`/edge_latency.json: a tiled run (`new` has `tiled`)
    replaces the tiled rows and section, a batch-1 run everything else; the rest is kept."""
    path = out / "edge_latency.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    tiled_run = "tiled" in new
    keep = [r for r in old.get("rows", []) if (r["scope"] == TILED) != tiled_run]
    rows = [r for r in new["rows"] if (r["scope"] == TILED) == tiled_run]
    if tiled_run:
        merged = {**old, "rows": keep + rows, "tiled": new["tiled"]}
    else:
        merged = {**new, "rows": rows + keep}
        if "tiled" in old:
            merged["tiled"] = old["tiled"]
    return write(out, merged, markdown)
