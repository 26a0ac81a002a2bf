"""Issue 14, finding 2: an event whose payload JSON cannot carry (a non-finite score) was never
committed (`Out of range float values`): it is now committed with nulls, flagged, counted on the
stats topic and reported on the station's status."""

from __future__ import annotations

import io
import json
import math

import pytest
from runtime_fakes import linked_service

from lineguard.runtime import events as ev


@pytest.fixture
def service(tmp_path):
    with linked_service(tmp_path, stdout=io.StringIO()) as svc:
        yield svc


@pytest.mark.parametrize("score", [math.inf, math.nan])
def test_non_finite_event_is_committed_flagged_and_counted(service, score):
    station = service.slots["s1"].station
    assert station.feed(score) is True  # the fake alerts: score (and region scores) non-finite
    rows = service.outbox.pending(after_id=0, limit=10)
    assert len(rows) == 1, "the event must be committed"
    payload = json.loads(rows[0].payload)
    assert payload["image_score"] is None and payload["regions"][0]["max_score"] is None
    assert any("image_score" in p for p in payload["payload_errors"])
    assert ev.schema_errors("defect", payload) == []
    (_topic, stats), *_ = service.stats_messages()
    assert stats["payload_errors"] == 1 and ev.schema_errors("stats", stats) == []
    status = [json.loads(p) for t, p, _ in service.link.sent if t.endswith("/status")]
    assert status and "JSON cannot carry" in status[-1]["reason"]
    assert ev.schema_errors("status", status[-1]) == []
    # The next, normal event goes through untouched.
    station.feed(5.0)
    rows = service.outbox.pending(after_id=0, limit=10)
    assert len(rows) == 2 and "payload_errors" not in json.loads(rows[1].payload)


def test_sanitize_replaces_only_what_json_cannot_carry():
    import numpy as np

    value = {"a": [1.0, math.nan, {"b": math.inf}], "c": np.float32(2.5), "d": "x", "e": None}
    clean, problems = ev.sanitize(value)
    assert clean == {"a": [1.0, None, {"b": None}], "c": 2.5, "d": "x", "e": None}
    assert problems == ["a[1]: nan replaced by null", "a[2].b: inf replaced by null"]
    ev.encode(clean)
