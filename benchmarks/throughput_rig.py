"""One throughput row: mosquitto, the real `lineguard run` child process and the MES side.

Why a module of its own: runtime_throughput.py decides which rows to run and writes the
results; the broker on a free loopback port, the subscriber that times the events, the site
files, the process-tree CPU/RSS accounting and the Prometheus scrape are the rig each row runs
on, and are read (and changed) apart from the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil

MOSQUITTO = "/usr/sbin/mosquitto"
PREFIX = "lineguard"

# ---------------------------------------------------------------- broker and subscriber


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(folder: Path) -> tuple[subprocess.Popen, int]:
    """mosquitto on a free loopback port, anonymous, no persistence; waits until it listens."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"log_dest file {folder / 'mosquitto.log'}\nmax_queued_messages 100000\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"mosquitto did not start: {proc.communicate()[1].decode(errors='replace')}")


class Subscriber:
    """The MES side: receive time of every defect event and the latest stats of each station."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.lock = threading.Lock()
        self.events: list[tuple[float, str, float, float]] = []  # recv, station, captured, ms
        self.stats: list[tuple[float, dict]] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(f"{PREFIX}/+/+/defect", 1), (f"{PREFIX}/+/+/stats", 0)]
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        recv = time.time()
        payload = json.loads(msg.payload)
        with self.lock:
            if msg.topic.endswith("/defect"):
                captured = datetime.fromisoformat(payload["captured_at"]).timestamp()
                ms = payload.get("latency_ms")
                self.events.append((recv, payload["station"], captured, ms))
            else:
                self.stats.append((recv, payload))

    def reset(self) -> None:
        with self.lock:
            self.events.clear()
            self.stats.clear()

    def all_after(self, t: float, n: int) -> bool:
        with self.lock:
            return len({station for _, station, cap, _ in self.events if cap > t}) >= n

    def frames_seen(self) -> dict[str, int]:
        with self.lock:
            return {p["station"]: p["frames"] for _, p in self.stats}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ---------------------------------------------------------------- one row


def write_site(
    folder: Path, n: int, args: argparse.Namespace, port: int, frames: Path, thresholds: dict
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    golden = frames.parent / "golden.png"
    t = thresholds
    for i in range(n):
        (folder / f"st{i + 1}.yaml").write_text(
            f"station_id: st{i + 1}\nline_id: line1\nmodel: {args.artifact}\n"
            "engine: openvino\nprecision: int8\n"
            f"camera: {{kind: folder, path: {frames}, fps: {args.camera_fps}, loop: true}}\n"
            f"prompt: {{image: {golden}}}\n"
            # x.xxxxxxe-NN: a float for YAML 1.1 too (a bare 1e-06 would load as a string)
            f"thresholds: {{image: {t['image']:.6e}, pixel: {t['pixel']:.6e}, min_area_px: 1}}\n"
            f"evidence: {{mqtt: {str(args.evidence).lower()}}}\n"
        )
    site = folder / "site.yaml"
    site.write_text(
        f"edge_id: bench\ntopic_prefix: {PREFIX}\nstations: ['st*.yaml']\nstats_interval_s: 1\n"
        f"broker: {{host: 127.0.0.1, port: {port}}}\n"
        f"outbox: {{path: {folder / 'outbox.sqlite'}}}\naudit_log: {folder / 'audit.jsonl'}\n"
    )
    return site


def other_jobs() -> list[str]:
    """Training runs on the machine (they compete for the same cores), for the notes."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "lineguard" in cmd and " train" in cmd:
            found.append(f"pid {p.info['pid']}: {cmd}")
    return found


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


def window_delta(stats: list[tuple[float, dict]], t0: float, t1: float, key: str) -> dict:
    """Per station: (value at the last stats message <= t1) - (first >= t0), and the span."""
    out: dict[str, tuple[float, float]] = {}
    for station in sorted({p["station"] for _, p in stats}):
        inside = [(r, p) for r, p in stats if p["station"] == station and t0 <= r <= t1]
        if len(inside) < 2:
            continue
        (_, a), (_, b) = inside[0], inside[-1]
        span = (
            datetime.fromisoformat(b["ts"]).timestamp()
            - datetime.fromisoformat(a["ts"]).timestamp()
        )
        out[station] = (b[key] - a[key], span)
    return out


def scrape(port: int) -> dict[str, dict]:
    """The runtime's /metrics: capture-to-decision buckets (all stations) and counters."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    buckets: dict[float, float] = {}
    counters: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "lineguard_capture_to_decision_seconds_bucket":
                le = float(smp.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + smp.value
            elif smp.name.endswith("_total"):
                counters[smp.name] = counters.get(smp.name, 0.0) + smp.value
    return {"buckets": buckets, "counters": counters}


def bucket_quantile(q: float, a: dict[float, float], b: dict[float, float]) -> float | None:
    """Quantile in ms of the observations between two scrapes (histogram_quantile's rule)."""
    edges = sorted(b)
    cum = [b[e] - a.get(e, 0.0) for e in edges]
    if not cum or cum[-1] <= 0:
        return None
    rank, prev_edge, prev = q * cum[-1], 0.0, 0.0
    for edge, c in zip(edges, cum, strict=True):
        if c >= rank:
            if edge == float("inf"):
                return round(prev_edge * 1000.0, 1)
            frac = (rank - prev) / (c - prev) if c > prev else 1.0
            return round((prev_edge + (edge - prev_edge) * frac) * 1000.0, 1)
        prev_edge, prev = edge, c
    return None


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def run_row(
    n: int, rate: float, args: argparse.Namespace, port: int, broker: psutil.Process
) -> dict:
    folder = args.work / f"stations{n}_events{rate:g}"
    frames = args.work / f"frames_{rate:g}"
    site = write_site(folder, n, args, port, frames, args.thresholds[rate])
    sub = Subscriber(port)
    log = (folder / "service.log").open("w")
    mport = free_port()
    cmd = ["run", "--site", str(site), "--metrics-port", str(mport)]
    child = subprocess.Popen(
        [sys.executable, "-m", "lineguard.runtime.cli", *cmd],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
    )
    proc = psutil.Process(child.pid)
    try:
        deadline = time.monotonic() + args.start_timeout
        while len([f for f in sub.frames_seen().values() if f > 0]) < n:
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"service did not start:\n{(folder / 'service.log').read_text()}")
            time.sleep(0.2)
        time.sleep(args.warmup)
        sub.reset()
        procs = tree(proc)
        psutil.cpu_percent(interval=None)  # starts the machine-wide measurement
        me = psutil.Process()
        m0 = scrape(mport)
        t0, c0, b0, h0 = time.time(), cpu_seconds(procs), cpu_seconds([broker]), cpu_seconds([me])
        peak = rss_mb(procs)
        while time.time() - t0 < args.seconds:
            time.sleep(0.5)
            peak = max(peak, rss_mb(tree(proc)))
        t1, c1, b1 = time.time(), cpu_seconds(tree(proc)), cpu_seconds([broker])
        h1 = cpu_seconds([me])
        m1 = scrape(mport)
        machine = psutil.cpu_percent(interval=None) * psutil.cpu_count()
        load_1m = os.getloadavg()[0]
        # The outbox publishes in order: once every station has an event captured after the
        # window, all events captured inside it have arrived (however deep the backlog was).
        deadline = time.monotonic() + 30
        while not sub.all_after(t1, n) and time.monotonic() < deadline:
            time.sleep(0.1)
        if child.poll() is not None:
            raise SystemExit(f"service exited early:\n{(folder / 'service.log').read_text()}")
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        log.close()
        sub.close()
    with sub.lock:
        events = [e for e in sub.events if t0 <= e[2] <= t1]
        stats = list(sub.stats)
    frames = window_delta(stats, t0, t1, "frames")
    dropped = window_delta(stats, t0, t1, "dropped_frames")
    fps = {s: d / span for s, (d, span) in frames.items() if span > 0}
    publish_ms = [(recv - cap) * 1000.0 for recv, _, cap, _ in events]
    decision_ms = [ms for *_, ms in events if ms is not None]
    depth = [p["outbox_depth"] for r, p in stats if t0 <= r <= t1]
    c_a, c_b = m0["counters"], m1["counters"]
    inspected = c_b.get("lineguard_frames_inspected_total", 0) - c_a.get(
        "lineguard_frames_inspected_total", 0
    )
    defective = c_b.get("lineguard_frames_defective_total", 0) - c_a.get(
        "lineguard_frames_defective_total", 0
    )
    commits = c_b.get("lineguard_outbox_commits_total", 0) - c_a.get(
        "lineguard_outbox_commits_total", 0
    )
    return {
        "stations": n,
        "event_rate": rate,
        "event_rate_measured": round(defective / inspected, 4) if inspected else None,
        "fps_per_station": round(float(np.mean(list(fps.values()))), 2) if fps else 0.0,
        "latency_p50_ms": pct(publish_ms, 50),
        "latency_p95_ms": pct(publish_ms, 95),
        "dropped_frames": int(sum(d for d, _ in dropped.values())),
        "cpu_percent": round(100.0 * (c1 - c0) / (t1 - t0), 1),
        "rss_mb": round(peak, 1),
        "fps_by_station": {s: round(v, 2) for s, v in fps.items()},
        "fps_total": round(sum(fps.values()), 2),
        "offered_fps_per_station": args.camera_fps,
        "decision_latency_p50_ms": bucket_quantile(0.5, m0["buckets"], m1["buckets"]),
        "decision_latency_p95_ms": bucket_quantile(0.95, m0["buckets"], m1["buckets"]),
        "event_decision_latency_p50_ms": pct(decision_ms, 50),
        "event_decision_latency_p95_ms": pct(decision_ms, 95),
        "events_in_window": len(events),
        "events_per_commit": round(len(events) / commits, 2) if commits else None,
        "outbox_depth_max": max(depth) if depth else None,
        "broker_cpu_percent": round(100.0 * (b1 - b0) / (t1 - t0), 1),
        "machine_cpu_percent": round(machine, 1),
        "other_processes_cpu_percent": round(
            max(0.0, machine - 100.0 * (c1 - c0 + b1 - b0 + h1 - h0) / (t1 - t0)), 1
        ),
        "load_1m": round(load_1m, 2),
    }
