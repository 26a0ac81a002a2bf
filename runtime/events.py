"""MQTT topics and JSON payloads, each checked against its JSON Schema in `runtime/schemas/`.

Payloads are plain JSON objects with `schema_version` and `type`, never Python reprs; the schema
files are the contract for consumers (MES, dashboards). Builders here are the only place payloads
are assembled, so what goes on the wire always matches the schema the tests check.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

SCHEMA_VERSION = 1
SCHEMA_NAMES = (
    "defect",
    "evidence",
    "status",
    "available",
    "stats",
    "threshold_values",
    "threshold_set",
    "threshold_state",
    "threshold_error",
)
STATES = ("online", "offline", "camera-lost")


def new_event_id() -> str:
    """A UUIDv7 (RFC 9562): unique, and sorts by creation time, which helps consumers and logs."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76 | ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62 | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def iso(ts: float | None = None) -> str:
    """UTC ISO 8601 with milliseconds and a Z, e.g. 2026-05-01T08:00:00.123Z."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Topics:
    """Every topic of one edge PC (docs/architecture.md "MQTT")."""

    prefix: str
    edge_id: str

    def available(self) -> str:
        return f"{self.prefix}/{self.edge_id}/available"

    def station(self, line: str, station: str, leaf: str) -> str:
        return f"{self.prefix}/{line}/{station}/{leaf}"

    def status(self, line: str, station: str) -> str:
        return self.station(line, station, "status")

    def defect(self, line: str, station: str) -> str:
        return self.station(line, station, "defect")

    def evidence(self, line: str, station: str, event_id: str) -> str:
        return self.station(line, station, f"evidence/{event_id}")

    def stats(self, line: str, station: str) -> str:
        return self.station(line, station, "stats")

    def threshold_set(self, line: str, station: str) -> str:
        return self.station(line, station, "threshold/set")

    def threshold_state(self, line: str, station: str) -> str:
        return self.station(line, station, "threshold/state")

    def threshold_error(self, line: str, station: str) -> str:
        return self.station(line, station, "threshold/error")


# ---------------------------------------------------------------- schemas and validation


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema for payload `name` (one of SCHEMA_NAMES)."""
    text = resources.files("lineguard.runtime").joinpath(f"schemas/{name}.schema.json").read_text()
    return json.loads(text)


@cache
def _validator(name: str) -> Draft202012Validator:
    registry = Registry().with_resources(
        (load_schema(n)["$id"], Resource.from_contents(load_schema(n))) for n in SCHEMA_NAMES
    )
    return Draft202012Validator(
        load_schema(name), registry=registry, format_checker=FormatChecker()
    )


def schema_errors(name: str, payload: Any) -> list[str]:
    """Every way `payload` breaks schema `name`, as 'field.path: message' lines (empty = valid)."""
    errors = sorted(_validator(name).iter_errors(payload), key=lambda e: list(e.absolute_path))
    return [_describe(e) for e in errors]


def schema_problems(name: str, payload: Any) -> list[tuple[str, str]]:
    """Like `schema_errors`, as (field, message) pairs; the field of a missing or unexpected key
    is that key."""
    errors = sorted(_validator(name).iter_errors(payload), key=lambda e: list(e.absolute_path))
    out = []
    for e in errors:
        where = ".".join(str(p) for p in e.absolute_path)
        if isinstance(e.instance, dict) and e.validator in ("required", "additionalProperties"):
            if e.validator == "required":
                keys = [k for k in e.validator_value if k not in e.instance]
            else:
                known = e.schema.get("properties", {})
                keys = [k for k in e.instance if k not in known]
            if keys:
                where = ".".join(filter(None, (where, str(keys[0]))))
        out.append((where or "(payload)", _describe(e)))
    return out


def _describe(error: ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(payload)"
    options = error.validator_value if error.validator == "anyOf" else None
    if options and all("required" in o for o in options):
        keys = ", ".join(k for o in options for k in o["required"])
        return f"{where}: needs at least one of {keys}"
    return f"{where}: {error.message}"


def check(name: str, payload: Any) -> None:
    """Raise ValueError naming every schema violation (used before anything is published)."""
    errors = schema_errors(name, payload)
    if errors:
        raise ValueError(f"{name} payload breaks its schema: " + "; ".join(errors))


def encode(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN/Infinity are refused (they are not JSON)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


def sanitize(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """A copy of `value` that strict JSON can carry, and what was changed: non-finite numbers
    become null, values JSON has no type for become their text (numpy scalars become numbers)."""
    problems: list[str] = []

    def walk(v: Any, where: str) -> Any:
        if isinstance(v, dict):
            return {str(k): walk(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if v is None or isinstance(v, bool | str):
            return v
        if isinstance(v, int):
            return v
        if hasattr(v, "item") and not isinstance(v, float):  # numpy scalar
            try:
                return walk(v.item(), where)
            except (TypeError, ValueError):
                pass
        if isinstance(v, float):
            if math.isfinite(v):
                return v
            problems.append(f"{where or '(payload)'}: {v} replaced by null")
            return None
        problems.append(f"{where or '(payload)'}: {type(v).__name__} replaced by its text")
        return str(v)

    return walk(value, path), problems


# ---------------------------------------------------------------- builders


def defect_payload(
    *,
    edge_id: str,
    line: str,
    station: str,
    frame_id: int,
    captured_at: float,
    image_score: float,
    thresholds: dict[str, Any],
    regions: list[dict[str, Any]],
    model_sha256: str,
    prompt_sha256: str,
    frame_size: tuple[int, int] | None = None,
    latency_ms: float | None = None,
    model_name: str | None = None,
    engine: str | None = None,
    precision: str | None = None,
    event_id: str | None = None,
    detected_at: float | None = None,
) -> dict[str, Any]:
    """A defect event. `captured_at`/`detected_at` are epoch seconds; bboxes in frame pixels.

    `regions` items: `{"bbox": [x, y, w, h], "area_px", "max_score", "mean_score"}`. The evidence
    reference is added by the service (`attach_evidence`) when it has stored the JPEG.
    """
    model: dict[str, Any] = {"sha256": model_sha256}
    for key, value in (("name", model_name), ("engine", engine), ("precision", precision)):
        if value is not None:
            model[key] = value
    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "type": "defect",
        "event_id": event_id or new_event_id(),
        "edge_id": edge_id,
        "line": line,
        "station": station,
        "frame_id": int(frame_id),
        "captured_at": iso(captured_at),
        "detected_at": iso(detected_at),
        "latency_ms": None if latency_ms is None else round(float(latency_ms), 3),
        "image_score": float(image_score),
        "thresholds": {
            "image": float(thresholds["image"]),
            "pixel": float(thresholds["pixel"]),
            "min_area_px": int(thresholds["min_area_px"]),
        },
        "regions": [
            {
                "bbox": [float(v) for v in r["bbox"]],
                "area_px": float(r["area_px"]),
                "max_score": float(r["max_score"]),
                "mean_score": float(r["mean_score"]),
            }
            for r in regions
        ],
        "model": model,
        "prompt": {"sha256": prompt_sha256},
        "evidence": None,
    }
    if frame_size is not None:
        payload["frame_size"] = [int(frame_size[0]), int(frame_size[1])]
    return payload


def attach_evidence(
    payload: dict[str, Any],
    jpeg: bytes,
    *,
    topic: str | None,
    path: str | None,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Add the evidence reference (where the JPEG is) to a defect payload, in place."""
    ref: dict[str, Any] = {
        "content_type": "image/jpeg",
        "bytes": len(jpeg),
        "sha256": hashlib.sha256(jpeg).hexdigest(),
        "topic": topic,
        "path": path,
    }
    if size is not None:
        ref["width"], ref["height"] = int(size[0]), int(size[1])
    payload["evidence"] = ref
    return payload


def status_payload(
    edge_id: str, line: str, station: str, state: str, reason: str = "", ts: float | None = None
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "status",
        "edge_id": edge_id,
        "line": line,
        "station": station,
        "state": state,
        "reason": reason,
        "ts": iso(ts),
    }


def threshold_values(values: dict[str, Any]) -> dict[str, Any]:
    return {
        "image": float(values["image"]),
        "pixel": float(values["pixel"]),
        "min_area_px": int(values["min_area_px"]),
    }


def threshold_state_payload(
    edge_id: str,
    line: str,
    station: str,
    active: dict[str, Any],
    shadow: dict[str, Any] | None,
    changed_by: str | None = None,
    reason: str | None = None,
    request_id: str | None = None,
    ts: float | None = None,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "threshold_state",
        "edge_id": edge_id,
        "line": line,
        "station": station,
        "ts": iso(ts),
        "active": threshold_values(active),
        "shadow": None if shadow is None else threshold_values(shadow),
        "changed_by": changed_by,
        "reason": reason,
        "request_id": request_id,
    }


def threshold_error_payload(
    edge_id: str,
    line: str,
    station: str,
    error: str,
    received: bytes,
    request_id: str | None,
    field: str | None = None,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "threshold_error",
        "edge_id": edge_id,
        "line": line,
        "station": station,
        "ts": iso(),
        "error": error or "refused",
        "field": field,
        "request_id": request_id if request_id is None or len(request_id) <= 200 else None,
        "received": received[:1000].decode("utf-8", errors="replace")[:1000],
    }


def stats_payload(
    edge_id: str,
    line: str,
    station: str,
    interval_s: float,
    station_stats: dict[str, Any],
    outbox_depth: int,
    broker_connected: bool,
    state: str,
) -> dict[str, Any]:
    """Stats from the station's `stats()` dict (fps, latency_p50_ms, latency_p95_ms, frames,
    dropped_frames, events, shadow) plus what the service knows (outbox, broker, state)."""

    def opt_ms(key: str) -> float | None:
        value = station_stats.get(key)
        return None if value is None else round(float(value), 3)

    shadow = station_stats.get("shadow")
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "stats",
        "edge_id": edge_id,
        "line": line,
        "station": station,
        "ts": iso(),
        "interval_s": float(interval_s),
        "fps": round(float(station_stats.get("fps", 0.0)), 3),
        "latency_p50_ms": opt_ms("latency_p50_ms"),
        "latency_p95_ms": opt_ms("latency_p95_ms"),
        "frames": int(station_stats.get("frames", 0)),
        "dropped_frames": int(station_stats.get("dropped_frames", 0)),
        "events": int(station_stats.get("events", 0)),
        "outbox_depth": int(outbox_depth),
        "broker_connected": bool(broker_connected),
        "state": state,
        "payload_errors": int(station_stats.get("payload_errors", 0)),
        "shadow": None
        if shadow is None
        else {
            "thresholds": threshold_values(shadow["thresholds"]),
            "frames": int(shadow["frames"]),
            "active_defects": int(shadow["active_defects"]),
            "candidate_defects": int(shadow["candidate_defects"]),
        },
    }
