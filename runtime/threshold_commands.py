"""Parse and check a `threshold/set` command before anything changes.

A command is refused (and answered on `threshold/error`) when it is retained (a retained command
would be re-applied by every reconnect), not UTF-8 JSON, uses NaN/Infinity, or breaks
`threshold_set.schema.json`. The error names the offending field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lineguard.runtime import events as ev


class CommandError(ValueError):
    """Why a command was refused; carries the request_id when one could be read."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class ThresholdCommand:
    """A checked command: `values` holds only the thresholds it sets."""

    by: str
    reason: str
    values: dict[str, Any] = field(default_factory=dict)
    shadow: bool = False
    clear_shadow: bool = False
    request_id: str | None = None


def _no_constants(name: str) -> Any:
    raise CommandError(f"{name} is not a number JSON allows")


def parse_threshold_command(raw: bytes, retained: bool = False) -> ThresholdCommand:
    """Decode and validate; raises CommandError with a message naming the problem."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"payload is not JSON: {exc.msg} at character {exc.pos}") from None
    request_id = data.get("request_id") if isinstance(data, dict) else None
    request_id = request_id if isinstance(request_id, str) else None
    if retained:
        raise CommandError(
            "retained threshold/set commands are refused (they would re-apply on every "
            "reconnect); publish with retain=false",
            request_id,
        )
    errors = ev.schema_errors("threshold_set", data)
    if errors:
        raise CommandError("; ".join(errors), request_id)
    values = {k: data[k] for k in ("image", "pixel", "min_area_px") if k in data}
    if data.get("shadow") and data.get("clear_shadow"):
        raise CommandError("shadow and clear_shadow cannot both be true", request_id)
    return ThresholdCommand(
        by=data["by"],
        reason=data["reason"],
        values=values,
        shadow=bool(data.get("shadow", False)),
        clear_shadow=bool(data.get("clear_shadow", False)),
        request_id=request_id,
    )
