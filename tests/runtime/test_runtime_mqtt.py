"""The service against a real mosquitto: nothing lost across a broker outage, availability and
status, threshold/set applied + echoed + audited (or refused, changing nothing), TLS with a
generated CA, a wrong password refused (never "connected"), every payload valid."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from polling import wait_until
from runtime_fakes import Collector, ScriptedStation, write_site

from lineguard.runtime import events as ev
from lineguard.runtime.config_loader import load_site
from lineguard.runtime.mqtt import MqttLink
from lineguard.runtime.service import Service
from lineguard.runtime.site_config import BrokerConfig, TLSConfig

FAST = {"reconnect_min_s": 1, "reconnect_max_s": 2}


def _service(tmp_path: Path, broker: dict | None, stations=("s1",), stdout=None) -> Service:
    site = write_site(tmp_path, broker, stations)
    return Service(
        load_site(site, check_files=False),
        station_factory=ScriptedStation,
        stdout=stdout,
        strict_schemas=True,
    )


def _station(service: Service, sid: str = "s1") -> ScriptedStation:
    return service.slots[sid].station


def _check_schemas(sub: Collector) -> int:
    """Validate every message the collector saw against its schema; returns how many."""
    kinds = {
        "/defect": "defect",
        "/status": "status",
        "/stats": "stats",
        "/threshold/state": "threshold_state",
        "/threshold/error": "threshold_error",
    }
    n = 0
    for topic, payload, _ in list(sub.messages):
        if topic.endswith("/available"):
            assert ev.schema_errors("available", payload.decode()) == [], topic
            n += 1
            continue
        if "/evidence/" in topic or topic.endswith("/threshold/set"):
            continue
        name = next(v for k, v in kinds.items() if topic.endswith(k))
        assert ev.schema_errors(name, json.loads(payload)) == [], (topic, payload)
        n += 1
    return n


def test_broker_outage_of_10s_loses_nothing_and_duplicates_nothing(tmp_path, mosquitto):
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="outage-collector")
    service = _service(tmp_path, {"host": "127.0.0.1", "port": mosquitto.port, **FAST})
    try:
        assert sub.wait_for(lambda c: c.client.is_connected(), 10)
        service.start()
        assert service.link.wait_connected(10)
        station = _station(service)
        for i in range(20):
            station.feed(2.0 + i / 100, with_jpeg=(i % 5 == 0))
        assert sub.wait_for(lambda c: len(c.event_ids()) >= 20, 10)

        mosquitto.stop()
        assert wait_until(lambda: not service.link.connected, 10)
        outage_start = time.monotonic()
        during = 0
        while time.monotonic() - outage_start < 10.5:  # >= 10 s of outage, events keep coming
            station.feed(3.0, with_jpeg=(during % 4 == 0))
            during += 1
            time.sleep(0.25)
        assert not service.link.connected  # never "connected" without a broker
        assert service.outbox.depth() >= during  # events (and evidence) wait in the outbox
        mosquitto.start()

        assert service.link.wait_connected(15)
        expected = 20 + during
        assert sub.wait_for(lambda c: len(set(c.event_ids())) >= expected, 20)
        assert wait_until(lambda: service.outbox.depth() == 0, 10)
        ids = sub.event_ids()
        assert len(set(ids)) == expected  # every event, none invented
        assert len(ids) - len(set(ids)) <= service.publisher.window  # re-sends only, bounded
        # Evidence JPEGs arrived on their own topics, referenced by their events.
        defects = {p["event_id"]: p for p in sub.json("/defect")}
        with_evidence = [p for p in defects.values() if p["evidence"]]
        assert len(with_evidence) == 4 + (during + 3) // 4
        for p in with_evidence:
            topic = p["evidence"]["topic"]
            assert sub.wait_for(lambda c, t=topic: c.last(t) is not None, 10), topic
            assert len(sub.last(topic)) == p["evidence"]["bytes"]
        assert _check_schemas(sub) > expected
    finally:
        service.stop()
        sub.close()


def _state(payload: bytes | None) -> str | None:
    return None if payload is None else json.loads(payload)["state"]


def test_availability_status_and_stats(tmp_path, mosquitto):
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="status-collector")
    service = _service(
        tmp_path, {"host": "127.0.0.1", "port": mosquitto.port, **FAST}, stations=("s1", "s2")
    )
    try:
        service.start()
        assert sub.wait_for(lambda c: c.last("lineguard/edge1/available") == b"online", 10)
        for sid in ("s1", "s2"):
            # "offline: starting" may come first when the broker connects before the station
            # reports; what must follow is "online"
            topic = f"lineguard/line1/{sid}/status"
            assert sub.wait_for(lambda c, t=topic: _state(c.last(t)) == "online", 10), sub.last(
                topic
            )
        service.set_status("s2", "camera-lost", "no frame for 3.0 s")
        assert sub.wait_for(
            lambda c: b"camera-lost" in (c.last("lineguard/line1/s2/status") or b""), 10
        )
        assert json.loads(sub.last("lineguard/line1/s1/status"))["state"] == "online"
        assert sub.wait_for(lambda c: len(c.json("/s2/stats")) >= 1, 10)
        stats = sub.json("/s2/stats")[-1]
        assert stats["state"] == "camera-lost" and stats["broker_connected"] is True
        assert stats["fps"] == 5.0 and stats["outbox_depth"] == 0
    finally:
        service.stop()
    try:
        # Clean shutdown: every station offline, the edge offline, all retained.
        assert sub.wait_for(lambda c: c.last("lineguard/edge1/available") == b"offline", 10)
        for sid in ("s1", "s2"):
            assert json.loads(sub.last(f"lineguard/line1/{sid}/status"))["state"] == "offline"
        late = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="late")
        assert late.wait_for(lambda c: c.last("lineguard/line1/s1/status") is not None, 10)
        assert json.loads(late.last("lineguard/line1/s1/status"))["state"] == "offline"
        assert late.messages[0][2] is True  # retained
        late.close()
        assert _check_schemas(sub) > 5
    finally:
        sub.close()


def _command(sub: Collector, payload, retain: bool = False, topic="lineguard/line1/s1"):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sub.client.publish(f"{topic}/threshold/set", raw, qos=1, retain=retain).wait_for_publish(5)


def test_threshold_set_applies_echoes_and_audits(tmp_path, mosquitto):
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="thr-collector")
    service = _service(tmp_path, {"host": "127.0.0.1", "port": mosquitto.port, **FAST})
    try:
        service.start()
        assert service.link.wait_connected(10)
        station = _station(service)
        assert sub.wait_for(lambda c: len(c.json("/threshold/state")) >= 1, 10)
        initial = sub.json("/threshold/state")[-1]
        assert initial["active"] == {"image": 1.0, "pixel": 0.8, "min_area_px": 10}
        assert initial["changed_by"] is None
        assert station.feed(1.5) is True  # defective at the configured threshold

        _command(sub, {"image": 2.0, "by": "ana", "reason": "glare", "request_id": "r1"})
        assert sub.wait_for(lambda c: len(c.json("/threshold/state")) >= 2, 10)
        state = sub.json("/threshold/state")[-1]
        assert state["active"] == {"image": 2.0, "pixel": 0.8, "min_area_px": 10}
        assert (state["changed_by"], state["reason"], state["request_id"]) == ("ana", "glare", "r1")
        assert station.feed(1.5) is False  # the next frame is judged with the new threshold
        (entry,) = service.audit.entries("s1")
        assert entry["by"] == "ana" and entry["reason"] == "glare"
        assert entry["old"]["active"]["image"] == 1.0 and entry["new"]["active"]["image"] == 2.0

        # Shadow candidate: evaluated alongside, active unchanged, audited.
        _command(sub, {"image": 1.2, "shadow": True, "by": "calibrate", "reason": "try 1.2"})
        assert sub.wait_for(lambda c: len(c.json("/threshold/state")) >= 3, 10)
        state = sub.json("/threshold/state")[-1]
        assert state["active"]["image"] == 2.0 and state["shadow"]["image"] == 1.2
        assert service.audit.entries("s1")[-1]["action"] == "threshold/shadow"

        # A late subscriber gets the state retained.
        late = Collector(
            "127.0.0.1",
            mosquitto.port,
            ["lineguard/line1/s1/threshold/state"],
            client_id="thr-late",
        )
        assert late.wait_for(lambda c: len(c.messages) == 1, 10)
        assert json.loads(late.messages[0][1])["shadow"]["image"] == 1.2
        late.close()
        assert _check_schemas(sub) >= 3
    finally:
        service.stop()
        sub.close()


@pytest.mark.parametrize(
    ("payload", "retain", "error_part"),
    [
        (b"{not json", False, "not JSON"),
        ({"image": "high", "by": "x", "reason": "y"}, False, "image: must be a valid number"),
        ({"image": 1.0, "reason": "y"}, False, "'by' is a required property"),
        ({"by": "x", "reason": "y"}, False, "needs at least one of image, pixel"),
        ({"min_area_px": 0, "by": "x", "reason": "y"}, False, "min_area_px"),
        ({"image": 1.0, "by": "x", "reason": "y", "extra": 1}, False, "'extra' was unexpected"),
        (b'{"image": NaN, "by": "x", "reason": "y"}', False, "NaN"),
        ({"image": 1.0, "by": "x", "reason": "y"}, True, "retained"),
    ],
)
def test_malformed_threshold_set_is_answered_and_changes_nothing(
    tmp_path, mosquitto, payload, retain, error_part
):
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="bad-collector")
    service = _service(tmp_path, {"host": "127.0.0.1", "port": mosquitto.port, **FAST})
    try:
        if retain:  # a stale retained command must not be re-applied when the runtime (re)starts
            _command(sub, payload, retain=True)
        service.start()
        assert service.link.wait_connected(10)
        assert sub.wait_for(lambda c: len(c.json("/threshold/state")) >= 1, 10)
        before = {"image": 1.0, "pixel": 0.8, "min_area_px": 10}
        if not retain:
            _command(sub, payload)
        assert sub.wait_for(lambda c: len(c.json("/threshold/error")) >= 1, 10)
        (error,) = sub.json("/threshold/error")
        assert error_part in error["error"], error["error"]
        assert _station(service).thresholds() == before
        assert service.audit.entries() == []
        assert len(sub.json("/threshold/state")) == 1  # no new echo
        assert _check_schemas(sub) >= 2
    finally:
        service.stop()
        if retain:  # clear the retained command so it does not leak into the broker's store
            sub.client.publish("lineguard/line1/s1/threshold/set", b"", retain=True)
        sub.close()


def test_no_broker_events_go_to_outbox_and_stdout(tmp_path):
    out = io.StringIO()
    service = _service(tmp_path, None, stdout=out)
    try:
        service.start()
        station = _station(service)
        assert station.feed(3.0) and station.feed(0.5) is False and station.feed(4.0)
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert [x["image_score"] for x in lines] == [3.0, 4.0]
        assert all(ev.schema_errors("defect", x) == [] for x in lines)
        assert service.outbox.depth() == 2
    finally:
        service.stop()


# ------------------------------------------------------------------ TLS and credentials


def _tls_broker_config(broker, password: str, ca: Path, pw_dir: Path) -> BrokerConfig:
    pw_file = pw_dir / "pw"
    pw_file.write_text(password + "\n")
    return BrokerConfig(
        host="127.0.0.1",
        port=broker.port,
        tls=TLSConfig(ca=ca),
        username=broker.tls.username,
        password_file=pw_file,
        **FAST,
    )


def test_tls_with_generated_ca_connects(tmp_path, mosquitto_tls):
    cfg = _tls_broker_config(
        mosquitto_tls, mosquitto_tls.tls.password, mosquitto_tls.tls.ca_cert, tmp_path
    )
    link = MqttLink(cfg, "tls-ok", "lineguard/edge1/available")
    try:
        link.start()
        assert link.wait_connected(10), link.last_error
        assert link.last_error is None
        info = link.publish("lineguard/test", b"hello", qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
    finally:
        link.stop()


def test_wrong_password_is_refused_and_never_connected(tmp_path, mosquitto_tls, caplog):
    cfg = _tls_broker_config(mosquitto_tls, "wrong-password", mosquitto_tls.tls.ca_cert, tmp_path)
    link = MqttLink(cfg, "tls-bad-pw", "lineguard/edge1/available")
    try:
        link.start()
        assert wait_until(lambda: link.last_error is not None, 10)
        assert not link.connected and not link.wait_connected(2)
        assert "refused" in link.last_error
        assert "password" in link.last_error.lower() or "authori" in link.last_error.lower()
        assert link.connects == 0
        assert any("refused" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        assert "wrong-password" not in caplog.text
    finally:
        link.stop()


def test_untrusted_ca_is_a_clear_tls_error(tmp_path, mosquitto_tls):
    cfg = _tls_broker_config(
        mosquitto_tls, mosquitto_tls.tls.password, mosquitto_tls.tls.other_ca_cert, tmp_path
    )
    link = MqttLink(cfg, "tls-bad-ca", "lineguard/edge1/available")
    try:
        link.start()
        assert wait_until(lambda: link.last_error is not None, 10)
        assert not link.connected
        assert "TLS" in link.last_error and "certificate verify failed" in link.last_error.lower()
    finally:
        link.stop()
