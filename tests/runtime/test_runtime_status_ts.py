"""Issue 14, finding 10: at start a retained status `{"state": "offline", "reason": "starting",
"ts": "1970-01-01T00:00:00.000Z"}` was sometimes published: the broker connected before the
station reported, and the slot's state time was 0.0."""

from __future__ import annotations

import json
import time
from datetime import datetime

from runtime_fakes import RecordingLink, ScriptedStation, write_site

from lineguard.runtime import events as ev
from lineguard.runtime.config_loader import load_site
from lineguard.runtime.service import Service


def test_status_published_before_the_station_reports_has_a_real_time(tmp_path):
    site = write_site(tmp_path, None, stations=("s1", "s2"))
    svc = Service(load_site(site, check_files=False), station_factory=ScriptedStation)
    before = time.time()
    svc.link = RecordingLink()
    svc._on_connected()  # the broker connects before any station has started
    status = [json.loads(p) for t, p, retained in svc.link.sent if t.endswith("/status")]
    assert len(status) == 2 and all(p["state"] == "offline" for p in status)
    for payload in status:
        assert ev.schema_errors("status", payload) == []
        ts = datetime.fromisoformat(payload["ts"].replace("Z", "+00:00")).timestamp()
        assert ts >= before - 5, payload["ts"]
    svc.link = None
