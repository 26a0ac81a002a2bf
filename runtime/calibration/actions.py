"""What `lineguard calibrate` does once its arguments are parsed (the parser is in `cli.py`).

Scoring, report, apply and rollback modules are imported inside the handlers: the edge runtime and
`lineguard --help` never pay for an engine or paho unless a calibration actually runs.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.threshold_limits import ThresholdError, check_thresholds

DEFAULT_FRAMES = 300


def _default_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# ---------------------------------------------------------------------------- helpers


class _Context:
    """Station, optional site and audit log, loaded once per command."""

    def __init__(self, args: argparse.Namespace, check_files: bool = True) -> None:
        from lineguard.runtime.config_loader import load_site, load_station

        if args.station is None:
            raise LineGuardError("--station FILE is required")
        self.station_file = Path(args.station).absolute()
        self.cfg = load_station(args.station, check_files=check_files)
        self.site = None
        if args.site is not None:
            loaded = load_site(args.site, check_files=False)
            self.site = loaded.site
            ids = {(s.line_id, s.station_id) for s in loaded.stations}
            if (self.cfg.line_id, self.cfg.station_id) not in ids:
                raise LineGuardError(
                    f"{args.site}: site has no station {self.cfg.line_id}/{self.cfg.station_id}"
                )
        self.audit_path = args.audit_log or (self.site.audit_log if self.site else None)
        self.by = args.by or _default_by()
        self.reason = args.reason
        self.timeout = args.timeout

    def need_reason(self) -> str:
        if not self.reason or not self.reason.strip():
            raise LineGuardError("--reason TEXT is required for every change (it is audited)")
        return self.reason

    def audit(self):
        from lineguard.runtime.audit import AuditLog

        if self.audit_path is None:
            raise LineGuardError("changes are audited: give --site FILE or --audit-log FILE")
        return AuditLog(self.audit_path).check_writable()

    def need_site(self):
        if self.site is None:
            raise LineGuardError("a live change needs --site FILE (broker and topic prefix)")
        return self.site


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line)
    sys.stdout.flush()


def _values(d: dict[str, Any] | None) -> str:
    if not d:
        return "none"
    return ", ".join(
        f"{k} {d[k]:g}" for k in ("image", "pixel", "min_area_px") if d.get(k) is not None
    )


# ---------------------------------------------------------------------------- calibrate


def _score(ctx: _Context, args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    from lineguard.runtime.calibration.positions import fit_rulers, ruled_scores
    from lineguard.runtime.calibration.report import make_report, summary_lines, write_report
    from lineguard.runtime.calibration.scoring import StationScorer, camera_frames, folder_frames

    for name in ("target_far", "confidence", "pixel_rate"):
        if not 0.0 < getattr(args, name) < 1.0:
            raise LineGuardError(f"--{name.replace('_', '-')} must be between 0 and 1")
    cfg = ctx.cfg
    if args.positions and cfg.tiling is None:
        raise LineGuardError(f"--positions: station {cfg.station_id} is not tiled")
    scorer = StationScorer(cfg)
    try:
        if args.folder is not None:
            frames = folder_frames(args.folder)
            source = {"kind": "folder", "path": str(args.folder)}
        else:
            n = args.frames or DEFAULT_FRAMES
            if n < 1 or args.every < 1:
                raise LineGuardError("--frames and --every must be at least 1")
            frames = camera_frames(cfg, n, args.every, args.camera_timeout)
            source = {"kind": "camera", "camera": cfg.camera.kind, "every": args.every}
        normal = scorer.score_all(frames, keep_pixels=True, label="normal frames")
        source["frames"] = len(normal)
        defects = None
        if args.defects is not None:
            defects = scorer.score_all(
                folder_frames(args.defects, recursive=True), False, "defects"
            )
        rulers = None
        if args.positions:  # the image scores on per-position rulers fitted on these frames
            rulers = fit_rulers(normal.tiles)
            normal.image = ruled_scores(normal.tiles, rulers)
            if defects is not None:
                defects.image = ruled_scores(defects.tiles, rulers)
        station = {
            "id": cfg.station_id,
            "line": cfg.line_id,
            "file": str(ctx.station_file),
            "model": str(cfg.model),
            "model_name": scorer.engine.card.name,
            "engine": cfg.engine,
            "precision": cfg.precision,
            "prompt_sha256": scorer.prompt_sha256,
            "roi": None if cfg.roi is None else list(cfg.roi),
            "ignore_masks": len(cfg.ignore_masks),
        }
        try:
            report = make_report(
                station=station,
                normal=normal,
                defects=defects,
                old=scorer.active.as_dict(),
                target_far=args.target_far,
                confidence=args.confidence,
                pixel_rate=args.pixel_rate,
                require_region=scorer.pipeline.require_region,
                source=source,
                seed=args.seed,
            )
        except ValueError as exc:
            raise LineGuardError(f"cannot propose thresholds: {exc}") from None
        if rulers is not None:
            report["position_norm"] = rulers
        if args.folder is not None:  # camera frames are new captures: never training images
            report["trained_on"] = _trained_on(args.folder, scorer.engine.card, report)
    finally:
        scorer.close()
    out = args.out or Path("calibration") / f"{cfg.station_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, png = write_report(report, Path(out).absolute())
    _print([*summary_lines(report), f"report: {path}  histogram: {png}"])
    return report, path


def _trained_on(folder: Path, card: Any, report: dict[str, Any]) -> dict[str, Any]:
    """Count the folder's images the model trained on; warn in the report (see `seen.py`)."""
    from lineguard.runtime.calibration.seen import trained_on, warning

    names = set(report["scores"]["normal"]["names"])
    found = trained_on(sorted(Path(folder) / n for n in names), card.trained_file_keys)
    text = warning(found)
    if text:
        report["warnings"].append(text)
    return found


def _load_report(ctx: _Context, path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LineGuardError(f"{path}: cannot read the report: {exc}") from None
    st = report.get("station") or {}
    if (st.get("line"), st.get("id")) != (ctx.cfg.line_id, ctx.cfg.station_id):
        raise LineGuardError(
            f"{path}: report is for {st.get('line')}/{st.get('id')}, not "
            f"{ctx.cfg.line_id}/{ctx.cfg.station_id}"
        )
    if "proposed" not in report:
        raise LineGuardError(f"{path}: not a calibration report (no 'proposed')")
    return report


def calibrate(args: argparse.Namespace) -> int:
    if args.calibrate_action is None and args.station is None:
        args.calibrate_parser.print_help()
        return 2
    ctx = _Context(args)
    changing = bool(args.apply) or args.shadow
    if args.positions:
        _config_only(args)
    if changing:  # check everything a change needs before the (long) scoring
        ctx.need_reason()
        if "config" in args.apply:
            ctx.audit()
        if "mqtt" in args.apply or args.shadow:
            ctx.need_site()
            if ctx.site.broker is None:
                raise LineGuardError(f"{args.site}: the site has no broker for a live change")
    if args.from_report is not None:
        report = _load_report(ctx, args.from_report)
        report_path = Path(args.from_report).absolute()
    else:
        report, report_path = _score(ctx, args)
    rulers = report.get("position_norm")
    if rulers is not None:
        _config_only(args)
    if not changing:
        _print(["preview only: nothing applied (use --apply config|mqtt or --shadow)"])
        return 0
    proposed = {k: report["proposed"][k] for k in ("image", "pixel")}
    try:  # the runtime's own bounds: never send or write what a station would refuse
        proposed = check_thresholds(proposed, "proposed.")
    except ThresholdError as exc:
        raise LineGuardError(f"calibrate: {exc}; nothing applied") from None
    why = (
        f"{ctx.reason} [calibrate: target FAR {report['target_far']:g} at "
        f"{report['confidence']:.0%}, {report['normal']['frames']} frames, report {report_path}]"
    )
    if args.shadow:
        res = _live(ctx, {**proposed, "shadow": True}, why)
        _print(
            [
                f"shadow candidate on {_where(ctx)}: {_values(res.after['shadow'])} "
                f"(active stays {_values(res.after['active'])}); watch 'shadow' on the stats topic"
            ]
        )
    if "mqtt" in args.apply:
        res = _live(ctx, proposed, why)
        _print(
            [
                f"live on {_where(ctx)}: {_values((res.before or {}).get('active'))} -> "
                f"{_values(res.after['active'])} (audited by the runtime; not yet in the station "
                "file: add --apply config to keep it after a restart)"
            ]
        )
    if "config" in args.apply:
        from lineguard.runtime.calibration.apply import audit_file_change, write_thresholds

        change = write_thresholds(ctx.station_file, proposed, position_norm=rulers)
        extra: dict[str, Any] = {"report": str(report_path)}
        if rulers is not None:
            extra["position_norm"] = rulers
        audit_file_change(
            ctx.audit(),
            ctx.cfg,
            change,
            by=ctx.by,
            reason=why,
            action="calibrate/apply",
            edge_id=ctx.site.edge_id if ctx.site else None,
            extra=extra,
        )
        note = "" if change.comments_kept else " (comments could not be kept)"
        ruled = "" if rulers is None else f" and {len(rulers)} per-position rulers"
        _print(
            [
                f"{change.path}: {_values(change.old)} -> {_values(change.new)}{ruled}; backup "
                f"{change.backup}{note}; a running runtime reads it at its next start"
            ]
        )
    return 0


def _config_only(args: argparse.Namespace) -> None:
    """Per-position rulers change what an image threshold means: they travel with the
    thresholds in the station file only, never live to a runtime that still reads the old ones."""
    if "mqtt" in args.apply or args.shadow:
        raise LineGuardError(
            "per-position rulers (--positions) are applied with --apply config only (the runtime "
            "reads them at its next start); not with --apply mqtt or --shadow"
        )


def _where(ctx: _Context) -> str:
    return f"{ctx.site.edge_id}/{ctx.cfg.line_id}/{ctx.cfg.station_id}"


def _live(ctx: _Context, values: dict[str, Any], reason: str, request_id: str | None = None):
    from lineguard.runtime.calibration.apply import send_command

    command = {**values, "by": ctx.by, "reason": reason[:2000]}
    if request_id:
        command["request_id"] = request_id
    result = send_command(ctx.need_site(), ctx.cfg, command, ctx.timeout)
    target = result.after["shadow"] if values.get("shadow") else result.after["active"]
    for k in ("image", "pixel", "min_area_px"):
        if k in values and (target is None or abs(float(target[k]) - float(values[k])) > 1e-9):
            raise LineGuardError(f"the runtime echoed {target} for {k}, expected {values[k]}")
    return result


# ---------------------------------------------------------------------------- rollback


def rollback(args: argparse.Namespace) -> int:
    import uuid

    from lineguard.runtime.calibration.apply import (
        ROLLBACK_PREFIX,
        audit_file_change,
        live_rollback_target,
        rollback_config,
    )

    ctx = _Context(args, check_files=False)
    reason = ctx.need_reason()
    audit = ctx.audit()
    if args.apply == "config":
        change = rollback_config(ctx.station_file)
        audit_file_change(
            audit,
            ctx.cfg,
            change,
            by=ctx.by,
            reason=reason,
            action="calibrate/rollback",
            edge_id=ctx.site.edge_id if ctx.site else None,
        )
        _print(
            [
                f"{change.path}: {_values(change.old)} -> {_values(change.new)} (rolled-back file "
                f"kept as {change.backup}); a running runtime reads it at its next start"
            ]
        )
        return 0
    entry, values = live_rollback_target(audit, ctx.cfg)
    request_id = f"{ROLLBACK_PREFIX}{uuid.uuid4()}"
    why = f"{reason} [rollback of {entry.get('request_id') or entry.get('ts')}]"
    res = _live(ctx, values, why, request_id)
    now = (res.before or {}).get("active")
    undone = (entry.get("new") or {}).get("active")
    lines = [f"live on {_where(ctx)}: {_values(now)} -> {_values(res.after['active'])}"]
    if now and undone and any(abs(now[k] - undone[k]) > 1e-9 for k in ("image", "pixel")):
        lines.append(
            f"note: the runtime had {_values(now)}, not the {_values(undone)} set by the change "
            "undone (restarted or changed since?)"
        )
    _print(lines)
    return 0


def clear_shadow(args: argparse.Namespace) -> int:
    ctx = _Context(args, check_files=False)
    res = _live(ctx, {"clear_shadow": True}, ctx.need_reason())
    _print([f"shadow evaluation stopped on {_where(ctx)} (active {_values(res.after['active'])})"])
    return 0
