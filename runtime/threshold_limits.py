"""The one validation of decision thresholds, shared by every way thresholds enter the runtime.

Used by the station config models (`config.ThresholdConfig`), the model card's defaults
(`artifact.Thresholds`), the MQTT `threshold/set` handler (`threshold_commands.py`),
`lineguard calibrate` (before it writes a file or sends a command) and `lineguard deploy` (which
validates configs and the card with the models above). A value is accepted only when it has the
right type and lies within the documented bounds; anything else is refused with the field and the
reason, so no station can be silenced (an infinite or huge image threshold never alerts) or made
to alert on every frame (a negative one) by a typo or a hostile message.

Bounds (normalised units: 0 = the median normal score, 1.0 ≈ the 99th percentile):

| field | type | bounds |
|---|---|---|
| `image` | finite number | `0 < image <= 1000` |
| `pixel` | finite number | `0 < pixel <= 1000` |
| `min_area_px` | integer (not a boolean) | `1 <= min_area_px <= 1000000` |

A threshold at or below 0 flags at least half of all normal frames (pixels); one above 1000 is a
thousand times the normal spread and would never alert.
"""

from __future__ import annotations

import math
import numbers
from typing import Annotated, Any

from pydantic import BeforeValidator

SCORE_MIN = 0.0  # exclusive
SCORE_MAX = 1000.0  # inclusive
AREA_MIN = 1
AREA_MAX = 1_000_000
KEYS = ("image", "pixel", "min_area_px")
SCORE_KEYS = ("image", "pixel")


class ThresholdError(ValueError):
    """One refused value: `field` names it, `reason` says why."""

    def __init__(self, field: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_score(field: str, value: Any) -> float:
    """An image or pixel threshold as a float, or ThresholdError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ThresholdError(
            field, f"must be a valid number, got {type(value).__name__} {_shown(value)}"
        )
    if not isinstance(value, int):  # numpy floats too
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ThresholdError(field, f"must be a finite number, got {value}")
    # Compare before converting: an int above ~1.8e308 cannot become a float (OverflowError).
    if not SCORE_MIN < value <= SCORE_MAX:
        raise ThresholdError(
            field, f"must be > {SCORE_MIN:g} and <= {SCORE_MAX:g}, got {_shown(value)}"
        )
    return float(value)


def check_area(field: str, value: Any) -> int:
    """`min_area_px` as an int, or ThresholdError (a float with an integral value is accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ThresholdError(
            field, f"must be an integer, got {type(value).__name__} {_shown(value)}"
        )
    value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        raise ThresholdError(field, f"must be an integer, got {_shown(value)}")
    if not AREA_MIN <= value <= AREA_MAX:
        raise ThresholdError(
            field, f"must be between {AREA_MIN} and {AREA_MAX}, got {_shown(value)}"
        )
    return int(value)


def check_value(key: str, value: Any, field: str | None = None) -> float | int:
    """Check one threshold by its key (`image`, `pixel` or `min_area_px`)."""
    name = field or key
    if key == "min_area_px":
        return check_area(name, value)
    if key in SCORE_KEYS:
        return check_score(name, value)
    raise ThresholdError(name, f"unknown threshold (expected one of {', '.join(KEYS)})")


def check_thresholds(values: dict[str, Any], prefix: str = "") -> dict[str, float | int]:
    """Check every value; returns them converted, or raises one ThresholdError whose `field` is
    the first refused key and whose message names every refused field."""
    out: dict[str, float | int] = {}
    errors: list[ThresholdError] = []
    for key, value in values.items():
        try:
            out[key] = check_value(key, value, f"{prefix}{key}")
        except ThresholdError as exc:
            errors.append(exc)
    if errors:
        if len(errors) == 1:
            raise errors[0]
        first = errors[0]
        raise ThresholdError(first.field, first.reason, "; ".join(str(e) for e in errors))
    return out


def _pydantic(key: str):
    def validate(value: Any) -> Any:
        if value is None:
            return None
        try:
            return check_value(key, value)
        except ThresholdError as exc:  # pydantic names the field itself
            raise ValueError(exc.reason) from None

    return BeforeValidator(validate)


# Annotated types for pydantic models: the same checks, errors in pydantic's usual format.
ImageThreshold = Annotated[float, _pydantic("image")]
PixelThreshold = Annotated[float, _pydantic("pixel")]
MinAreaPx = Annotated[int, _pydantic("min_area_px")]
