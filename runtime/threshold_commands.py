"""Parse and check a `threshold/set` command before anything changes.

A command is refused (and answered on `threshold/error` with the field at fault) when it is
retained, not UTF-8 JSON (including JSON too deeply nested or with numbers Python cannot hold),
uses NaN/Infinity (also as an overflowing literal such as 1e999), breaks
`threshold_set.schema.json`, or sets a threshold outside the bounds of `threshold_limits.py`.

Retained commands: the runtime subscribes with MQTT 5 "retain as published", so a command
published with retain=true carries the flag both when it is replayed from the broker's store and
when it reaches the runtime live; either way it is refused (see docs/mqtt.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lineguard.runtime import events as ev
from lineguard.runtime.threshold_limits import ThresholdError, check_thresholds

THRESHOLD_KEYS = ("image", "pixel", "min_area_px")


class CommandError(ValueError):
    """Why a command was refused: `field` names the part at fault (None = the whole payload);
    carries the request_id when one could be read."""

    def __init__(
        self, message: str, request_id: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.field = field


@dataclass(frozen=True)
class ThresholdCommand:
    """A checked command: `values` holds only the thresholds it sets, already converted."""

    by: str
    reason: str
    values: dict[str, Any] = field(default_factory=dict)
    shadow: bool = False
    clear_shadow: bool = False
    request_id: str | None = None


def _no_constants(name: str) -> Any:
    raise CommandError(f"{name} is not a number JSON allows")


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"payload is not JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise CommandError("payload is not JSON the runtime accepts: nested too deeply") from None
    except (OverflowError, ValueError) as exc:  # e.g. an integer literal of over 4300 digits
        raise CommandError(f"payload is not JSON the runtime accepts: {exc}") from None


def _non_finite(data: dict[str, Any]) -> tuple[str, Any] | None:
    for key, value in data.items():
        if isinstance(value, float) and not math.isfinite(value):
            return key, value
    return None


def parse_threshold_command(raw: bytes, retained: bool = False) -> ThresholdCommand:
    """Decode and validate; raises CommandError with a message naming the problem."""
    data = _decode(raw)
    if not isinstance(data, dict):
        raise CommandError(f"payload must be a JSON object, got {type(data).__name__}")
    request_id = data.get("request_id")
    request_id = request_id if isinstance(request_id, str) and len(request_id) <= 200 else None
    if retained:
        raise CommandError(
            "retained threshold/set commands are refused (they would re-apply on every "
            "reconnect); publish with retain=false",
            request_id,
        )
    bad = _non_finite(data)
    if bad is not None:
        raise CommandError(f"{bad[0]}: must be a finite number, got {bad[1]}", request_id, bad[0])
    try:
        values = check_thresholds({k: data[k] for k in THRESHOLD_KEYS if k in data})
    except ThresholdError as exc:
        raise CommandError(str(exc), request_id, exc.field) from None
    problems = ev.schema_problems("threshold_set", data)
    if problems:
        raise CommandError("; ".join(m for _, m in problems), request_id, problems[0][0])
    if data.get("shadow") and data.get("clear_shadow"):
        raise CommandError("shadow and clear_shadow cannot both be true", request_id, "shadow")
    return ThresholdCommand(
        by=data["by"],
        reason=data["reason"],
        values=values,
        shadow=bool(data.get("shadow", False)),
        clear_shadow=bool(data.get("clear_shadow", False)),
        request_id=request_id,
    )
