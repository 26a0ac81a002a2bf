"""Smoke runs of the benchmark scripts in their tiny modes, so a script cannot rot unnoticed.

`benchmarks/runtime_throughput.py --tiny` builds a tiny INT8 artifact through the real export and
quantization, starts a real mosquitto and the real `lineguard run`, and measures one short row.
Only the shape and the internal consistency of the results are checked here, never speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_ROW = {
    "stations",
    "event_rate",
    "fps_per_station",
    "fps_total",
    "decision_latency_p95_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "dropped_frames",
    "cpu_percent",
    "rss_mb",
    "offered_fps_per_station",
    "machine_cpu_percent",
    "load_1m",
}


@pytest.mark.timeout(180)
def test_runtime_throughput_tiny(tmp_path: Path) -> None:
    if not Path("/usr/sbin/mosquitto").exists() and not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "runtime_throughput.py"),
        "--tiny",
        "--stations",
        "1",
        "--event-rates",
        "0.05",
        "1.0",
        "--seconds",
        "2.5",
        "--warmup",
        "0.5",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / "runtime_throughput.json").read_text())
    assert isinstance(result["cpu"], str) and result["cpu"]
    assert result["command"].startswith("python benchmarks/runtime_throughput.py --tiny")
    rows = result["rows"]
    assert [(r["stations"], r["event_rate"]) for r in rows] == [(1, 0.05), (1, 1.0)]
    table = (out / "runtime_throughput.md").read_text()
    assert "| stations |" in table
    for row in rows:
        assert set(row) >= REQUIRED_ROW
        assert row["fps_per_station"] > 0 and row["fps_total"] >= row["fps_per_station"]
        assert row["decision_latency_p50_ms"] <= row["decision_latency_p95_ms"]
        assert row["dropped_frames"] >= 0
        assert row["cpu_percent"] > 0 and row["rss_mb"] > 50
        assert f"| 1 | {row['event_rate']} (" in table
    # Every frame of the 1.0 row carries a drawn defect: the MES received events, published
    # after their decision (1 ms slack: `captured_at` on the wire has millisecond resolution).
    row = rows[1]
    assert row["events_in_window"] > 0
    assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
    assert row["latency_p50_ms"] >= row["event_decision_latency_p50_ms"] - 1.0
    assert row["latency_p95_ms"] >= row["event_decision_latency_p95_ms"] - 1.0


def _tiny_mvtec(root: Path, size: int, seed: int) -> Path:
    """One class of generated parts, MVTec layout, with a few drawn defects and their masks."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    cat = root / "part"
    for split, n in (("train", 12), ("test", 3)):
        for i in range(n):
            img = cv2.GaussianBlur(rng.random((size, size, 3)).astype(np.float32), (0, 0), 2)
            path = cat / split / "good" / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), (img * 255).astype(np.uint8))
    for i in range(3):
        img = cv2.GaussianBlur(rng.random((size, size, 3)).astype(np.float32), (0, 0), 2) * 255
        mask = np.zeros((size, size), np.uint8)
        mask[8:20, 10:24] = 255
        img[mask > 0] = 250
        for sub, arr in (("test/dent", img), ("ground_truth/dent", mask)):
            path = cat / sub / (f"{i:02d}.png" if sub.startswith("test") else f"{i:02d}_mask.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), arr.astype(np.uint8))
    return root


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gpu_train_script_runs_on_cpu_with_a_tiny_budget(tmp_path: Path) -> None:
    """The one prepared GPU call, run here on the CPU: packs in, train_<ds>_gpu.json out."""
    packs = tmp_path / "packs"
    for name, seed in (("piped", 0), ("mtd", 1)):
        data = _tiny_mvtec(tmp_path / name, 48, seed)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from lineguard.runtime.cli import main; main()",
                "data",
                "pack",
                "--data",
                str(data),
                "--size",
                "128",
                "--out",
                str(packs / f"{name}.npz"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    env = {
        **__import__("os").environ,
        "DEVICE": "cpu",
        "BUDGET": "12s",
        "PYTHON": sys.executable,
        "WORK": str(tmp_path / "work"),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_train.sh"), str(out), str(packs)],
        capture_output=True,
        text=True,
        timeout=380,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("piped", "mtd"):
        result = json.loads((out / f"train_{name}_gpu.json").read_text())
        assert result["budget_s"] == 12 and result["wall_time_s"] <= 12
        assert result["device"].startswith("cpu") and result["curve"]
        assert 0.0 <= result["mean"]["image_auroc"] <= 1.0
    assert "end " in (out / "gpu_train.log").read_text()


@pytest.mark.timeout(600)
def test_tiling_bsdata_tiny(tmp_path: Path) -> None:
    """Resized vs tiled on generated wide frames: both modes train, evaluate and are judged at
    the original size; the JSON has the commands, tiles per image, peers and targets."""
    out = tmp_path / "tiling.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tiling_bsdata.py"), "--tiny"]
    cmd += ["--out", str(out), "--work", str(tmp_path / "work")]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=580)
    res = json.loads(out.read_text())
    assert res["metrics_at"] == "original image size" and res["tiny"] is True
    assert res["modes"]["resized"]["tiles"] == 1 and res["modes"]["tiled"]["tiles"] > 1
    for row in res["modes"].values():
        assert set(row["mean"]) == {"image_auroc", "pixel_ap", "aupro"}
        assert all(c.startswith("lineguard ") for c in row["command"])
        assert set(row["training"]) == {"budget_s", "wall_time_s", "steps"}
        assert row["training"]["wall_time_s"] > 0 and row["training"]["budget_s"] is None  # epochs
    assert any(c.startswith("lineguard data tile") for c in res["modes"]["tiled"]["command"])
    assert any("--tile-scale" in c for c in res["modes"]["tiled"]["command"])
    assert res["peers"]["patchcore"]["pixel_ap"] == 0.523 and len(res["targets"]) == 5
    # 2-px lines: the square resize washes them out, the tiles at native scale do not
    assert res["modes"]["tiled"]["mean"]["pixel_ap"] > res["modes"]["resized"]["mean"]["pixel_ap"]


REQUIRED_TILED = {
    "engine",
    "scope",
    "mode",
    "graph",
    "calls_per_frame",
    "frame",
    "tile_scale",
    "tiles",
    "p50_ms",
    "p95_ms",
    "p50_ms_per_tile",
    "p95_ms_per_tile",
    "shipped_rung",
    "float_ops_run",
    "threads",
    "cpu",
    "load_avg_before",
    "load_avg_after",
}


@pytest.mark.timeout(400)
def test_edge_latency_tiled_tiny_merges_rows(tmp_path: Path) -> None:
    """Tiled frame, tiny model: one call per tile (static and dynamic graph) and one batched
    call land as rows in a copy of the committed edge_latency.json; the batch-1 rows survive,
    an older tiled row is replaced, and a batch-1 rewrite keeps the tiled rows."""
    import importlib.util

    out = tmp_path / "results"
    out.mkdir()
    committed = json.loads((ROOT / "benchmarks/results/edge_latency.json").read_text())
    # the batch-1 part of the committed file (it may already hold tiled rows of a real run)
    committed = {k: v for k, v in committed.items() if k != "tiled"}
    committed["rows"] = [r for r in committed["rows"] if r.get("scope") != "tiled_frame"]
    stale = {**committed["rows"][0], "scope": "tiled_frame", "mode": "stale"}
    (out / "edge_latency.json").write_text(
        json.dumps({**committed, "rows": [*committed["rows"], stale]}, indent=2)
    )
    cmd = [sys.executable, str(ROOT / "benchmarks" / "edge_latency_tiled.py"), "--tiny"]
    cmd += ["--tiled-frame", "320x180", "--tile-scale", "2", "--rounds", "2", "--per-round", "1"]
    cmd += ["--warmup", "1", "--pause", "0", "--calib", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=390, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / "edge_latency.json").read_text())
    assert result["rows"][: len(committed["rows"])] == committed["rows"]
    assert result["speedups"] == committed["speedups"] and result["cpu"] == committed["cpu"]
    tiled = [r for r in result["rows"] if r["scope"] == "tiled_frame"]
    assert [(r["mode"], r["graph"]) for r in tiled] == [
        ("one_call_per_tile", "static-batch-1"),
        ("one_call_per_tile", "dynamic-batch"),
        ("batched", "dynamic-batch"),
    ]
    tiles = 6  # 320x180 at scale 2 = 160x90 canvas, 64 px tiles, overlap 0.25: 3 x 2
    for r in tiled:
        assert set(r) >= REQUIRED_TILED and r["tiles"] == tiles and r["frame"] == "320x180"
        assert r["calls_per_frame"] == (1 if r["mode"] == "batched" else tiles)
        assert 0 < r["p50_ms"] <= r["p95_ms"]
        assert abs(r["p50_ms_per_tile"] - r["p50_ms"] / tiles) <= 0.01
        assert abs(r["p95_ms_per_tile"] - r["p95_ms"] / tiles) <= 0.01
        assert r["shipped_rung"] == "full/performance/bf16"
        assert r["float_ops_run"] in {"f32", "bf16"}  # bf16 only where the CPU has it
        assert r["cpu"] and len(r["load_avg_before"]) == len(r["load_avg_after"]) == 3
    block = result["tiled"]
    assert block["tiles"] == tiles and block["command"].startswith("python benchmarks/")
    assert block["ratios"]["batched_vs_one_call_per_tile_p50"] > 0
    assert block["batched_vs_calls_max_abs_map_diff"] < 1e-2  # same maps, one call or many
    assert isinstance(next(iter(block["targets"].values())), bool) and block["verdict"]
    table = (out / "edge_latency.md").read_text()
    assert table.startswith("# Edge latency (batch 1)") and "## Tiled frame" in table
    assert "| batched | dynamic-batch | 1 |" in table

    # edge_latency.py's own write (a batch-1 run) keeps the tiled rows and section
    spec = importlib.util.spec_from_file_location("bench_el", ROOT / "benchmarks/edge_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_merged(out, committed, bench.markdown)
    again = json.loads((out / "edge_latency.json").read_text())
    assert again["rows"] == committed["rows"] + tiled and again["tiled"] == block
    assert "## Tiled frame" in (out / "edge_latency.md").read_text()


@pytest.mark.parametrize("batched_ms", [5.0, 20.0])
def test_edge_latency_tiled_verdict_is_json_either_way(batched_ms: float) -> None:
    """Whether batching wins or loses, ratios and verdict are plain JSON (a losing run once
    wrote a numpy bool and the script died before writing its result)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_elt", ROOT / "benchmarks/edge_latency_tiled.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times = {"per_tile_static": [10.0] * 4, "per_tile_dynamic": [11.0] * 4}
    times["batched"] = [batched_ms] * 4
    r = bench.ratios(times, per_round=2)
    wins, text = bench.verdict(r)
    assert type(wins) is bool and wins == (batched_ms < 10.0)
    assert json.loads(json.dumps({"ratios": r, "wins": wins}))["wins"] == wins
    assert ("does NOT beat" in text) != wins


@pytest.mark.timeout(300)
def test_train_processes_runs_both_variants_on_generated_images(tmp_path: Path) -> None:
    """One process vs two under the same tiny budget: both train with the default recipe, the
    two-process run says so, and the ratio is computed from the rows (never asserted faster)."""
    import numpy as np
    from synthetic_parts import normal_image, write_rgb

    rng = np.random.default_rng(0)
    for ci, name in enumerate(("a", "b")):
        for i in range(10):
            write_rgb(
                tmp_path / "data" / name / "train" / "good" / f"{i}.png", normal_image(ci, rng)
            )
    out = tmp_path / "procs.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_processes.py")]
    cmd += ["--data", str(tmp_path / "data")]
    cmd += ["--budget", "30s", "--work", str(tmp_path / "work"), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=280)
    res = json.loads(out.read_text())
    one, two = res["runs"].values()
    assert (one["processes"], two["processes"]) == (1, 2)
    assert all(r["steps"] > 0 and r["wall_time_s"] <= 30 for r in (one, two))
    assert res["steps_ratio_two_over_one"] == round(two["steps"] / one["steps"], 3)
    assert "--processes 2" in two["command"] and res["command"].startswith("python benchmarks/")


@pytest.mark.timeout(300)
def test_train_step_variants_times_the_default_step_on_generated_images(tmp_path: Path) -> None:
    """The eager step of the default CPU recipe is timed per round on generated images (the
    compiled variant is left to the real benchmark: its C++ compile takes minutes here)."""
    import numpy as np
    from synthetic_parts import normal_image, write_rgb

    rng = np.random.default_rng(1)
    for i in range(12):
        write_rgb(tmp_path / "data" / "a" / "train" / "good" / f"{i}.png", normal_image(0, rng))
    out = tmp_path / "steps.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step_variants.py")]
    cmd += ["--data", str(tmp_path / "data"), "--steps", "3", "--variants", "eager"]
    subprocess.run([*cmd, "--out", str(out)], check=True, cwd=tmp_path, timeout=280)
    res = json.loads(out.read_text())
    row = res["variants"]["eager"]
    assert len(row["seconds_per_step"]) == 2 and all(s > 0 for s in row["seconds_per_step"])
    assert row["mean_s"] == round(sum(row["seconds_per_step"]) / 2, 4)
    assert res["recipe"]["batch_size"] == 4 and res["recipe"]["backbone"].startswith("tf_")
    assert "compile_over_eager" not in res and res["command"].startswith("python benchmarks/")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_ranking_scores_every_evaluated_checkpoint_of_a_run(tmp_path: Path) -> None:
    """A tiny budgeted run with `save_evaluations` (and the weight average on, so both kinds of
    candidate are saved) leaves one checkpoint per curve point; the ranking benchmark gives each
    the closing choices, tests it, and its in-training proxy picks the weights final.pt ships."""
    import importlib.util

    import torch
    from synthetic_parts import THREADS, tiny_config

    from lineguard.train.checkpoint import read_checkpoint
    from lineguard.train.trainer import Trainer

    torch.set_num_threads(THREADS)
    data = _tiny_mvtec(tmp_path / "data", 64, 3)
    cfg = tiny_config(
        {"mvtec": [{"root": str(data)}]},
        tmp_path / "run",
        budget="15s",
        proxy_evals=2,
        val_min=4,
        ema_decay=0.9,
        save_evaluations=True,
    )
    final = Trainer(cfg, progress=False).fit()
    curve = read_checkpoint(final)["metrics"]["curve"]
    saved = sorted((tmp_path / "run" / "evaluations").glob("step*.pt"))
    assert len(saved) == len(curve) >= 3
    assert {p["weights"] for p in curve} == {"raw", "average"}

    path = ROOT / "benchmarks" / "checkpoint_ranking.py"
    spec = importlib.util.spec_from_file_location("checkpoint_ranking", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ranking.json"
    args = ["--run", str(tmp_path / "run"), "--data", str(data), "--threads", str(THREADS)]
    assert mod.main([*args, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["checkpoints"] == len(curve)
    recorded = {(p["step"], p["weights"]): p["val_proxy"] for p in curve}
    for row in res["rows"]:
        assert row["validation"]["proxy_in_training"] == recorded[(row["step"], row["weights"])]
        assert all(0.0 <= v <= 1.0 for v in row["test_for_the_report_only"].values())
    from lineguard.train.torch_model import CLOSING_BUFFERS

    picked = res["picked"]["proxy_in_training"]["checkpoint"]
    shipped = read_checkpoint(final)["state_dict"]
    same = read_checkpoint(tmp_path / "run" / "evaluations" / picked)["state_dict"]
    for key, value in shipped.items():
        if key not in CLOSING_BUFFERS:  # re-measured or fitted after the closing choices
            assert torch.equal(value, same[key]), key
    assert set(res["spearman"]) == {"proxy_in_training", "proxy", "judge", "joint"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_blur_grid_study_remakes_every_closing_choice_per_sigma(tmp_path: Path) -> None:
    """A tiny trained model: per σ the study re-chooses the match and the statistics on the
    judge set, its score is the recipe score's mean, and it names the σ the blur rule picks."""
    import importlib.util

    import torch
    from synthetic_parts import THREADS, tiny_config

    from lineguard.train.trainer import Trainer

    torch.set_num_threads(THREADS)
    data = _tiny_mvtec(tmp_path / "data", 48, 5)
    cfg = tiny_config({"mvtec": [{"root": str(data)}]}, tmp_path / "run", epochs=2, val_min=4)
    final = Trainer(cfg, progress=False).fit()
    path = ROOT / "benchmarks" / "blur_grid_study.py"
    spec = importlib.util.spec_from_file_location("blur_grid_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "blur.json"
    args = ["--checkpoint", str(final), "--data", str(data), "--sigmas", "0,4"]
    assert mod.main([*args, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["sigmas"]) == {"0", "4"} and res["test_images_read"] == 0
    assert res["stats"]["taps"] == [2, 3] and res["stats"]["constants_mb"] > 0
    for row in res["sigmas"].values():
        assert row["score"] == pytest.approx(0.5 * (row["proxy"] + row["judge"]))
        assert row["proxy"] == row["blur_rule_proxy"] and 0.0 <= row["judge_aupro"] <= 1.0
        assert row["stats_weight"] in (0.0, 0.25, 0.5, 0.75)
    assert res["sigmas"]["0"]["proxy"] != res["sigmas"]["4"]["proxy"]  # the blur was applied
    picked = max(res["sigmas"], key=lambda s: res["sigmas"][s]["blur_rule_proxy"])
    assert res["blur_rule_picks"] == picked
