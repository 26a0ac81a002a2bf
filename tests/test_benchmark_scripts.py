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
    "fps_per_station",
    "latency_p50_ms",
    "latency_p95_ms",
    "dropped_frames",
    "cpu_percent",
    "rss_mb",
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
    (row,) = result["rows"]
    assert set(row) >= REQUIRED_ROW
    assert row["stations"] == 1
    # Every frame is an event, so the station inspected frames and the MES received events.
    assert row["fps_per_station"] > 0
    assert row["events_in_window"] > 0
    assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
    # Publish happens after the decision for the same events: its percentiles cannot be lower
    # (1 ms slack: `captured_at` on the wire has millisecond resolution).
    assert row["latency_p50_ms"] >= row["decision_latency_p50_ms"] - 1.0
    assert row["latency_p95_ms"] >= row["decision_latency_p95_ms"] - 1.0
    assert row["dropped_frames"] >= 0
    assert row["cpu_percent"] > 0 and row["rss_mb"] > 50
    table = (out / "runtime_throughput.md").read_text()
    assert "| stations |" in table and f"| 1 | {row['fps_per_station']} |" in table
