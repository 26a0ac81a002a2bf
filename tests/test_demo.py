"""`make demo`'s orchestrator, in its quick variant, end to end on the committed sample line.

`python -m lineguard.deploy.demo --quick` trains for a few epochs, exports, tries INT8 without
accuracy control (its gate may refuse: the stations then run FP32, which this also exercises),
calibrates, builds and signs a bundle, installs it, starts a real mosquitto and runs the runtime
from `current`. Checked here: the run succeeds, the MQTT messages the demo recorded are valid
against their schemas, defect alerts arrive for impurity frames and none for good frames, every
frame was inferred, the runtime stopped cleanly, and the report shows what was received.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from lineguard.deploy.demo.support import find_mosquitto
from lineguard.runtime import events as ev

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FRAMES_PER_STATION = 12  # 6 test/good + 6 test/impurity per paper type


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lineguard.deploy.demo", "--quick", "--threads", "2", "--out", out],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    return out, proc


def _messages(out: Path) -> list[dict]:
    lines = (out / "mqtt-messages.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_quick_demo_succeeds_with_alerts_over_mqtt(demo):
    out, proc = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "defect alert(s) received over MQTT" in proc.stdout
    assert "runtime exit code 0" in proc.stdout
    for step in ("[1/11] Train", "[3/11] Export", "[7/11] Build", "[9/11] Install"):
        assert step in proc.stdout
    assert (out / "edge" / "current" / "site.yaml").is_file()


def test_recorded_payloads_match_their_schemas(demo):
    out, _ = demo
    bundle_schema = json.loads((ROOT / "deploy" / "schemas" / "bundle.schema.json").read_text())
    names = {
        "status": "status",
        "defect": "defect",
        "stats": "stats",
        "state": "threshold_state",
    }
    checked = 0
    for m in _messages(out):
        leaf = m["topic"].rsplit("/", 1)[-1]
        if leaf == "bundle":
            jsonschema.validate(m["payload"], bundle_schema)
        elif leaf == "available":
            assert m["payload"] in ("online", "offline")
        elif "/evidence/" in m["topic"]:
            assert m["payload"].endswith(" bytes>")  # a JPEG, recorded as its size
            continue
        else:
            assert ev.schema_errors(names[leaf], m["payload"]) == [], m
        checked += 1
    assert checked > 10


def test_alerts_only_for_impurity_frames_and_every_frame_inferred(demo):
    out, _ = demo
    msgs = _messages(out)
    defects = [m["payload"] for m in msgs if m["topic"].endswith("/defect")]
    assert defects, "no defect alert was received over MQTT"
    for d in defects:  # the replay folder interleaves good (even ids) and impurity (odd ids)
        frame = sorted((out / "replay" / d["station"]).iterdir())[d["frame_id"]]
        assert "_impurity_" in frame.name, f"false alarm on {frame.name}"
        assert d["regions"], d
    evidence = {m["topic"].rsplit("/", 1)[-1] for m in msgs if "/evidence/" in m["topic"]}
    assert {d["event_id"] for d in defects} <= evidence
    last = {}
    for m in msgs:
        if m["topic"].endswith("/stats"):
            last[m["payload"]["station"]] = m["payload"]
    assert set(last) == {"paper-flr02", "paper-bdp01"}
    for station, stats in last.items():
        assert stats["frames"] == FRAMES_PER_STATION, station
        assert stats["dropped_frames"] == 0
        assert stats["events"] == sum(1 for d in defects if d["station"] == station)
    statuses = [m["payload"] for m in msgs if m["topic"].endswith("/status")]
    final = {s["station"]: s for s in statuses}
    assert {s["state"] for s in final.values()} == {"offline"}
    assert {s["reason"] for s in final.values()} == {"runtime stopped"}


def test_report_shows_the_run(demo):
    out, _ = demo
    html = (out / "report.html").read_text()
    n = sum(1 for m in _messages(out) if m["topic"].endswith("/defect"))
    assert f"<b>{n} defect alert(s)</b> received over MQTT" in html
    assert html.count("data:image/jpeg;base64,") == n  # an evidence thumbnail per alert
    for station in ("paper-flr02", "paper-bdp01"):
        assert station in html
