"""Runtime throughput: 1, 2 and 4 stations through the real `lineguard run` on this CPU.

Each row starts the real service (`python -m lineguard.runtime.cli run --site ...`) as a child
process with N stations, all on the INT8 artifact (OpenVINO, the station default of 1 inference
thread each), against a real mosquitto on a free loopback port that this script starts. This
process is the MES: it subscribes to the defect and stats topics and measures.

Cameras: folder sources looping over generated 640x480 frames (BMP: a raw camera frame, so the
decode is cheap and the INTER_AREA resize to the model input is included), PACED at
`--camera-fps` (default 60, above what one station can infer) with the service's
default queue (2 frames, drop oldest). The station therefore runs flat out and the frames it
cannot take are dropped and counted, as with a live camera. (A folder without fps would apply
back pressure instead, and nothing would ever be dropped.)

Event rate axis (`--event-rates`, default 0.05 and 1.0): the share of DEFECTIVE frames in the
replayed folder. Defective frames really contain a drawn defect (a large striped patch);
thresholds are never negative or zero (finite and > 0, runtime/threshold_limits.py), chosen by
this script from the engine's own scores on the replayed frames (`choose_thresholds`: between
the highest normal and the lowest defective image score). Each defective frame is a defect event
with its evidence JPEG, committed to the SQLite outbox and published at QoS 1; the share really
measured is reported (`event_rate_measured`) next to the target. Figures, over a `--seconds`
window after `--warmup`:
* fps_per_station / fps_total: inspected frames / s (stats topic `frames` counters);
* latency p50/p95: capture -> publish, the subscriber's receive time minus the event's
  `captured_at` (same clock), events only;
* decision_latency p50/p95: capture -> decision of EVERY inspected frame in the window, from the
  runtime's Prometheus histogram (`--metrics-port`, scraped at both ends of the window;
  interpolated within buckets as Prometheus' histogram_quantile does; 40 ms is a bucket edge);
* dropped_frames: frames the queues dropped in the window, all stations;
* cpu_percent: CPU time of the service process tree / wall time (100 = one core);
  rss_mb: peak resident memory of the service process tree; the broker's CPU is reported apart;
* machine load during the window: machine_cpu_percent, other_processes_cpu_percent, load_1m.

    .venv/bin/python benchmarks/runtime_throughput.py              # builds the lite2 artifact once
    .venv/bin/python benchmarks/runtime_throughput.py --tiny --seconds 3 --out /tmp/rt   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
MOSQUITTO = "/usr/sbin/mosquitto"
PREFIX = "lineguard"
FRAMES = 20  # replayed frames per event rate: 0.05 = 1 defective frame in 20


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = info.get("Model name", "").strip() or platform.machine()
    return f"{name}, {psutil.cpu_count(logical=True)} logical cores"


# ---------------------------------------------------------------- frames and artifact


def scene(rng: np.random.Generator, h: int, w: int, defect: bool) -> np.ndarray:
    """A smooth textured part with sensor noise (BGR uint8), optionally with a drawn defect."""
    low = rng.integers(60, 200, (max(2, h // 48), max(2, w // 48), 3)).astype(np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    if defect:
        c = (int(rng.integers(w // 5, 4 * w // 5)), int(rng.integers(h // 5, 4 * h // 5)))
        axes = (int(rng.integers(w // 40, w // 12)), int(rng.integers(h // 40, h // 12)))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return img


def write_frames(folder: Path, n: int, w: int, h: int, ext: str, event_rate: float) -> Path:
    """`n` camera frames, round(event_rate·n) of them (spread evenly) with a drawn defect, and
    `golden.png` (a normal part, the prompt). The same seed for every rate: same parts."""
    folder.mkdir(parents=True, exist_ok=True)
    n_bad = round(event_rate * n)
    bad = {int(i * n / n_bad) for i in range(n_bad)} if n_bad else set()
    rng = np.random.default_rng(7)
    golden = scene(rng, h, w, defect=False)
    for i in range(n):
        name = f"frame_{i:03d}{'_bad' if i in bad else ''}.{ext}"
        cv2.imwrite(str(folder / name), part(golden, rng, defect=i in bad))
    cv2.imwrite(str(folder.parent / "golden.png"), golden)
    return folder.parent / "golden.png"


def part(golden: np.ndarray, rng: np.random.Generator, defect: bool) -> np.ndarray:
    """The golden part with fresh sensor noise; a defect is a large high-contrast striped patch
    (about 2/3 of the part): big enough that even the benchmark's random-head model scores it
    above every normal frame (a small blob does not separate there)."""
    img = np.clip(golden + rng.normal(0, 3, golden.shape), 0, 255).astype(np.uint8)
    if defect:
        h, w = img.shape[:2]
        ph, pw = int(h * 0.8), int(w * 0.8)
        y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        stripes = (np.arange(pw) // 8 % 2 * 255).astype(np.uint8)
        img[y : y + ph, x : x + pw] = stripes[None, :, None]
    return img


def choose_thresholds(artifact: Path, frames: Path, golden: Path) -> tuple[dict, str]:
    """Thresholds (all > 0) that make exactly the drawn-defect frames defective, from the INT8
    engine's own normalised scores on these frames (the station's pipeline, this prompt)."""
    from lineguard.runtime.engine import load_engine
    from lineguard.runtime.pipeline import Pipeline, Thresholds

    engine = load_engine(artifact, backend="openvino", precision="int8", threads=1)
    prompt = cv2.cvtColor(cv2.imread(str(golden)), cv2.COLOR_BGR2RGB)
    pipe = Pipeline(engine, prompt, thresholds=Thresholds(1.0, 1.0, 1))
    normal, bad, bad_max = [], [], []
    for f in sorted(frames.iterdir()):
        rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        d = pipe.process(rgb)
        is_bad = "_bad." in f.name
        (bad if is_bad else normal).append(d.image_score)
        if is_bad:
            bad_max.append(float(d.score_map.max()))
    engine.close()
    tiny = 1.0e-6  # the lowest value a threshold may take
    if not bad:
        return {"image": 1000.0, "pixel": 1000.0, "min_area_px": 1}, "no defective frame"
    lo = min(bad)
    hi = max(normal) if normal else -np.inf
    image = (max(hi, 0.0) + lo) / 2 if normal else lo - 0.01 * abs(lo)  # in (max(hi, 0), lo)
    pixel = min(bad_max) - 0.01 * abs(min(bad_max))
    how = f"image scores normal <= {hi:.3f}, defective >= {lo:.3f}"
    if not hi < lo or image <= 0 or pixel <= 0:
        how += "; NOT separable with thresholds > 0: the measured event share will differ"
    return {"image": max(tiny, image), "pixel": max(tiny, pixel), "min_area_px": 1}, how


def model_config(tiny: bool):
    from lineguard.train.torch_model import OneNIPConfig

    if not tiny:  # the shipped lite2 configuration: 224 px, hidden 256, 4+4 layers
        return OneNIPConfig(input_size=224)
    return OneNIPConfig(
        backbone="tf_efficientnet_lite0",
        input_size=64,
        hidden_dim=32,
        nhead=4,
        dim_feedforward=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        refiner_channels=16,
    )


def build_artifact(work: Path, tiny: bool) -> Path:
    """Random-head OneNIP (pretrained backbone) -> checkpoint -> `export` -> `quantize` (INT8).

    Throughput does not depend on the head's values, so no training; the artifact goes through
    the compress stage's real export and NNCF quantization (gates opened: the head is random).
    """
    import torch

    from lineguard.compress.export import ExportOptions, export_artifact
    from lineguard.compress.gates import AccuracyBudget
    from lineguard.compress.quantize import QuantizeOptions, quantize_artifact
    from lineguard.train.calibration import calibrate
    from lineguard.train.checkpoint import checkpoint_payload, save_checkpoint
    from lineguard.train.torch_model import OneNIP
    from lineguard.train.train_config import DataConfig, FolderSource, TrainConfig
    from lineguard.train.train_data import load_training_data

    torch.set_num_threads(2)
    torch.manual_seed(0)
    normals = work / "normal"
    normals.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    px = 80 if tiny else 256
    for i in range(16):
        cv2.imwrite(str(normals / f"{i:03d}.png"), scene(rng, px, px, defect=False))
    cfg = TrainConfig(
        data=DataConfig(folders=[FolderSource(path=normals, category="part")]),
        model=model_config(tiny),
        epochs=1,
        val_fraction=0.25,
        seed=0,
        device="cpu",
        num_workers=0,
    )
    model = OneNIP(cfg.model, pretrained=True).eval()
    size = cfg.model.input_size
    data = load_training_data(cfg.data, size, cfg.val_fraction, cfg.seed, progress=False)
    calib = calibrate(model, data.val_images, data.val_labels, data.prompt_images(), "cpu", "val")
    ckpt = work / "random_head.pt"
    save_checkpoint(ckpt, checkpoint_payload(model, cfg, data, calib))
    art = work / "artifact"
    export_artifact(ExportOptions(checkpoint=ckpt, out=art, force=True))
    open_budget = AccuracyBudget(image_auroc=1.0, pixel_ap=1.0, aupro=1.0)
    quantize_artifact(QuantizeOptions(artifact=art, calib_images=16, budget=open_budget))
    return art


def has_int8(artifact: Path) -> bool:
    card = artifact / "model.json"
    return card.is_file() and "int8" in json.loads(card.read_text()).get("precisions", {})


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


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = [
        "# Runtime throughput (real `lineguard run`, real mosquitto)",
        "",
        f"CPU: {result['cpu']}. Model: {result['artifact']}. {result['setup']}",
        "",
        "| stations | event rate (measured) | fps / station | fps total | offered fps / station | "
        "capture→publish p50 / p95 ms | capture→decision p50 / p95 ms | dropped (window) | "
        "CPU % (100 = 1 core) | RSS MB | machine CPU % / other % / load 1m |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['stations']} | {r['event_rate']} ({r['event_rate_measured']}) | "
            f"{r['fps_per_station']} | {r['fps_total']} | {r['offered_fps_per_station']} | "
            f"{r['latency_p50_ms']} / {r['latency_p95_ms']} | "
            f"{r['decision_latency_p50_ms']} / {r['decision_latency_p95_ms']} | "
            f"{r['dropped_frames']} | {r['cpu_percent']} | {r['rss_mb']} | "
            f"{r['machine_cpu_percent']} / {r['other_processes_cpu_percent']} / {r['load_1m']} |"
        )
    lines += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stations", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--event-rates",
        type=float,
        nargs="+",
        default=[0.05, 1.0],
        help="shares of defective frames (multiples of 0.05, 0 to 1)",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="measurement window per row")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds after the first frames")
    p.add_argument("--camera-fps", type=float, default=60.0, help="paced rate of each camera")
    p.add_argument("--frame", default="640x480", help="camera frame WxH")
    p.add_argument("--frame-format", default="bmp", choices=["bmp", "png", "jpg"])
    p.add_argument("--no-evidence", dest="evidence", action="store_false")
    p.add_argument("--artifact", type=Path, help="an artifact with int8 (default: build one)")
    p.add_argument("--tiny", action="store_true", help="tiny model for smoke tests")
    p.add_argument("--work", type=Path, help="scratch folder (default runs/runtime_throughput)")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--note", action="append", default=[], help="extra note for the results")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    mode = "tiny" if args.tiny else "lite2"
    args.work = (args.work or ROOT / "runs" / "runtime_throughput").resolve() / mode
    if args.artifact is None:
        args.artifact = args.work / "build" / "artifact"
        if not has_int8(args.artifact):
            print(f"building the {mode} INT8 artifact in {args.artifact} ...", flush=True)
            build_artifact(args.work / "build", args.tiny)
    args.artifact = args.artifact.resolve()
    if not has_int8(args.artifact):
        raise SystemExit(f"{args.artifact}: no int8 model in model.json")
    w, h = (int(v) for v in args.frame.lower().split("x"))
    args.thresholds, chosen = {}, []
    for rate in args.event_rates:
        if not 0.0 <= rate <= 1.0:
            raise SystemExit(f"--event-rates: {rate} is not a share between 0 and 1")
        frames = args.work / f"frames_{rate:g}"
        golden = write_frames(frames, FRAMES, w, h, args.frame_format, rate)
        args.thresholds[rate], how = choose_thresholds(args.artifact, frames, golden)
        chosen.append(f"event_rate {rate:g}: thresholds {args.thresholds[rate]} ({how})")
    card = json.loads((args.artifact / "model.json").read_text())
    broker_proc, port = start_broker(args.work / "broker")
    rows = []
    others: set[str] = set()
    try:
        for n in args.stations:
            for rate in args.event_rates:
                others.update(other_jobs())
                print(
                    f"{n} station(s), event rate {rate:g}: warm-up {args.warmup:g} s, "
                    f"{args.seconds:g} s",
                    flush=True,
                )
                rows.append(run_row(n, rate, args, port, psutil.Process(broker_proc.pid)))
                print(json.dumps(rows[-1]), flush=True)
                others.update(other_jobs())
    finally:
        broker_proc.terminate()
        broker_proc.wait(10)
    load = os.getloadavg()
    result = {
        "cpu": cpu_name(),
        "rows": rows,
        "artifact": f"{card['name']} ({card['input_size'][0]} px, INT8 OpenVINO; random head)",
        "precision": "int8",
        "engine": "openvino",
        "inference": "one compiled model shared by all stations, streams/threads by the rule "
        "of docs/performance.md (logged by the service at start)",
        "event_rates": args.event_rates,
        "thresholds": chosen,
        "duration_s": args.seconds,
        "warmup_s": args.warmup,
        "camera": f"folder replay of {FRAMES} {w}x{h} {args.frame_format.upper()} frames, "
        f"looped, paced at {args.camera_fps:g} fps per station; queue 2, drop oldest",
        "setup": (
            f"{w}x{h} {args.frame_format.upper()} frames paced at {args.camera_fps:g} fps per "
            "camera (queue 2, drop oldest); one shared INT8 model (docs/performance.md); "
            "a share `event_rate` of the frames carries a drawn defect and is a defect event"
            + (" with its evidence JPEG" if args.evidence else "")
            + f"; {args.seconds:g} s window after {args.warmup:g} s warm-up."
        ),
        "load_average_after": [round(x, 2) for x in load],
        "notes": [
            "latency_p50/p95_ms: capture -> publish, i.e. until an MQTT subscriber on this host "
            "receives the event (its receive time minus the event's captured_at, same clock), "
            "including the group commit wait (outbox.group_commit_ms); decision_latency: "
            "capture -> decision of every inspected frame (the runtime's Prometheus histogram, "
            "bucket-interpolated); event_decision_latency: the same for the events only (their "
            "latency_ms).",
            "event_rate: target share of defective frames; event_rate_measured: defective / "
            "inspected frames in the window (Prometheus counters); load_1m: the 1-minute load "
            "average at the end of the row's window.",
            "fps_per_station: inspected frames per second (stats `frames` counters over the "
            "window); dropped_frames: frames the bounded queues dropped in the window (all "
            "stations) because the cameras offer more than the stations infer.",
            "cpu_percent: CPU seconds of the `lineguard run` process tree / wall seconds, 100 = "
            "one core (this machine has "
            f"{psutil.cpu_count()}); rss_mb: its peak RSS; broker_cpu_percent: mosquitto's; "
            "machine_cpu_percent: all processes; other_processes_cpu_percent: what neither the "
            "service, the broker nor this harness used (other load competing for the cores).",
            *(
                [f"CONTENTION: other jobs ran during the measurement: {sorted(others)}"]
                if others
                else []
            ),
            *args.note,
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "runtime_throughput.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
