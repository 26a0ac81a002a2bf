"""`lineguard calibrate`: propose per-station thresholds from normal frames, preview, apply, undo.

    lineguard calibrate --station S [--site F] [--frames N | --folder DIR] [--defects DIR]
                        [--target-far 0.001] [--confidence 0.95] [--out DIR]
                        [--apply config|mqtt ...] [--shadow] [--by NAME --reason TEXT]
    lineguard calibrate rollback --station S [--site F] [--apply config|mqtt] --reason TEXT
    lineguard calibrate clear-shadow --station S --site F --reason TEXT

Imports stay light at module level (no engine, no paho): `lineguard --help` must stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lineguard.runtime.calibration.actions import (
    DEFAULT_FRAMES,
    calibrate,
    clear_shadow,
    rollback,
)


def _common(p: argparse.ArgumentParser, station_required: bool) -> None:
    p.add_argument(
        "--station", type=Path, metavar="FILE", required=station_required, help="station YAML"
    )
    p.add_argument(
        "--site",
        type=Path,
        metavar="FILE",
        help="site YAML: the broker for --apply mqtt/--shadow and the audit log location",
    )
    p.add_argument(
        "--audit-log", type=Path, metavar="FILE", help="audit log (default: the site's audit_log)"
    )
    p.add_argument("--by", default=None, help="who makes the change (default: user@host)")
    p.add_argument("--reason", default=None, help="why (required for every change)")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the runtime's echo"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Register `calibrate` (with its `rollback` and `clear-shadow` actions)."""
    p = sub.add_parser(
        "calibrate",
        help="propose a station's thresholds from normal frames; apply live or to its file; undo",
        description=(
            "Score normal frames (the station's camera, or a folder) through the station's exact "
            "pipeline (artifact, prompt, ROI, ignore masks), fit the upper tail of the normal "
            "image scores and propose the image threshold for a target false-alarm rate with a "
            "stated confidence margin, and a pixel threshold from the normal pixel scores. With "
            "--defects, also recall/precision/F1 at the proposed and at the F1-optimal threshold. "
            "Writes calibration.json and histogram.png to --out. --apply config writes the "
            "station file (versioned backup <file>.bak.N); --apply mqtt sends threshold/set to "
            "the running runtime and waits for its echo; --shadow sends the proposal as a shadow "
            "candidate (counted on the stats topic, never alerted). Every change is audited."
        ),
    )
    _common(p, station_required=False)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--frames",
        type=int,
        metavar="N",
        help=f"take N frames from the station's camera (default {DEFAULT_FRAMES})",
    )
    src.add_argument("--folder", type=Path, metavar="DIR", help="normal images from a folder")
    src.add_argument(
        "--from-report",
        type=Path,
        metavar="JSON",
        help="apply the proposal of an earlier calibration.json instead of scoring again",
    )
    p.add_argument("--every", type=int, default=1, metavar="K", help="camera: keep one frame in K")
    p.add_argument(
        "--camera-timeout",
        type=float,
        default=60.0,
        help="camera: give up after S s without a frame",
    )
    p.add_argument(
        "--defects", type=Path, metavar="DIR", help="labelled defective images (recursive)"
    )
    p.add_argument("--target-far", type=float, default=0.001, help="false alarms per normal frame")
    p.add_argument(
        "--confidence", type=float, default=0.95, help="confidence of the upper bound (0..1)"
    )
    p.add_argument(
        "--pixel-rate",
        type=float,
        default=0.001,
        help="fraction of normal pixels above the pixel threshold",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="report folder (default: calibration/<station>-<time>)",
    )
    p.add_argument(
        "--apply",
        action="append",
        choices=("config", "mqtt"),
        default=[],
        help="write the station file and/or send to the running runtime (repeatable)",
    )
    p.add_argument(
        "--shadow",
        action="store_true",
        help="send the proposal as a shadow candidate to the running runtime (no alerts)",
    )
    p.add_argument(
        "--positions",
        action="store_true",
        help="tiled stations: also fit one image-score ruler per tile position on the normal "
        "frames (the noisiest position no longer sets every frame's score) and propose the "
        "image threshold on it; applied with --apply config only",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(handler=calibrate, calibrate_parser=p)
    actions = p.add_subparsers(dest="calibrate_action", metavar="ACTION")
    r = actions.add_parser(
        "rollback",
        help="restore the previous thresholds (file backup, or live from the audit log)",
        description=(
            "--apply config (default): restore the newest <file>.bak.N (the current file is kept "
            "as <file>.undone.M). --apply mqtt: send the thresholds that were active before the "
            "last live change (from the audit log) to the running runtime. Audited."
        ),
    )
    _common(r, station_required=True)
    r.add_argument(
        "--apply", choices=("config", "mqtt"), default="config", help="where to roll back"
    )
    r.set_defaults(handler=rollback)
    c = actions.add_parser(
        "clear-shadow",
        help="stop the shadow evaluation of a candidate threshold on the running runtime",
    )
    _common(c, station_required=True)
    c.set_defaults(handler=clear_shadow)
