"""The broker connection (paho-mqtt 2.x): availability, TLS, credentials, honest connection state.

MQTT 5 by default (`broker.protocol`), subscribing with "retain as published" so a threshold
command published with retain=true is seen as retained even when it arrives live (and refused);
MQTT 3.1.1 for brokers without MQTT 5, where the broker clears that flag for live delivery.

paho runs the network loop in its own thread (`loop_start`) and reconnects by itself with a
doubling delay (`reconnect_delay_set`), also when the broker is down at start. Messages handed to
paho at QoS 1 stay in paho's memory until PUBACK and are re-sent after a reconnect; the durable
copy lives in the outbox (see `publisher.py`).

paho's memory is bounded with its own limits: at most `MAX_INFLIGHT` QoS 1 messages on the wire
awaiting PUBACK (`max_inflight_messages_set`) and at most `MAX_INFLIGHT + STATE_RESERVE` in its
queue (`max_queued_messages_set`; paho's default is unbounded). The outbox publisher hands over
at most `MAX_INFLIGHT` rows, so events never wait in paho's queue, only on the wire; the reserve
is for state messages (status, threshold state, availability), which are small. A publish paho
refuses because its queue is full returns None (back pressure, not an error: the row stays in
the outbox; a state message is re-published on the next reconnect).

The link is `connected` only after a CONNACK with a success code: a refused CONNACK (bad
password, not authorised) or a failed TCP/TLS connect leaves it disconnected with `last_error`
saying why, logged once per distinct error. The last will sets `<prefix>/<edge>/available` to
`offline` (retained) when the edge PC disappears; `online` is published on every connect.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from lineguard.runtime.site_config import BrokerConfig

log = logging.getLogger(__name__)

MAX_INFLIGHT = 32  # QoS 1 messages sent and awaiting PUBACK: the publisher's window too
STATE_RESERVE = 256  # room in paho's queue for state messages beyond the publisher's window

OnMessage = Callable[[str, bytes, bool], None]  # topic, payload, retained


class MqttLink:
    """One MQTT connection for the edge PC."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        available_topic: str,
        on_connected: Callable[[], None] | None = None,
        on_message: OnMessage | None = None,
        on_published: Callable[[int], None] | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.available_topic = available_topic
        self.on_connected = on_connected
        self.on_message = on_message
        self.on_published = on_published
        self.subscriptions: list[str] = []
        self.last_error: str | None = None
        self.connects = 0  # successful CONNACKs since start
        self._connected = threading.Event()
        self._stopping = False
        self._last_logged: tuple[str | None, float] = (None, 0.0)
        self._ssl_context: ssl.SSLContext | None = None
        self.mqtt5 = broker.protocol == "5"
        self.max_inflight = MAX_INFLIGHT
        self.max_queued = MAX_INFLIGHT + STATE_RESERVE
        self._client = self._build_client()

    # -------------------------------------------------------------- set-up

    def _build_client(self) -> paho.Client:
        b = self.broker
        # The outbox, not the broker session, carries undelivered events: always a clean
        # session. MQTT 5 lets the runtime see the retain flag of a live threshold command.
        if self.mqtt5:
            client = paho.Client(
                CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5
            )
        else:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=paho.MQTTv311,
                clean_session=True,
            )
        client.will_set(self.available_topic, b"offline", qos=1, retain=True)
        client.reconnect_delay_set(b.reconnect_min_s, b.reconnect_max_s)
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(self.max_queued)
        if b.tls is not None:
            ctx = ssl.create_default_context(cafile=str(b.tls.ca) if b.tls.ca is not None else None)
            if b.tls.cert is not None:
                ctx.load_cert_chain(str(b.tls.cert), str(b.tls.key))
            if b.tls.insecure:
                ctx.check_hostname = False  # the certificate chain is still verified
            client.tls_set_context(ctx)
            self._ssl_context = ctx
        if b.username:
            password = b.password()
            client.username_pw_set(
                b.username, password.get_secret_value() if password is not None else None
            )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def start(self) -> None:
        """Connect in the background; returns at once (the broker may be down)."""
        b = self.broker
        log.info(
            "MQTT: connecting to %s:%d%s as %s",
            b.host,
            b.port,
            " (TLS)" if b.tls else "",
            self.client_id,
        )
        if self.mqtt5:
            self._client.connect_async(b.host, b.port, keepalive=b.keepalive, clean_start=True)
        else:
            self._client.connect_async(b.host, b.port, keepalive=b.keepalive)
        self._client.loop_start()

    def stop(self, final: list[tuple[str, bytes, bool]] | None = None, timeout: float = 3.0):
        """Publish `final` (topic, payload, retain) and `offline`, wait for them, disconnect."""
        self._stopping = True
        if self.connected:
            infos = [self._client.publish(t, p, qos=1, retain=r) for t, p, r in final or []]
            infos.append(self._client.publish(self.available_topic, b"offline", 1, retain=True))
            deadline = time.monotonic() + timeout
            for info in infos:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    info.wait_for_publish(left)
                except (RuntimeError, ValueError):
                    break
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # -------------------------------------------------------------- state

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def subscribe(self, topic: str) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        if self.connected:
            self._subscribe(self._client, topic)

    def _subscribe(self, client: paho.Client, topic: str) -> None:
        if self.mqtt5:  # keep the publisher's retain flag on live messages too
            client.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
        else:
            client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):
        """Hand a message to paho; returns its MQTTMessageInfo, or None when it was refused
        (paho's queue is full: `max_queued`; or an error, logged).

        While disconnected paho keeps QoS>0 messages and sends them after the reconnect.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            log.debug("MQTT: paho's queue is full (%d); %s not taken now", self.max_queued, topic)
            return None
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("MQTT: publish to %s refused: %s", topic, paho.error_string(info.rc))
            return None
        return info

    # -------------------------------------------------------------- paho callbacks

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connected.clear()
            self._error(f"broker refused the connection: {reason_code}")
            return
        self.connects += 1
        self.last_error = None
        self._last_logged = (None, 0.0)
        log.info("MQTT: connected to %s:%d", self.broker.host, self.broker.port)
        client.publish(self.available_topic, b"online", qos=1, retain=True)
        for topic in self.subscriptions:
            self._subscribe(client, topic)
        self._connected.set()
        if self.on_connected is not None:
            try:
                self.on_connected()
            except Exception:
                log.exception("MQTT: on_connected handler failed")

    def _on_connect_fail(self, client, userdata) -> None:
        self._connected.clear()
        self._error(f"cannot connect: {self._probe()}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected
        self._connected.clear()
        if self._stopping:
            log.info("MQTT: disconnected")
        elif was:
            log.warning("MQTT: disconnected (%s); paho reconnects", reason_code)

    def _on_message(self, client, userdata, message) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(message.topic, bytes(message.payload), bool(message.retain))
        except Exception:
            log.exception("MQTT: handler for %s failed", message.topic)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if self.on_published is not None:
            self.on_published(mid)

    # -------------------------------------------------------------- errors

    def _error(self, message: str) -> None:
        """Log an error once per distinct message, and at most once a minute when it repeats."""
        self.last_error = message
        previous, when = self._last_logged
        now = time.monotonic()
        if message != previous or now - when > 60.0:
            log.error(
                "MQTT %s:%d: %s (retrying up to every %ds)",
                self.broker.host,
                self.broker.port,
                message,
                self.broker.reconnect_max_s,
            )
            self._last_logged = (message, now)

    def _probe(self) -> str:
        """paho hides why a TCP/TLS connect failed; redo it once to name the cause."""
        b = self.broker
        try:
            with socket.create_connection((b.host, b.port), timeout=5.0) as sock:
                if self._ssl_context is None:
                    return "TCP connected on a retry; the first attempt failed"
                with self._ssl_context.wrap_socket(sock, server_hostname=b.host):
                    return "TLS handshake succeeded on a retry; the first attempt failed"
        except ssl.SSLCertVerificationError as exc:
            return f"TLS certificate verify failed: {exc.verify_message} (check tls.ca)"
        except ssl.SSLError as exc:
            return f"TLS handshake failed: {exc.reason or exc}"
        except OSError as exc:
            return f"{exc.strerror or exc}"
