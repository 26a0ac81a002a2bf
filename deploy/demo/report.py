"""The demo's one-page HTML report: steps and their timings, the model's figures, what each
station saw and every alert with its evidence JPEG (inlined, so the file stands alone)."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lineguard.deploy.demo.support import Observed, StationInfo

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2em}
table{border-collapse:collapse;margin:.6em 0 1.4em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.n{text-align:right}
code{font-size:.85em}.ok{color:#176f2c}.bad{color:#b00020}.skip{color:#8a6d00}
img.ev{height:128px;border:1px solid #999}
"""


@dataclass
class StepRecord:
    title: str
    command: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system of the step's child processes
    status: str = "ok"  # ok | failed | skipped
    note: str = ""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) else _e(x)


def _table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _steps(steps: list[StepRecord]) -> str:
    rows = []
    for i, s in enumerate(steps, 1):
        cls = {"ok": "ok", "failed": "bad"}.get(s.status, "skip")
        rows.append(
            [
                str(i),
                _e(s.title),
                "<br>".join(f"<code>{_e(c)}</code>" for c in s.command.splitlines()),
                f'<span class="n">{s.seconds:.1f}</span>',
                f'<span class="n">{s.cpu_seconds:.1f}</span>',
                f'<span class="{cls}">{_e(s.status)}</span> {_e(s.note)}',
            ]
        )
    total = sum(s.seconds for s in steps)
    cpu = sum(s.cpu_seconds for s in steps)
    rows.append(["", "<b>total</b>", "", f"<b>{total:.1f}</b>", f"<b>{cpu:.1f}</b>", ""])
    return _table(["#", "step", "command", "wall s", "CPU s", "result"], rows)


def _model(out: Path) -> str:
    parts = []
    metrics = out / "eval" / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        keys = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"]
        rows = [[_e(c), *[_fmt(100 * v[k], 1) for k in keys]] for c, v in m["per_class"].items()]
        rows.append(["<b>mean</b>", *[f"<b>{_fmt(100 * m['mean'][k], 1)}</b>" for k in keys]])
        parts.append(
            "<p>Evaluation on the sample line's test images (fixed prompt per class, "
            "<code>lineguard evaluate</code>; figures × 100):</p>"
            + _table(["class", "I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO"], rows)
        )
    card = out / "model" / "model.json"
    if card.is_file():
        c = json.loads(card.read_text())
        int8 = (c.get("precisions") or {}).get("int8")
        if int8:
            acc = int8.get("accuracy") or {}
            parts.append(
                "<p>INT8 gate (<code>lineguard quantize</code>, "
                f"{_e(int8.get('evaluated_on', ''))}): image AUROC "
                f"{_fmt(100 * acc.get('fp32_image_auroc', float('nan')), 1)} → "
                f"{_fmt(100 * acc.get('int8_image_auroc', float('nan')), 1)}, pixel AP "
                f"{_fmt(100 * acc.get('fp32_pixel_ap', float('nan')), 1)} → "
                f"{_fmt(100 * acc.get('int8_pixel_ap', float('nan')), 1)}.</p>"
            )
        else:
            parts.append("<p>No INT8 detector in the artifact: the stations ran FP32.</p>")
    return "".join(parts)


def _stations(stations: list[StationInfo], seen: Observed) -> str:
    rows = []
    for st in stations:
        stats = seen.stats.get(st.station_id, {})
        alerts = seen.alerts_of(st.station_id)
        on_defect = sum(1 for a in alerts if st.frame_of(a.payload)[1] not in ("good", "?"))
        on_good = sum(1 for a in alerts if st.frame_of(a.payload)[1] == "good")
        n_bad = sum(1 for _, lab in st.frames if lab != "good")
        t = st.thresholds
        rows.append(
            [
                f"<b>{_e(st.station_id)}</b><br>{_e(st.paper)}",
                f"{len(st.frames)} ({len(st.frames) - n_bad} good, {n_bad} impurity)",
                _e(stats.get("frames", "n/a")),
                f"{len(alerts)}",
                f"{on_defect} of {n_bad}",
                f"{on_good}",
                f"image {_fmt(t.get('image'))}, pixel {_fmt(t.get('pixel'))}, "
                f"min area {_e(t.get('min_area_px', '?'))}",
                f"{_fmt(stats.get('latency_p50_ms'), 1)} / {_fmt(stats.get('latency_p95_ms'), 1)}",
            ]
        )
    return _table(
        [
            "station",
            "frames replayed",
            "frames inferred",
            "alerts",
            "impurity frames alerted",
            "false alarms",
            "thresholds",
            "latency p50/p95 ms",
        ],
        rows,
    )


def _alerts(stations: list[StationInfo], seen: Observed) -> str:
    by_id = {s.station_id: s for s in stations}
    rows = []
    for a in seen.alerts:
        st = by_id.get(a.station)
        p = a.payload
        fid = p.get("frame_id")
        name, label = st.frame_of(p) if st else ("?", "?")
        regions = "<br>".join(
            f"[{', '.join(f'{v:.0f}' for v in r['bbox'])}] {r['area_px']:.0f} px, "
            f"max {r['max_score']:.2f}"
            for r in p.get("regions", [])
        )
        img = ""
        if a.evidence:
            b64 = base64.b64encode(a.evidence).decode()
            img = f'<img class="ev" src="data:image/jpeg;base64,{b64}">'
        rows.append(
            [
                _e(a.station),
                f"{_e(fid)}: <code>{_e(name)}</code>",
                _e(label),
                f"{p.get('image_score', 0):.2f} &gt; {p.get('thresholds', {}).get('image', 0):.2f}",
                regions,
                img or "(no evidence received)",
            ]
        )
    if not rows:
        return "<p><b>No alerts were received.</b></p>"
    return _table(["station", "frame", "truth", "score", "regions [x, y, w, h]", "evidence"], rows)


def write_report(
    path: Path,
    out: Path,
    steps: list[StepRecord],
    stations: list[StationInfo],
    seen: Observed,
    transport: str,
) -> Path:
    n = len(seen.alerts)
    head = (
        f"<h1>LineGuard demo</h1><p class='sub'>{_e(time.strftime('%Y-%m-%d %H:%M:%S'))} · "
        f"{_e(platform.node())} · {_e(platform.processor() or platform.machine())} · "
        f"Python {_e(platform.python_version())}</p>"
        f"<p><b>{n} defect alert(s)</b> received {_e(transport)}; "
        f"steps took {sum(s.seconds for s in steps):.0f} s wall time, "
        f"{sum(s.cpu_seconds for s in steps):.0f} CPU s on {os.cpu_count()} CPU(s).</p>"
    )
    body = (
        head
        + "<h2>Steps</h2>"
        + _steps(steps)
        + "<h2>Model</h2>"
        + _model(out)
        + "<h2>Stations</h2>"
        + _stations(stations, seen)
        + "<h2>Alerts</h2>"
        + _alerts(stations, seen)
        + "<p class='sub'>Sample images: PIPED (Bianconi et al.), CC BY 4.0, see "
        "<code>configs/demo/sample_line/CREDITS.md</code>.</p>"
    )
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>LineGuard demo</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>",
        encoding="utf-8",
    )
    return path
