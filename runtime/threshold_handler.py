"""`threshold/set` handling of the service (`Service` inherits it): check, audit, apply, echo.

Every refusal is answered on `threshold/error` with the field at fault. Nothing is applied,
audited or echoed unless the command and the resulting state are entirely valid (bounds of
`threshold_limits.py`, strict JSON); the audit entry is fsynced before the change takes effect,
so a change that cannot be audited is refused too.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from lineguard.runtime import events as ev
from lineguard.runtime.threshold_commands import (
    CommandError,
    ThresholdCommand,
    parse_threshold_command,
)
from lineguard.runtime.threshold_limits import ThresholdError, check_thresholds

if TYPE_CHECKING:
    from lineguard.runtime.audit import AuditLog
    from lineguard.runtime.site_config import SiteConfig

log = logging.getLogger(__name__)


class ThresholdCommandsMixin:
    """Needs the service's `slots`, `site`, `topics`, `audit`, `_publish_now` and
    `_threshold_message`."""

    slots: dict[str, Any]
    site: SiteConfig
    topics: ev.Topics
    audit: AuditLog

    def handle_threshold_command(self, station_id: str, raw: bytes, retained: bool = False) -> bool:
        """Validate and apply one threshold/set command; returns whether it was applied.

        Every refusal is answered on threshold/error with the field at fault. Nothing is applied,
        audited or echoed unless the command and the resulting state are entirely valid; the
        audit entry is written before the change takes effect.
        """
        slot = self.slots[station_id]
        if not raw:  # an empty retained publish deletes a retained command: nothing to do
            log.info("station %s: empty threshold/set payload ignored", station_id)
            return False
        try:
            cmd = parse_threshold_command(raw, retained)
            if slot.station is None:
                raise CommandError(f"station {station_id} is not running", cmd.request_id)
            self._apply_command(slot, cmd)
        except CommandError as exc:
            self._refuse(slot, raw, str(exc), exc.request_id, exc.field)
            return False
        except Exception as exc:  # whatever happens, the sender gets an answer
            log.exception("station %s: threshold/set failed", station_id)
            self._refuse(slot, raw, f"command not applied: {type(exc).__name__}: {exc}", None, None)
            return False
        return True

    def _refuse(
        self, slot: Any, raw: bytes, error: str, request_id: str | None, field: str | None
    ) -> None:
        c = slot.config
        log.warning("station %s: threshold/set refused: %s", c.station_id, error)
        payload = ev.threshold_error_payload(
            self.site.edge_id, c.line_id, c.station_id, error, raw, request_id, field
        )
        self._publish_now(self.topics.threshold_error(c.line_id, c.station_id), payload, False)

    def _apply_command(self, slot: Any, cmd: ThresholdCommand) -> None:
        station, c = slot.station, slot.config
        active, shadow = station.thresholds(), station.shadow()
        new_active, new_shadow = dict(active), None if shadow is None else dict(shadow)
        if cmd.clear_shadow:
            new_shadow = None
        if cmd.values and cmd.shadow:
            new_shadow = {**(new_shadow or active), **cmd.values}
        elif cmd.values:
            new_active.update(cmd.values)
        try:  # the whole resulting state must be valid and encodable before anything changes
            check_thresholds(new_active, "active.")
            if new_shadow is not None:
                check_thresholds(new_shadow, "shadow.")
            limit = getattr(station, "max_area_px", None)  # the anomaly map's size
            for name, t in (("active", new_active), ("shadow", new_shadow)):
                if limit is not None and t is not None and t["min_area_px"] > limit:
                    raise ThresholdError(
                        f"{name}.min_area_px",
                        f"must be <= {limit}, the anomaly map's pixels (else nothing alerts)",
                    )
            ev.encode(
                ev.threshold_state_payload(
                    self.site.edge_id, c.line_id, c.station_id, new_active, new_shadow
                )
            )
        except (ThresholdError, ValueError, OverflowError) as exc:
            field = exc.field if isinstance(exc, ThresholdError) else None
            msg = f"resulting thresholds invalid: {exc}"
            raise CommandError(msg, cmd.request_id, field) from None
        try:
            self.audit.append(
                station=c.station_id,
                line=c.line_id,
                edge_id=self.site.edge_id,
                by=cmd.by,
                reason=cmd.reason,
                old={"active": active, "shadow": shadow},
                new={"active": new_active, "shadow": new_shadow},
                action="threshold/shadow" if cmd.shadow or cmd.clear_shadow else "threshold/set",
                request_id=cmd.request_id,
            )
        except (OSError, ValueError) as exc:
            raise CommandError(
                f"audit log not written ({exc}); nothing changed", cmd.request_id
            ) from None
        if cmd.clear_shadow or cmd.shadow:
            if new_shadow is None:
                station.set_shadow(None, None, None)
            else:
                station.set_shadow(**new_shadow)
        if cmd.values and not cmd.shadow:
            station.set_thresholds(**cmd.values)
        slot.threshold_by, slot.threshold_reason = cmd.by, cmd.reason
        slot.threshold_request, slot.threshold_ts = cmd.request_id, time.time()
        self._publish_now(*self._threshold_message(slot), retain=True)
