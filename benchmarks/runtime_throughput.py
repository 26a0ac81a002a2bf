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
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the sibling modules: what each row replays, and the rig that runs and measures one row
from throughput_inputs import build_artifact, choose_thresholds, has_int8, write_frames
from throughput_rig import other_jobs, run_row, start_broker

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
FRAMES = 20  # replayed frames per event rate: 0.05 = 1 defective frame in 20


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = info.get("Model name", "").strip() or platform.machine()
    return f"{name}, {psutil.cpu_count(logical=True)} logical cores"


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
        "command": "python benchmarks/runtime_throughput.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
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
