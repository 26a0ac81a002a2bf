"""Plumbing for `python -m lineguard.deploy.demo`: run `lineguard` subcommands with their output
shown live and logged, a local mosquitto, and an MQTT subscriber that prints defect alerts.

The demo drives every stage through the `lineguard` command, as a user would; this module only
starts processes and listens. It imports no torch (the training stage runs in its own process).
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def lineguard_cmd() -> list[str]:
    """The `lineguard` console script of this interpreter's environment (or `-m` as fallback)."""
    script = Path(sys.executable).with_name("lineguard")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "lineguard.runtime.cli"]


def child_env() -> dict[str, str]:
    """Environment of the `lineguard` processes. OMP_WAIT_POLICY=PASSIVE (unless set): torch's
    OpenMP threads otherwise spin while waiting, which on a shared or busy 2-core machine made a
    2-thread training step ~18x slower in our measurements (163.8 s vs 9.0 s for 6 epochs)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def shown(args: list[str]) -> str:
    """A command line as the user would type it (`lineguard ...`, paths relative to the cwd)."""
    out = []
    for a in args:
        if os.path.isabs(a) and a.startswith(os.getcwd() + os.sep):
            a = os.path.relpath(a)
        out.append(a)
    return shlex.join(["lineguard", *out])


def run_logged(args: list[str], log: Path, echo: bool = True) -> tuple[int, str]:
    """Run `lineguard ARGS`, copying its output (progress bars included) to the terminal and to
    `log`; returns (exit code, output text)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = child_env()
    chunks: list[bytes] = []
    with open(log, "wb") as f:
        f.write(f"$ {shown(args)}\n".encode())
        proc = subprocess.Popen(
            [*lineguard_cmd(), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
            f.write(data)
            if echo:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
        code = proc.wait()
    return code, b"".join(chunks).decode(errors="replace")


def last_json_object(text: str) -> dict[str, Any] | None:
    """The last top-level JSON object printed in `text` (e.g. `lineguard train`'s summary)."""
    end = text.rfind("}")
    while end != -1:
        start = text.rfind("\n{", 0, end)
        start = 0 if start == -1 and text.startswith("{") else start
        if start == -1:
            return None
        try:
            return json.loads(text[start : end + 1])
        except ValueError:
            end = text.rfind("}", 0, start)
    return None


# --------------------------------------------------------------------------- broker


def find_mosquitto() -> str | None:
    exe = shutil.which("mosquitto")
    if exe:
        return exe
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """A throw-away mosquitto on a free loopback port, anonymous, no persistence."""

    def __init__(self, exe: str, folder: Path) -> None:
        self.exe, self.folder = exe, folder
        self.host, self.port = "127.0.0.1", free_port()
        self.proc: subprocess.Popen | None = None
        self.log = folder / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> LocalBroker:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "mosquitto.conf"
        # As root, mosquitto would switch to the 'mosquitto' user; keep the caller's user.
        user = f"user {getpass.getuser()}\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"{user}log_dest file {self.log}\n"
        )
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        tail = self.log.read_text(errors="replace")[-500:] if self.log.exists() else ""
        raise RuntimeError(f"mosquitto did not start on port {self.port}: {tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- what we saw


@dataclass
class Alert:
    station: str
    payload: dict[str, Any]
    received: float
    evidence: bytes | None = None


@dataclass
class StationInfo:
    """A demo station: its paper type and what its replay folder holds, frame by frame."""

    station_id: str
    paper: str
    frames: list[tuple[str, str]] = field(default_factory=list)  # (file name, label) by frame id
    thresholds: dict[str, Any] = field(default_factory=dict)

    def frame_of(self, payload: dict[str, Any]) -> tuple[str, str]:
        """(file name, ground-truth label) of an event's frame (frame ids count from 0)."""
        fid = payload.get("frame_id")
        if isinstance(fid, int) and 0 <= fid < len(self.frames):
            return self.frames[fid]
        return ("?", "?")


@dataclass
class Observed:
    """Everything the demo saw of the running line (over MQTT, or the runtime's stdout/logs)."""

    alerts: list[Alert] = field(default_factory=list)
    status: dict[str, tuple[str, str]] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    evidence: dict[str, bytes] = field(default_factory=dict)  # event_id -> JPEG
    bundle: dict[str, Any] | None = None
    available: str | None = None
    messages: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ended(self, stations: list[str]) -> bool:
        """Every station went offline at the end of its replay folder."""
        with self.lock:
            return all(
                self.status.get(s, ("", ""))[0] == "offline"
                and self.status[s][1].startswith("end of")
                for s in stations
            )

    def alerts_of(self, station: str) -> list[Alert]:
        with self.lock:
            return [a for a in self.alerts if a.station == station]


AlertPrinter = Callable[[Alert], None]


class Subscriber:
    """paho client on `<prefix>/#`: prints alerts as they arrive and keeps what it saw."""

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        seen: Observed,
        on_alert: AlertPrinter,
        record: Path | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt

        self.prefix, self.seen, self.on_alert = prefix, seen, on_alert
        # every message as one JSON line (JPEGs as their size), to read the payloads afterwards
        self.record = open(record, "a", encoding="utf-8") if record else None  # noqa: SIM115
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="lineguard-demo")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def start(self, timeout: float = 10.0) -> Subscriber:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise RuntimeError(f"subscriber: no connection to {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        if self.record is not None:
            self.record.close()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        client.subscribe(f"{self.prefix}/#", qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, msg) -> None:
        if self.record is not None:
            try:
                body: Any = json.loads(msg.payload)
            except ValueError:
                body = (
                    msg.payload.decode(errors="replace")
                    if len(msg.payload) < 64
                    else f"<{len(msg.payload)} bytes>"
                )
            line = {"topic": msg.topic, "retain": bool(msg.retain), "qos": msg.qos, "payload": body}
            self.record.write(json.dumps(line) + "\n")
            self.record.flush()
        try:
            self._handle(msg.topic, msg.payload)
        except Exception as exc:  # a demo printout must not kill paho's thread
            print(f"  (subscriber: could not read {msg.topic}: {exc})", flush=True)

    def _handle(self, topic: str, raw: bytes) -> None:
        levels = topic[len(self.prefix) + 1 :].split("/")
        s = self.seen
        with s.lock:
            s.messages += 1
        if len(levels) >= 4 and levels[2] == "evidence":
            with s.lock:
                s.evidence[levels[3]] = raw
                for a in s.alerts:
                    if a.payload.get("event_id") == levels[3]:
                        a.evidence = raw
            return
        if len(levels) == 2 and levels[1] == "available":  # bare text, not JSON
            with s.lock:
                s.available = raw.decode(errors="replace")
            print(f"  mqtt  {topic}: {s.available}", flush=True)
            return
        payload = json.loads(raw)
        if len(levels) == 2 and levels[1] == "bundle":
            with s.lock:
                s.bundle = payload
            print(f"  mqtt  {topic}: active bundle {payload.get('version')}", flush=True)
        elif len(levels) == 3 and levels[2] == "status":
            station = levels[1]
            state, reason = payload.get("state", "?"), payload.get("reason") or ""
            with s.lock:
                s.status[station] = (state, reason)
            print(f"  mqtt  {station}: {state}{' (' + reason + ')' if reason else ''}", flush=True)
        elif len(levels) == 3 and levels[2] == "stats":
            with s.lock:
                s.stats[levels[1]] = payload
        elif len(levels) == 4 and levels[2:] == ["threshold", "state"]:
            with s.lock:
                s.thresholds[levels[1]] = payload.get("active") or {}
        elif len(levels) == 3 and levels[2] == "defect":
            alert = Alert(levels[1], payload, time.time())
            with s.lock:
                alert.evidence = s.evidence.get(str(payload.get("event_id")))
                s.alerts.append(alert)
            self.on_alert(alert)


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM (what systemd sends), then wait; SIGKILL only if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode
