"""The service's outbox commit of defect events, one event or a whole group per transaction.

A mixin of `Service` (like `threshold_handler.py`): the event writer thread calls
`commit_events` with every event it built within `outbox.group_commit_ms`, so one fsync covers
them all; `Service.submit_event` commits one event the same way on the caller's thread. An event
is published only after this commit (the publisher reads the outbox, nothing else).
"""

from __future__ import annotations

import logging
from typing import Any

from lineguard.runtime import events as ev
from lineguard.runtime.event_writer import Built
from lineguard.runtime.outbox import Pending

log = logging.getLogger("lineguard.runtime.service")


class EventCommitMixin:
    """Needs the service's slots, topics, outbox, publisher, stdout and `set_status`."""

    def commit_events(self, batch: list[Built]) -> list[str]:
        """Commit events (each with its evidence JPEG) in ONE outbox transaction, then wake the
        publisher; returns the schema errors found (logged, checked after the commit).

        The station has already attached the evidence reference (`events.attach_evidence`, with
        the topic from the service's `evidence_topic`); the JPEG goes on that topic when given.
        An event JSON cannot carry as built (NaN, infinity) is committed anyway, with those
        values null and listed in its `payload_errors`; the error is counted (stats
        `payload_errors`) and reported on the station's status.
        """
        rows: list[Pending] = []
        encoded: list[tuple[str, dict[str, Any], bytes]] = []
        for station_id, payload, jpeg in batch:
            payload, data = self._event_rows(station_id, payload, jpeg, rows)
            encoded.append((station_id, payload, data))
        self.outbox.put_many(rows)
        if self.publisher is not None:
            self.publisher.wake()
        else:
            with self._stdout_lock:
                for _, _, data in encoded:
                    self.stdout.write(data.decode("utf-8") + "\n")
                self.stdout.flush()
        found: list[str] = []
        for station_id, payload, _ in encoded:
            errors = ev.schema_errors("defect", payload)
            if errors:
                self._schema_failures += 1
                log.error("station %s: defect payload breaks its schema: %s", station_id, errors)
                found += errors
        return found

    def _event_rows(
        self, station_id: str, payload: dict[str, Any], jpeg: bytes | None, rows: list[Pending]
    ) -> tuple[dict[str, Any], bytes]:
        """Encode one event (sanitised if it must be) and append its outbox rows."""
        cfg = self.slots[station_id].config
        try:
            data = ev.encode(payload)
        except (TypeError, ValueError) as exc:
            payload, problems = ev.sanitize(payload)
            payload["payload_errors"] = problems or [f"(payload): {exc}"]
            data = ev.encode(payload)
            self._payload_error(station_id, payload["payload_errors"])
        event_id = payload.get("event_id") or ev.new_event_id()
        evidence = payload.get("evidence") or {}
        if jpeg and not evidence:
            topic = self.topics.evidence(cfg.line_id, cfg.station_id, event_id)
            evidence = ev.attach_evidence(payload, jpeg, topic=topic, path=None)["evidence"]
            data = ev.encode(payload)
        rows.append(
            Pending(self.topics.defect(cfg.line_id, cfg.station_id), data, 1, False, event_id)
        )
        if jpeg and evidence.get("topic"):
            rows.append(Pending(evidence["topic"], jpeg, 1, False, event_id))
        return payload, data

    def _payload_error(self, station_id: str, problems: list[str]) -> None:
        slot = self.slots[station_id]
        slot.payload_errors += 1
        log.error(
            "station %s: event payload not JSON as built, committed with nulls: %s",
            station_id,
            "; ".join(problems),
        )
        reason = (
            f"{slot.payload_errors} event(s) held values JSON cannot carry, sent with null "
            f"(last: {problems[0][:200]})"
        )
        try:
            self.set_status(station_id, slot.state, reason)
        except Exception:
            log.exception("station %s: status for a payload error failed", station_id)
