"""Calibration against a running runtime: a real mosquitto, `lineguard run` in its own process
with a real (tiny ONNX) artifact replaying image folders, and `lineguard calibrate` talking to it
over MQTT: apply live, decisions change from the next frame, audited, rollback restores; and
shadow mode publishes both counts on stats without ever alerting for the candidate."""

from __future__ import annotations

import argparse
import json
from datetime import datetime

import numpy as np
import pytest
from calibration_fixtures import (
    HIGH,
    LOW,
    defect_image,
    lineguard_run,
    make_artifact,
    normal_image,
    write_images,
    write_site,
    write_station,
)
from runtime_fakes import Collector

from lineguard.runtime import events as ev
from lineguard.runtime.audit import AuditLog
from lineguard.runtime.calibration.cli import register

pytestmark = pytest.mark.slow


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lineguard")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", *argv])
    return args.handler(args)


def _t(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@pytest.fixture
def live(tmp_path, mosquitto):
    """Site with s1 (normal frames, LOW thresholds) and s2 (defect frames, HIGH thresholds),
    `lineguard run` started as a separate process, a subscriber on everything."""
    art = make_artifact(tmp_path / "artifact")
    rng = np.random.default_rng(5)
    normal = write_images(tmp_path / "normal", [normal_image(rng) for _ in range(40)])
    defects = write_images(tmp_path / "defects", [defect_image(rng) for _ in range(10)])
    stations = tmp_path / "stations"
    cam = "{{kind: folder, path: {}, fps: 20, loop: true}}"
    s1 = write_station(stations, art, station_id="s1", camera=cam.format(normal), thresholds=LOW)
    s2 = write_station(stations, art, station_id="s2", camera=cam.format(defects), thresholds=HIGH)
    broker = {"host": "127.0.0.1", "port": mosquitto.port, "reconnect_min_s": 1}
    site = write_site(tmp_path, "stations/*.yaml", broker=broker)
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="calib-live")
    try:
        with lineguard_run(site, tmp_path / "runtime.log"):
            ok = sub.wait_for(
                lambda c: all(
                    any(json.loads(p)["state"] == "online" for p in c.by_topic[t])
                    for t in ("lineguard/line1/s1/status", "lineguard/line1/s2/status")
                ),
                60,
            )
            assert ok, (tmp_path / "runtime.log").read_text()[-3000:]
            yield {
                "tmp": tmp_path,
                "site": site,
                "s1": s1,
                "s2": s2,
                "normal": normal,
                "sub": sub,
                "audit": AuditLog(tmp_path / "state" / "audit.jsonl"),
            }
    finally:
        sub.close()


def _stats(sub: Collector, station: str) -> list[dict]:
    return sub.json(f"/line1/{station}/stats")


def _defects(sub: Collector, station: str) -> list[dict]:
    return sub.json(f"/line1/{station}/defect")


def _state(sub: Collector, station: str, request_prefix: str, timeout: float = 10.0) -> dict:
    """The newest threshold/state echo of a request; the CLI saw it on its own connection, this
    collector may get it a moment later."""

    def found(c: Collector) -> dict | None:
        for p in reversed(c.json(f"/line1/{station}/threshold/state")):
            if (p.get("request_id") or "").startswith(request_prefix):
                return p
        return None

    if not sub.wait_for(lambda c: found(c) is not None, timeout):
        raise AssertionError(f"no threshold/state with request_id {request_prefix}*")
    return found(sub)


def _frames_after(sub: Collector, station: str, count: int, timeout: float = 20.0) -> None:
    """Wait until the station's stats report `count` more inferred frames than now."""
    start = _stats(sub, station)[-1]["frames"] if _stats(sub, station) else 0
    assert sub.wait_for(
        lambda c: _stats(c, station) and _stats(c, station)[-1]["frames"] >= start + count,
        timeout,
    )


def test_calibrate_applies_live_from_the_next_frame_audits_and_rolls_back(live):
    sub, audit = live["sub"], live["audit"]
    assert sub.wait_for(lambda c: len(_defects(c, "s1")) >= 5, 20)  # LOW: every frame alerts
    out = live["tmp"] / "report"
    rc = _cli(
        "--station",
        str(live["s1"]),
        "--site",
        str(live["site"]),
        "--folder",
        str(live["normal"]),
        "--target-far",
        "0.01",
        "--out",
        str(out),
        "--apply",
        "mqtt",
        "--by",
        "qa-anna",
        "--reason",
        "recalibrate after relamping",
    )
    assert rc == 0
    report = json.loads((out / "calibration.json").read_text())
    proposed = report["proposed"]
    assert proposed["image"] > max(report["scores"]["normal"]["image"])  # the replayed frames
    state = _state(sub, "s1", "calibrate:")
    assert state["active"]["image"] == proposed["image"] and state["changed_by"] == "qa-anna"
    changed_at = _t(state["ts"])
    _frames_after(sub, "s1", 20)  # a second of frames judged with the new thresholds
    events = _defects(sub, "s1")
    before = [e for e in events if _t(e["captured_at"]) < changed_at]
    assert before and all(e["thresholds"]["image"] == 0.001 for e in before)
    # Every frame captured after the change was judged with the calibrated threshold: none of
    # these normal frames alerts, and no event ever carries the new threshold.
    assert not [e for e in events if _t(e["captured_at"]) > changed_at + 0.005]
    assert not [e for e in events if e["thresholds"]["image"] == proposed["image"]]

    entry = audit.entries("s1")[-1]
    assert (entry["action"], entry["by"]) == ("threshold/set", "qa-anna")
    assert entry["reason"].startswith("recalibrate after relamping [calibrate: target FAR 0.01")
    assert entry["old"]["active"]["image"] == 0.001
    assert entry["new"]["active"] == {**proposed, "min_area_px": 4}
    assert entry["ts"] and entry["request_id"] == state["request_id"]

    n_events = len(_defects(sub, "s1"))
    rc = _cli(
        "rollback",
        "--station",
        str(live["s1"]),
        "--site",
        str(live["site"]),
        "--apply",
        "mqtt",
        "--by",
        "qa-anna",
        "--reason",
        "line stopped: undo",
    )
    assert rc == 0
    state = _state(sub, "s1", "rollback:")
    assert state["active"] == {"image": 0.001, "pixel": 0.001, "min_area_px": 4}
    rolled_at = _t(state["ts"])
    assert sub.wait_for(
        lambda c: any(_t(e["captured_at"]) > rolled_at for e in _defects(c, "s1")), 20
    )
    assert len(_defects(sub, "s1")) > n_events
    entry = audit.entries("s1")[-1]
    assert entry["request_id"].startswith("rollback:") and entry["new"]["active"]["image"] == 0.001
    assert entry["reason"].startswith("line stopped: undo [rollback of calibrate:")
    # nothing left to undo: a second rollback is refused before touching the runtime
    from lineguard.runtime.errors import LineGuardError

    with pytest.raises(LineGuardError, match="no live threshold change"):
        _cli(
            "rollback",
            "--station",
            str(live["s1"]),
            "--site",
            str(live["site"]),
            "--apply",
            "mqtt",
            "--reason",
            "again",
        )
    for p in _stats(sub, "s1") + _defects(sub, "s1"):
        assert not ev.schema_errors(p["type"], p)


def test_shadow_candidate_is_counted_on_stats_and_never_alerts(live):
    sub, audit = live["sub"], live["audit"]
    _frames_after(sub, "s2", 5)
    rc = _cli(
        "--station",
        str(live["s2"]),
        "--site",
        str(live["site"]),
        "--folder",
        str(live["normal"]),
        "--target-far",
        "0.01",
        "--out",
        str(live["tmp"] / "r2"),
        "--shadow",
        "--reason",
        "try calibrated",
    )
    assert rc == 0
    proposed = json.loads((live["tmp"] / "r2" / "calibration.json").read_text())["proposed"]
    state = _state(sub, "s2", "calibrate:")
    assert state["active"]["image"] == 100.0  # the active threshold is unchanged
    assert state["shadow"] == {**proposed, "min_area_px": 4}

    def shadowed(c: Collector) -> bool:
        s = _stats(c, "s2")
        return bool(s) and s[-1]["shadow"] is not None and s[-1]["shadow"]["frames"] >= 20

    assert sub.wait_for(shadowed, 20)
    shadow = _stats(sub, "s2")[-1]["shadow"]
    assert shadow["thresholds"] == state["shadow"]
    # every replayed frame is defective: the candidate flags them all, the active one none,
    # and none of them raised an alert
    assert shadow["candidate_defects"] == shadow["frames"] > 0
    assert shadow["active_defects"] == 0
    assert _defects(sub, "s2") == []
    assert audit.entries("s2")[-1]["action"] == "threshold/shadow"

    assert (
        _cli(
            "clear-shadow",
            "--station",
            str(live["s2"]),
            "--site",
            str(live["site"]),
            "--reason",
            "done",
        )
        == 0
    )
    assert _state(sub, "s2", "calibrate:")["shadow"] is None
    n = len(_stats(sub, "s2"))
    assert sub.wait_for(lambda c: len(_stats(c, "s2")) > n + 1, 10)
    assert _stats(sub, "s2")[-1]["shadow"] is None
    assert _defects(sub, "s2") == []
