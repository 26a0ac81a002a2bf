"""The demo's live part: `lineguard run` from the installed release, watched until every
folder-replay camera has ended and every event it raised has arrived, then stopped with SIGTERM.

With a broker, alerts, statuses and stats come from the MQTT subscriber (`support`); without
one, the runtime prints each event as a JSON line on stdout and logs status changes, so both are
read from its pipes instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import TextIO

from lineguard.deploy.demo.support import (
    Alert,
    Observed,
    StationInfo,
    child_env,
    lineguard_cmd,
    shown,
    stop_process,
)

_STATUS = re.compile(r"station (\S+): (online|offline|camera-lost) ?(.*)$")


def format_alert(alert: Alert, station: StationInfo | None) -> str:
    p = alert.payload
    name, label = station.frame_of(p) if station else ("?", "?")
    regions = p.get("regions", [])
    where = ", ".join(
        f"[{', '.join(f'{v:.0f}' for v in r['bbox'])}] {r['area_px']:.0f}px" for r in regions
    )
    th = p.get("thresholds", {}).get("image", float("nan"))
    return (
        f"  ALERT {alert.station}  frame {p.get('frame_id')} ({label}: {name})  score "
        f"{p.get('image_score', float('nan')):.2f} > {th:.2f}  {len(regions)} region(s) {where}"
    )


class LineRun:
    """One `lineguard run --site SITE` process and what it reported."""

    def __init__(self, stations: list[StationInfo], seen: Observed, mqtt: bool) -> None:
        self.stations = {s.station_id: s for s in stations}
        self.seen = seen
        self.mqtt = mqtt

    def print_alert(self, alert: Alert) -> None:
        print(format_alert(alert, self.stations.get(alert.station)), flush=True)

    def run(self, site: Path, log_path: Path, timeout: float) -> str:
        """Run until the replays ended (or `timeout`), stop cleanly; returns a short note.

        Raises RuntimeError when the runtime exits by itself or does not stop with exit code 0.
        """
        argv = ["run", "--site", str(site)]
        print(f"$ {shown(argv)}", flush=True)
        env = child_env()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [*lineguard_cmd(), *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                text=True,
            )
            lock = threading.Lock()
            readers = [
                threading.Thread(target=self._stdout, args=(proc.stdout, log, lock), daemon=True),
                threading.Thread(target=self._stderr, args=(proc.stderr, log, lock), daemon=True),
            ]
            for t in readers:
                t.start()
            ended_at = self._wait(proc, timeout)
            if proc.poll() is not None:
                for t in readers:
                    t.join(5)
                raise RuntimeError(f"the runtime exited early (code {proc.returncode})")
            print("stopping the runtime (SIGTERM) ...", flush=True)
            code = stop_process(proc)
            for t in readers:
                t.join(5)
        time.sleep(0.5)  # the retained 'offline' statuses published while stopping
        if code != 0:
            raise RuntimeError(f"the runtime did not stop cleanly (exit {code})")
        note = f"runtime exit code {code}"
        if ended_at is None:
            note += f"; stopped after {timeout:g} s, before every replay had ended"
        return note

    def _wait(self, proc: subprocess.Popen, timeout: float) -> float | None:
        ids = list(self.stations)
        deadline = time.monotonic() + timeout
        ended_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            if self.seen.ended(ids):
                ended_at = ended_at or time.monotonic()
                if self._all_delivered(ids) or time.monotonic() - ended_at > 15:
                    break
            time.sleep(0.2)
        return ended_at

    def _all_delivered(self, ids: list[str]) -> bool:
        """With a broker: the last stats say every event each station raised has arrived."""
        if not self.mqtt:
            return True
        with self.seen.lock:
            stats = dict(self.seen.stats)
        for sid in ids:
            st = stats.get(sid)
            if st is None or st.get("state") != "offline":
                return False
            if len(self.seen.alerts_of(sid)) < int(st.get("events", 0)):
                return False
        return True

    def _stdout(self, stream: TextIO, log: TextIO, lock: threading.Lock) -> None:
        for line in stream:
            with lock:
                log.write(line)
            if self.mqtt or not line.startswith("{"):
                continue
            try:
                payload = json.loads(line)
            except ValueError:
                continue
            path = (payload.get("evidence") or {}).get("path")
            jpeg = Path(path).read_bytes() if path and Path(path).is_file() else None
            alert = Alert(str(payload.get("station")), payload, time.time(), jpeg)
            with self.seen.lock:
                self.seen.alerts.append(alert)
            self.print_alert(alert)

    def _stderr(self, stream: TextIO, log: TextIO, lock: threading.Lock) -> None:
        for line in stream:
            with lock:
                log.write(line)
            if " WARNING " in line or " ERROR " in line:
                print(f"  runtime: {line.rstrip()}", flush=True)
            m = _STATUS.search(line)
            if m and not self.mqtt:  # with a broker the subscriber reads the status topic
                state, reason = m.group(2), m.group(3).strip()
                with self.seen.lock:
                    self.seen.status[m.group(1)] = (state, reason)
                print(f"  log   {m.group(1)}: {state} {reason}", flush=True)
