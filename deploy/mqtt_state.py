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
# JSON Schema of the payload on <prefix>/<edge>/bundle (DESIGN.md: every payload has one).
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
        payload = json.dumps({"schema_version": SCHEMA_VERSION, **state})
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


class OnlineWatcher:
    """Subscribe BEFORE the restart, then wait for a fresh (not retained) `online`.

    A retained `online` may be the old process's; only a message the broker forwards live after
    we subscribed proves the new process connected.
    """

    def __init__(self, broker: BrokerInfo, connect_timeout: float = 10.0) -> None:
        self.broker = broker
        self.connect_timeout = connect_timeout
        self._online = threading.Event()
        self._subscribed = threading.Event()
        self._client = None

    def __enter__(self) -> OnlineWatcher:
        client = _client(self.broker, "watch")

        def on_message(_c, _u, msg):
            if not msg.retain and is_online(msg.payload):
                self._online.set()

        def on_subscribe(*_a):
            self._subscribed.set()

        client.on_message = on_message
        client.on_subscribe = on_subscribe
        try:
            _connect(client, self.broker, self.connect_timeout)
        except ConnectionError as exc:
            raise HealthError(f"cannot watch the runtime come online: {exc}") from exc
        client.subscribe(available_topic(self.broker), qos=1)
        if not self._subscribed.wait(self.connect_timeout):
            client.loop_stop()
            raise HealthError(f"broker {self.broker.host}: subscription was not acknowledged")
        self._client = client
        return self

    def wait(self, timeout: float) -> None:
        if not self._online.wait(timeout):
            raise HealthError(
                f"the runtime did not report online on {available_topic(self.broker)} "
                f"within {timeout:g}s"
            )

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
