"""Deploy against a real mosquitto: the retained bundle topic and the live `online` gate."""

from __future__ import annotations

import json
import os
import sys
import threading

import jsonschema
import paho.mqtt.client as mqtt
import paho.mqtt.publish as publish
import pytest
from deploy_testkit import write_site

from lineguard.deploy import mqtt_state
from lineguard.deploy.health import HealthError
from lineguard.deploy.install import Options, install, rollback

TOPIC = "lgtest/edge-a/bundle"
AVAILABLE = "lgtest/edge-a/available"


def _retained(host: str, port: int, topic: str, timeout: float = 5.0) -> dict:
    """Subscribe with a fresh client and return the retained payload of `topic`."""
    got: dict = {}
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)

    def on_message(_c, _u, msg):
        got.update(json.loads(msg.payload), _retained=msg.retain)
        done.set()

    c.on_message = on_message
    c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
    c.connect(host, port)
    c.loop_start()
    try:
        assert done.wait(timeout), f"no retained message on {topic}"
    finally:
        c.disconnect()
        c.loop_stop()
    return got


def _publish_cmd(host: str, port: int, payload: str) -> str:
    """A health hook standing in for the restarted runtime announcing itself."""
    code = (
        "import paho.mqtt.publish as p; "
        f"p.single('{AVAILABLE}', '{payload}', hostname='{host}', port={port}, qos=1, retain=True)"
    )
    return f'{sys.executable} -c "{code}"'


def announce_cmd(folder, host: str, port: int, states: dict[str, str]) -> str:
    """A health hook standing in for the restarted runtime: availability and each station's
    status, retained, as `lineguard run` publishes them."""
    msgs = [{"topic": AVAILABLE, "payload": "online", "qos": 1, "retain": True}]
    for station, state in states.items():
        payload = json.dumps({"state": state, "station": station})
        topic = f"lgtest/line1/{station}/status"
        msgs.append({"topic": topic, "payload": payload, "qos": 1, "retain": True})
    script = folder / "announce.py"
    script.write_text(
        "import json, paho.mqtt.publish as p\n"
        f"p.multiple(json.loads({json.dumps(json.dumps(msgs))}), hostname={host!r}, port={port})\n"
    )
    return f'"{sys.executable}" "{script}"'


@pytest.fixture
def broker_bundle(deploy_broker, workspace, make_bundle):
    host, port = deploy_broker
    site = write_site(workspace["tmp"] / "src" / "site.yaml", host, port)
    return host, port, lambda v: make_bundle(v, site=site)


def test_active_bundle_is_published_retained(broker_bundle, tmp_path):
    host, port, bundle = broker_bundle
    root = tmp_path / "root"
    res = install(bundle("1"), root, Options(inference=False))
    assert res.published == TOPIC
    msg = _retained(host, port, TOPIC)
    assert msg["_retained"] is True
    assert msg["version"] == "1" and msg["previous"] is None and msg["edge"] == "edge-a"
    assert msg["stations"] == ["st1", "st2"] and msg["schema_version"] == 1
    schema = json.loads(mqtt_state.SCHEMA_FILE.read_text())
    payload = {k: v for k, v in msg.items() if k != "_retained"}
    jsonschema.Draft202012Validator(schema).validate(payload)
    install(bundle("2"), root, Options(inference=False))
    msg = _retained(host, port, TOPIC)
    assert (msg["version"], msg["previous"]) == ("2", "1")
    rollback(root, Options(inference=False))
    msg = _retained(host, port, TOPIC)
    assert (msg["version"], msg["previous"]) == ("1", "2")


def test_runtime_reporting_online_passes_the_gate(broker_bundle, tmp_path):
    host, port, bundle = broker_bundle
    root = tmp_path / "root"
    opts = Options(
        inference=False,
        wait_online="yes",
        health_timeout=10,
        health_cmd=announce_cmd(tmp_path, host, port, {"st1": "online", "st2": "online"}),
    )
    res = install(bundle("1"), root, opts)
    assert res.changed and os.readlink(root / "current") == "releases/1"


@pytest.mark.parametrize("states", [{"st1": "online"}, {"st1": "online", "st2": "camera-lost"}, {}])
def test_edge_online_but_a_station_not_online_rolls_back(broker_bundle, tmp_path, states):
    """Issue 14, finding 11: the live check read only the edge's `online`."""
    host, port, bundle = broker_bundle
    root = tmp_path / "root"
    install(bundle("1"), root, Options(inference=False))
    opts = Options(
        inference=False,
        wait_online="yes",
        health_timeout=1.5,
        health_cmd=announce_cmd(tmp_path, host, port, states),
    )
    with pytest.raises(HealthError, match=r"stations not online.*st2.*rolled back to 1"):
        install(bundle("2"), root, opts)
    assert os.readlink(root / "current") == "releases/1"


@pytest.mark.parametrize("announce", [None, "offline"])
def test_runtime_not_online_rolls_back(broker_bundle, tmp_path, announce):
    host, port, bundle = broker_bundle
    root = tmp_path / "root"
    install(bundle("1"), root, Options(inference=False))
    # a stale retained `online` from the old process must not count as the new one's
    publish.single(AVAILABLE, "online", hostname=host, port=port, qos=1, retain=True)
    opts = Options(
        inference=False,
        wait_online="yes",
        health_timeout=1.5,
        health_cmd=_publish_cmd(host, port, announce) if announce else None,
    )
    with pytest.raises(HealthError, match=r"did not report online.*rolled back to 1"):
        install(bundle("2"), root, opts)
    assert os.readlink(root / "current") == "releases/1"
    assert _retained(host, port, TOPIC)["version"] == "1"


def test_wait_online_needs_a_broker(make_bundle, tmp_path):
    with pytest.raises(HealthError, match="names no MQTT broker"):
        install(make_bundle("1"), tmp_path / "root", Options(inference=False, wait_online="yes"))
    assert not (tmp_path / "root" / "current").exists()


def test_installed_release_runs_from_current(deploy_broker, workspace, tmp_path):
    """End to end: install, and the real runtime started from `current` (here by the health
    hook, on an edge PC by systemd) reports online; its state lands in <root>/state, never in
    the read-only release."""
    pytest.importorskip("lineguard.runtime.engine")
    import signal
    import subprocess

    import cv2
    import numpy as np
    import yaml
    from deploy_testkit import LINEGUARD

    from lineguard.deploy.build import build_bundle

    host, port = deploy_broker
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "0.png"), np.zeros((24, 24, 3), np.uint8))
    for f in workspace["stations"].glob("*.yaml"):
        cfg = yaml.safe_load(f.read_text())
        cfg["camera"] = {"kind": "folder", "path": str(frames), "fps": 5, "loop": True}
        f.write_text(yaml.safe_dump(cfg))
    site = write_site(workspace["tmp"] / "src" / "site.yaml", host, port)
    bundle = build_bundle(
        workspace["artifact"], workspace["stations"], "1", tmp_path / "b.tar.gz", site=site
    ).path
    root, pidfile = tmp_path / "root", tmp_path / "run.pid"
    hook = (
        f'{LINEGUARD} run --site "$LINEGUARD_ROOT/current/site.yaml" '
        f"> {tmp_path}/run.log 2>&1 & echo $! > {pidfile}"
    )
    try:
        r = subprocess.run(
            [
                LINEGUARD,
                "deploy",
                "install",
                str(bundle),
                "--root",
                str(root),
                "--wait-online",
                "yes",
                "--health-cmd",
                hook,
                "--health-timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr + (tmp_path / "run.log").read_text()
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                threading.Event().wait(0.1)
    assert (root / "state" / "outbox.sqlite").is_file()
    assert not (root / "releases" / "1" / "state").resolve().is_relative_to(root / "releases")
    assert _retained(host, port, AVAILABLE.replace("available", "bundle"))["version"] == "1"
