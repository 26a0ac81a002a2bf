"""Shared by the end-to-end tests: a site file for a real broker, and `lineguard run` on it in
its own process while a subscriber records everything it publishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

Messages = list[tuple[str, bytes]]


def write_site(root: Path, port: int, stations: list[str]) -> Path:
    """ROOT/site.yaml: the station files on a loopback broker, outbox and audit log in ROOT."""
    site = {
        "edge_id": "edge-test",
        "broker": {"host": "127.0.0.1", "port": port},
        "stations": stations,
        "outbox": {"path": str(root / "outbox.sqlite")},
        "audit_log": str(root / "audit.jsonl"),
        "stats_interval_s": 1,
    }
    (root / "site.yaml").write_text(yaml.safe_dump(site))
    return root / "site.yaml"


def stations_ended(received: Messages) -> int:
    """How many offline statuses whose reason says the camera's frames came to an end."""
    n = 0
    for topic, payload in received:
        if topic.endswith("/status"):
            body = json.loads(payload)
            n += body.get("state") == "offline" and "end" in body.get("reason", "")
    return n


def replay_site(
    site: Path, port: int, done: Callable[[Messages], bool], timeout_s: float = 120.0
) -> tuple[Messages, int, str]:
    """Subscribe to lineguard/# on the broker, run `lineguard run --site SITE` until
    `done(received)` (or the process exits, or `timeout_s`), let the publisher drain for 2 s,
    then SIGTERM it. Returns the (topic, payload) messages, its return code and stderr's tail."""
    received: Messages = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: received.append((m.topic, m.payload))
    connected = threading.Event()
    sub.on_connect = lambda c, u, f, rc, p: (c.subscribe("lineguard/#", qos=1), connected.set())
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    assert connected.wait(10)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lineguard.runtime.cli", "run", "--site", str(site)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and not done(received) and proc.poll() is None:
            time.sleep(0.5)
        time.sleep(2.0)  # let the publisher drain the last events
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        sub.loop_stop()
    return received, proc.returncode, err.decode()[-3000:]
