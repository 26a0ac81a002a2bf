"""Issue 14, findings 1-7: one threshold validation for configs, `threshold/set`, calibrate and
deploy; every refusal answered on `threshold/error` with the field; nothing applied, audited or
echoed unless valid; no non-finite number reaches a payload; retained commands refused live too.

Most tests drive `Service.handle_threshold_command` with a recording link (no broker needed);
the retained-live test uses a real mosquitto."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from runtime_fakes import Collector, ScriptedStation, linked_service, write_site

from lineguard.runtime import events as ev
from lineguard.runtime.artifact import Thresholds as CardThresholds
from lineguard.runtime.calibration.apply import send_command, write_thresholds
from lineguard.runtime.config import ThresholdConfig
from lineguard.runtime.config_loader import ConfigError, load_site, load_station
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.service import Service
from lineguard.runtime.threshold_commands import CommandError, parse_threshold_command
from lineguard.runtime.threshold_limits import (
    AREA_MAX,
    SCORE_MAX,
    ThresholdError,
    check_thresholds,
)

BEFORE = {"image": 1.0, "pixel": 0.8, "min_area_px": 10}


@pytest.fixture
def service(tmp_path):
    with linked_service(tmp_path) as svc:
        yield svc


def _send(svc: Service, payload, retained: bool = False) -> bool:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return svc.handle_threshold_command("s1", raw, retained)


def _nothing_changed(svc: Service) -> None:
    assert svc.slots["s1"].station.thresholds() == BEFORE
    assert svc.slots["s1"].station.shadow() is None
    assert svc.audit.entries() == []
    assert svc.link.json("/threshold/state") == []


def _error(svc: Service) -> dict:
    (error,) = svc.link.json("/threshold/error")
    assert ev.schema_errors("threshold_error", error) == []
    return error


OVERFLOW_INT = b'{"image": 1' + b"0" * 400 + b', "by": "a", "reason": "r"}'
HUGE_INT = b'{"image": 1' + b"0" * 5000 + b', "by": "a", "reason": "r"}'
DEEP = b"[" * 100000 + b"]" * 100000


@pytest.mark.parametrize(
    ("raw", "field", "part"),
    [
        # finding 1: JSON 1e999 parses as infinity
        (b'{"image": 1e999, "by": "a", "reason": "r", "request_id": "r1"}', "image", "finite"),
        # finding 2
        (b'{"pixel": -1e999, "by": "a", "reason": "r", "request_id": "r1"}', "pixel", "finite"),
        # finding 3: shadow
        (b'{"image": 1e999, "shadow": true, "by": "a", "reason": "r"}', "image", "finite"),
        # finding 5: bounds
        (b'{"image": -5, "by": "a", "reason": "r"}', "image", "> 0"),
        (b'{"pixel": -0.5, "by": "a", "reason": "r"}', "pixel", "> 0"),
        (b'{"image": 0, "by": "a", "reason": "r"}', "image", "> 0"),
        (b'{"image": 1e308, "by": "a", "reason": "r"}', "image", "<= 1000"),
        (
            b'{"min_area_px": 1000000000000000000000000000000, "by": "a", "reason": "r"}',
            "min_area_px",
            "between 1 and",
        ),
        (b'{"min_area_px": true, "by": "a", "reason": "r"}', "min_area_px", "integer"),
        (b'{"min_area_px": 2.5, "by": "a", "reason": "r"}', "min_area_px", "integer"),
        (b'{"image": "1.5", "by": "a", "reason": "r"}', "image", "number"),
        # finding 6: an integer above 1.8e308 (OverflowError when made a float)
        (OVERFLOW_INT, "image", "<= 1000"),
        (HUGE_INT, None, "not JSON the runtime accepts"),
        (DEEP, None, "nested too deeply"),
        # schema errors name their field too
        (b'{"image": 1.0, "reason": "r"}', "by", "'by' is a required property"),
        (b'{"image": 1.0, "by": "a", "reason": "r", "extra": 1}', "extra", "unexpected"),
        (b"[1, 2]", None, "JSON object"),
    ],
)
def test_refused_commands_are_answered_with_field_and_change_nothing(service, raw, field, part):
    assert _send(service, raw) is False
    error = _error(service)
    assert error["field"] == field, error
    assert part in error["error"], error["error"]
    _nothing_changed(service)


def test_valid_command_is_applied_audited_and_echoed_exactly(service):
    cmd = {"image": 2.5, "pixel": 1.25, "min_area_px": 7, "by": "a", "reason": "r"}
    assert _send(service, {**cmd, "request_id": "ok1"}) is True
    want = {"image": 2.5, "pixel": 1.25, "min_area_px": 7}
    assert service.slots["s1"].station.thresholds() == want
    (state,) = service.link.json("/threshold/state")
    assert state["active"] == want and state["request_id"] == "ok1"
    assert service.audit.entries()[-1]["new"]["active"] == want
    assert service.link.json("/threshold/error") == []


def test_refused_when_the_audit_log_cannot_be_written(service, tmp_path):
    service.audit.path = tmp_path  # a folder: the append fails
    assert _send(service, {"image": 2.0, "by": "a", "reason": "r"}) is False
    assert "audit log not written" in _error(service)["error"]
    assert service.slots["s1"].station.thresholds() == BEFORE
    assert service.link.json("/threshold/state") == []


def test_stats_keep_flowing_after_a_refused_shadow(service):
    """Finding 3: `{"image": 1e999, "shadow": true}` stopped the stats topic for good."""
    _send(service, b'{"image": 1e999, "shadow": true, "by": "a", "reason": "r"}')
    for _topic, payload in service.stats_messages():
        ev.encode(payload)  # strict JSON: raises on a non-finite number
        assert ev.schema_errors("stats", payload) == []


def test_bounds_are_the_same_in_the_json_schemas():
    for name in ("threshold_set", "threshold_values"):
        props = ev.load_schema(name)["properties"]
        assert props["image"]["exclusiveMinimum"] == 0 and props["image"]["maximum"] == SCORE_MAX
        assert props["pixel"]["maximum"] == SCORE_MAX
        assert props["min_area_px"]["maximum"] == AREA_MAX


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "-5", "0", "1e308", "'1.0'"])
def test_station_file_with_bad_threshold_is_refused(tmp_path, value):
    """Finding 4: `thresholds.image: .nan` passed validate-config and never alerted."""
    write_site(tmp_path, None)
    path = tmp_path / "stations" / "s1.yaml"
    path.write_text(path.read_text().replace("image: 1.0", f"image: {value}"))
    with pytest.raises(ConfigError, match=r"thresholds\.image"):
        load_station(path, check_files=False)


def test_config_models_card_and_parser_share_one_rule():
    for bad in (float("nan"), float("inf"), -1.0, 0.0, 1001.0, True, "2"):
        with pytest.raises(ValueError):
            ThresholdConfig(image=bad)
        with pytest.raises(ValueError):
            CardThresholds(image=bad, pixel=1.0)
        with pytest.raises(ThresholdError):
            check_thresholds({"image": bad})
        with pytest.raises(CommandError):
            parse_threshold_command(json.dumps({"image": bad, "by": "a", "reason": "r"}).encode())
    assert ThresholdConfig(image=1000, pixel=1e-9, min_area_px=AREA_MAX).image == 1000.0


def test_calibrate_refuses_out_of_bounds_values(tmp_path):
    site = load_site(write_site(tmp_path, {"host": "127.0.0.1", "port": 1}), check_files=False)
    station = tmp_path / "stations" / "s1.yaml"
    with pytest.raises(LineGuardError, match="finite"):
        write_thresholds(station, {"image": float("inf")})
    with pytest.raises(LineGuardError, match="> 0"):
        write_thresholds(station, {"pixel": -0.5})
    cfg = load_station(station, check_files=False)
    cmd = {"image": float("nan"), "by": "a", "reason": "r"}
    with pytest.raises(LineGuardError, match="would be refused"):
        send_command(site.site, cfg, cmd, timeout_s=0.1)
    assert "image: 1.0" in station.read_text()


def test_retained_command_arriving_live_is_refused(tmp_path, mosquitto):
    """Finding 7: a command published with retain=true reached the running runtime without the
    flag (MQTT 3.1.1 strips it for live delivery) and was applied."""
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="live-retain")
    site = write_site(tmp_path, {"host": "127.0.0.1", "port": mosquitto.port})
    svc = Service(load_site(site, check_files=False), station_factory=ScriptedStation)
    try:
        svc.start()
        assert svc.link.wait_connected(10)
        assert sub.wait_for(lambda c: len(c.json("/threshold/state")) >= 1, 10)
        time.sleep(0.3)  # subscription in place
        raw = json.dumps({"image": 3.0, "by": "a", "reason": "r", "request_id": "ret"}).encode()
        sub.client.publish("lineguard/line1/s1/threshold/set", raw, qos=1, retain=True)
        assert sub.wait_for(lambda c: len(c.json("/threshold/error")) >= 1, 10)
        assert "retained" in sub.json("/threshold/error")[0]["error"]
        assert svc.slots["s1"].station.thresholds() == BEFORE
        assert len(sub.json("/threshold/state")) == 1
    finally:
        sub.client.publish("lineguard/line1/s1/threshold/set", b"", qos=1, retain=True)
        svc.stop()
        sub.close()


def test_deploy_refuses_a_card_with_non_finite_default(tmp_path: Path):
    """`lineguard deploy` checks model.json with the card model: the same rule applies."""
    with pytest.raises(ValueError):
        CardThresholds(image=float("nan"), pixel=1.0)
