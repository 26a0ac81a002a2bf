"""benchmarks/edge_latency.py on a real exported artifact: it times what a station runs, and an
artifact whose every INT8 rung was refused (FP32 only) is timed too, saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_edge_latency_times_an_fp32_only_artifact_and_names_what_ships(artifact, tmp_path):
    assert not (artifact / "detector_int8.xml").exists()
    out = tmp_path / "lat"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "edge_latency.py"), "--artifact"]
    cmd += [str(artifact), "--rounds", "1", "--per-round", "1", "--warmup", "1", "--pause", "0"]
    run = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "edge_latency.json").read_text())
    engines = {r["engine"] for r in result["rows"]}
    assert {"pytorch-fp32", "openvino-fp32", "onnxruntime-fp32"} <= engines
    assert not any("int8" in e for e in engines)
    assert result["model"].startswith(f"the artifact at {artifact};")
    assert "a station runs fp32: the artifact has no INT8 model" in result["model"]
    assert all(r["p50_ms"] > 0 for r in result["rows"])
    assert result["targets"] == {}  # the INT8 targets do not apply
    assert result["command"].startswith("python benchmarks/edge_latency.py --artifact ")
    assert set(result["loadavg"]) == {"before", "after"}
    assert "fp32: the artifact has no INT8 model" in (out / "edge_latency.md").read_text()
