"""Deploy against a real mosquitto: the retained bundle topic and the live `online` gate."""

from __future__ import annotations

import json
import os
import sys
import threading

import paho.mqtt.client as mqtt
import paho.mqtt.publish as publish
import pytest
from conftest import write_site
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
    assert len(msg["manifest_sha256"]) == 64
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
        health_cmd=_publish_cmd(host, port, "online"),
    )
    res = install(bundle("1"), root, opts)
    assert res.changed and os.readlink(root / "current") == "releases/1"


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
