"""MQTT for deploy: publish the active bundle (retained) and watch the live runtime come online.

Short-lived paho clients, separate from the runtime's long-lived one: deploy runs as a one-shot
command and must not depend on the runtime being up.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import uuid
from pathlib import Path
from typing import Any

from lineguard.deploy.configs import BrokerInfo
from lineguard.deploy.health import HealthError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# JSON Schema of the payload on <prefix>/<edge>/bundle (architecture.md: every payload has one).
SCHEMA_FILE = Path(__file__).parent / "schemas" / "bundle.schema.json"


def bundle_topic(broker: BrokerInfo) -> str:
    return f"{broker.prefix}/{broker.edge_id}/bundle"


def available_topic(broker: BrokerInfo) -> str:
    return f"{broker.prefix}/{broker.edge_id}/available"


def _client(broker: BrokerInfo, role: str):
    """A paho client with the site's TLS and credentials (same rules as the runtime's link)."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"lineguard-deploy-{role}-{broker.edge_id}-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
    )
    cfg = broker.config
    if cfg is not None and cfg.tls is not None:
        ctx = ssl.create_default_context(cafile=str(cfg.tls.ca) if cfg.tls.ca else None)
        if cfg.tls.cert is not None:
            ctx.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
        if cfg.tls.insecure:
            ctx.check_hostname = False
        client.tls_set_context(ctx)
    if cfg is not None and cfg.username:
        password = cfg.password()
        client.username_pw_set(
            cfg.username, password.get_secret_value() if password is not None else None
        )
    return client


def _connect(client, broker: BrokerInfo, timeout: float) -> None:
    connected = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(_c, _u, _f, reason_code, _p=None):
        result["rc"] = reason_code
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise ConnectionError(f"broker {broker.host}:{broker.port}: {exc}") from exc
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise ConnectionError(f"broker {broker.host}:{broker.port}: no CONNACK in {timeout:g}s")
    rc = result["rc"]
    if getattr(rc, "is_failure", False):
        client.loop_stop()
        raise ConnectionError(f"broker {broker.host}:{broker.port} refused the connection: {rc}")


def publish_bundle_state(broker: BrokerInfo, state: dict[str, Any], timeout: float = 10.0) -> None:
    """Publish `state` retained at QoS 1 on `<prefix>/<edge>/bundle` and wait for the PUBACK."""
    client = _client(broker, "pub")
    _connect(client, broker, timeout)
    try:
        payload = json.dumps({"schema_version": SCHEMA_VERSION, **state}, allow_nan=False)
        info = client.publish(bundle_topic(broker), payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise ConnectionError(f"broker {broker.host}:{broker.port}: no PUBACK in {timeout:g}s")
    finally:
        client.disconnect()
        client.loop_stop()


def is_online(payload: bytes) -> bool:
    """The runtime's availability payload: plain `online` or JSON with state/status `online`."""
    text = payload.decode(errors="replace").strip()
    if text.lower() == "online":
        return True
    try:
        data = json.loads(text)
    except ValueError:
        return False
    if isinstance(data, dict):
        return str(data.get("state", data.get("status", ""))).lower() == "online"
    return isinstance(data, str) and data.lower() == "online"


def status_topic(broker: BrokerInfo, line: str, station: str) -> str:
    return f"{broker.prefix}/{line}/{station}/status"


class OnlineWatcher:
    """Subscribe BEFORE the restart, then wait for a fresh (not retained) `online` from the edge
    and from every station (`stations`: (line, station) pairs, their retained status topics).

    A retained message may be the old process's; only a message the broker forwards live after
    we subscribed proves the new process connected. The edge being `online` is not enough: a
    runtime whose stations are `camera-lost` or `offline` fails the gate.
    """

    def __init__(
        self,
        broker: BrokerInfo,
        connect_timeout: float = 10.0,
        stations: list[tuple[str, str]] | tuple = (),
    ) -> None:
        self.broker = broker
        self.connect_timeout = connect_timeout
        self._online = threading.Event()
        self._subscribed = threading.Event()
        self._client = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._status_topics = {status_topic(broker, ln, st): st for ln, st in stations}
        self.station_state: dict[str, str] = {}  # station -> last fresh state seen

    def _on_message(self, _c, _u, msg) -> None:
        if msg.retain:
            return
        station = self._status_topics.get(msg.topic)
        with self._changed:
            if station is not None:
                try:
                    data = json.loads(msg.payload)
                    state = str(data.get("state")) if isinstance(data, dict) else "unreadable"
                except ValueError:
                    state = "unreadable"
                self.station_state[station] = state
            elif is_online(msg.payload):
                self._online.set()
            self._changed.notify_all()

    def __enter__(self) -> OnlineWatcher:
        client = _client(self.broker, "watch")
        topics = [available_topic(self.broker), *self._status_topics]

        def on_subscribe(*_a):
            self._subscribed.set()

        client.on_message = self._on_message
        client.on_subscribe = on_subscribe
        try:
            _connect(client, self.broker, self.connect_timeout)
        except ConnectionError as exc:
            raise HealthError(f"cannot watch the runtime come online: {exc}") from exc
        client.subscribe([(t, 1) for t in topics])
        if not self._subscribed.wait(self.connect_timeout):
            client.loop_stop()
            raise HealthError(f"broker {self.broker.host}: subscription was not acknowledged")
        self._client = client
        return self

    def _all_online(self) -> bool:
        stations = self._status_topics.values()
        return self._online.is_set() and all(
            self.station_state.get(s) == "online" for s in stations
        )

    def wait(self, timeout: float) -> None:
        with self._changed:
            ok = self._changed.wait_for(self._all_online, timeout)
        if ok:
            return
        if not self._online.is_set():
            raise HealthError(
                f"the runtime did not report online on {available_topic(self.broker)} "
                f"within {timeout:g}s"
            )
        bad = ", ".join(
            f"{s}: {self.station_state.get(s, 'no status')}"
            for s in self._status_topics.values()
            if self.station_state.get(s) != "online"
        )
        raise HealthError(f"stations not online within {timeout:g}s ({bad})")

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
