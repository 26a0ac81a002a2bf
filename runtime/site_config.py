"""Site configuration models: one edge PC, its broker, outbox, inference sharing and metrics.

One pydantic model per feature, every field titled, unknown keys rejected (`config_base.py`).
Secrets: the broker password is never stored in a config file or model field; `password_file` or
`password_env` name where to read it, and `BrokerConfig.password()` returns a `SecretStr` so it is
never printed by accident.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from lineguard.runtime.config_base import (
    TOPIC_LEVEL,
    ConfigPath,
    StrictModel,
    check_files,
    check_local,
)
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.local_checks import writable_file_problem


class TLSConfig(StrictModel):
    """TLS to the broker: a CA to trust and, for mutual TLS, a client certificate and key."""

    ca: ConfigPath | None = Field(None, title="CA certificate file (None = system CAs)")
    cert: ConfigPath | None = Field(None, title="Client certificate (mutual TLS)")
    key: ConfigPath | None = Field(None, title="Client private key (mutual TLS)")
    insecure: bool = Field(
        False, title="Skip hostname verification (testing only; the chain is still checked)"
    )

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be given together")
        return self

    @field_validator("ca", "cert", "key")
    @classmethod
    def _exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and check_files(info) and not v.is_file():
            raise ValueError(f"file not found: {v}")
        return v


class BrokerConfig(StrictModel):
    """MQTT broker connection. The password comes from a file or an environment variable."""

    host: str = Field(title="Broker host name or address")
    port: int = Field(1883, ge=1, le=65535, title="Broker port (8883 is usual for TLS)")
    tls: TLSConfig | None = Field(None, title="TLS settings (None = plain TCP)")
    username: str | None = Field(None, title="User name")
    password_file: ConfigPath | None = Field(None, title="File holding the password")
    password_env: str | None = Field(None, title="Environment variable holding the password")
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        title="MQTT protocol version",
        description="5 lets the runtime refuse a threshold command published with retain=true "
        "even when it arrives live; 3.1.1 only for brokers without MQTT 5 (there such a command "
        "is refused only when replayed from the broker's store)",
    )
    keepalive: int = Field(30, ge=5, le=3600, title="MQTT keepalive, seconds")
    client_id: str | None = Field(
        None, title="MQTT client id, unique per edge PC (None = 'lineguard-<edge_id>')"
    )
    reconnect_min_s: int = Field(1, ge=1, title="First reconnect delay, seconds (doubles)")
    reconnect_max_s: int = Field(30, ge=1, title="Largest reconnect delay, seconds")

    @model_validator(mode="after")
    def _credentials(self) -> BrokerConfig:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        has_password = self.password_file is not None or self.password_env is not None
        if has_password and not self.username:
            raise ValueError("a password needs a username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: object) -> object:
        return "5" if v == 5 and not isinstance(v, bool) else v

    @field_validator("password_env")
    @classmethod
    def _password_env_set(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and check_local(info) and v not in os.environ:
            raise ValueError(f"environment variable {v} is not set (run would fail)")
        return v

    @field_validator("password_file")
    @classmethod
    def _password_file_exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and check_files(info) and not v.is_file():
            raise ValueError(f"file not found: {v}")
        return v

    def password(self) -> SecretStr | None:
        """Read the password now (so a rotated secret file is picked up on restart)."""
        if self.password_file is not None:
            try:
                text = Path(self.password_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise LineGuardError(
                    f"broker password_file {self.password_file}: {exc.strerror}"
                ) from None
            return SecretStr(text.rstrip("\r\n"))
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise LineGuardError(
                    f"broker password_env: environment variable {self.password_env} is not set"
                )
            return SecretStr(value)
        return None


class OutboxConfig(StrictModel):
    """Durable store-and-forward for events (SQLite); bounded, never silently."""

    path: ConfigPath = Field(Path("state/outbox.sqlite"), title="SQLite file")
    max_events: int = Field(100_000, ge=10, title="Most events kept; the oldest go first, logged")
    max_age_h: float = Field(168.0, gt=0, title="Events older than this are dropped, logged")
    group_commit_ms: float = Field(
        50.0,
        ge=0,
        le=1000,
        title="Group commit window, ms: events handed over within it share one commit (one fsync)",
        description="The writer thread commits every event handed over within this time of the "
        "first in one transaction, so an idle writer commits an event this long after it was "
        "decided; when it is behind, the time counts from its previous commit, "
        "so a group never grows with the backlog; 0 commits without waiting for more",
    )


class InferenceConfig(StrictModel):
    """How `lineguard run` shares each model between stations (docs/performance.md,
    "Inference threads"); unset values follow the rule from cores and stations."""

    cores: int | None = Field(
        None, ge=1, le=1024, title="Cores for inference (None = the CPUs this process may use)"
    )
    streams: int | None = Field(
        None, ge=1, le=64, title="Parallel inferences per model (None = the rule)"
    )
    threads_per_stream: int | None = Field(
        None, ge=1, le=256, title="Threads per inference (None = the rule)"
    )


class MetricsConfig(StrictModel):
    """Prometheus endpoint (`/metrics`); `lineguard run --metrics-port` overrides the port."""

    port: int = Field(9464, ge=1, le=65535, title="TCP port serving /metrics")
    host: str = Field(
        "0.0.0.0",
        title="Address to listen on (0.0.0.0 = all; 127.0.0.1 = this PC only)",
    )


class SiteConfig(StrictModel):
    """One edge PC: its stations, its broker and where it keeps its state."""

    edge_id: str = Field(pattern=TOPIC_LEVEL, title="Edge PC id (an MQTT topic level)")
    topic_prefix: str = Field(
        "lineguard",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*[A-Za-z0-9_.-]$|^[A-Za-z0-9]$",
        title="First topic level(s) of every topic",
    )
    broker: BrokerConfig | None = Field(
        None, title="MQTT broker (None = no broker: events go to the outbox and stdout)"
    )
    stations: list[str] = Field(
        min_length=1, title="Station config files or glob patterns, relative to this file"
    )
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, title="Event outbox")
    stats_interval_s: float = Field(10.0, gt=0, title="Seconds between stats messages")
    inference: InferenceConfig = Field(
        default_factory=InferenceConfig, title="Model sharing: cores, streams, threads"
    )
    metrics: MetricsConfig | None = Field(
        None, title="Prometheus /metrics endpoint (None = off unless --metrics-port is given)"
    )
    audit_log: ConfigPath = Field(
        Path("state/audit.jsonl"), title="Audit log of threshold changes (JSON lines)"
    )

    @model_validator(mode="after")
    def _defaults_resolved(self, info: ValidationInfo) -> SiteConfig:
        # Defaults are not validated, so resolve the default paths against base_dir here.
        base = (info.context or {}).get("base_dir")
        if base is not None:
            if "path" not in self.outbox.model_fields_set:
                self.outbox.path = Path(base) / self.outbox.path
            if "audit_log" not in self.model_fields_set:
                self.audit_log = Path(base) / self.audit_log
        if check_local(info):  # what `run` will create or write, checked without touching disk
            for key, path in (("outbox.path", self.outbox.path), ("audit_log", self.audit_log)):
                problem = writable_file_problem(path)
                if problem:
                    raise ValueError(f"{key}: {problem}")
        return self

    def client_id(self) -> str:
        if self.broker is not None and self.broker.client_id:
            return self.broker.client_id
        return f"lineguard-{self.edge_id}"
