"""Apply or roll back calibrated thresholds: in the station file, or live over MQTT. Audited.

**Station file.** Only the values under `thresholds:` change (and, with `--positions`,
`tiling.position_norm`); the rest of the text (comments,
order, flow or block style) is kept by editing the YAML scalars in place at the positions PyYAML
reports. The result is re-validated with the runtime's own loader before it replaces the file
(atomically); the previous file is kept as `<file>.bak.<N>` (N increasing). `rollback_config`
pops the newest backup back into place and keeps the rolled-back file as `<file>.undone.<N>`, so
nothing is ever lost and repeated rollbacks walk back through the history.

**Live.** `send_command` publishes a `threshold/set` command (payload per
`schemas/threshold_set.schema.json`, never retained) for the station and waits for the runtime's
echo with the same `request_id` on `threshold/state` (or its refusal on `threshold/error`). The
runtime applies it from the next frame, writes its audit entry and publishes both counts on the
stats topic when `shadow` is set. Live rollback reads the site's audit log: the runtime's
`threshold/set` entries for the station form a stack, rollbacks (request ids `rollback:…`) pop it,
and the `old` thresholds of the top entry are sent back.

Changes made here to files are written to the site's audit log (who, when, old, new, why).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lineguard.runtime import events as ev
from lineguard.runtime.audit import AuditLog
from lineguard.runtime.config import StationConfig
from lineguard.runtime.config_loader import ConfigError, load_station
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.site_config import SiteConfig
from lineguard.runtime.threshold_limits import ThresholdError, check_thresholds, check_value

log = logging.getLogger(__name__)

KEYS = ("image", "pixel", "min_area_px")
ROLLBACK_PREFIX = "rollback:"


def _yaml_float(value: float) -> str:
    """repr (exact) in a form YAML 1.1 reads as a float: `1e-05` would load as a string."""
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def _fmt(key: str, value: float | int) -> str:
    try:
        value = check_value(key, value)
    except ThresholdError as exc:
        raise LineGuardError(f"threshold {exc}") from None
    return str(value) if key == "min_area_px" else _yaml_float(value)


# ---------------------------------------------------------------------------- station file


def _backups(path: Path, kind: str = "bak") -> list[tuple[int, Path]]:
    pattern = re.compile(re.escape(path.name) + rf"\.{kind}\.(\d+)$")
    found = []
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_backups(path: str | Path) -> list[Path]:
    """Versioned backups of a station file, oldest first."""
    return [p for _, p in _backups(Path(path))]


def _edit_thresholds(text: str, values: dict[str, Any]) -> str:
    """`text` with `thresholds.<key>` set for every key in `values`, comments kept."""
    return _edit_block(text, "thresholds", {k: _fmt(k, v) for k, v in values.items()})


def _flow_rulers(rulers: list[dict[str, float]]) -> str:
    """Per-position rulers as one YAML flow sequence (one line, exact floats)."""
    items = (
        f"{{center: {_yaml_float(r['center'])}, scale: {_yaml_float(r['scale'])}}}" for r in rulers
    )
    return "[" + ", ".join(items) + "]"


def _edit_block(text: str, block: str, items: dict[str, str]) -> str:
    """`text` with `<block>.<key>` set to the YAML text `items[key]`, comments kept."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        raise LineGuardError("station file is not a mapping")
    node = next((v for k, v in root.value if k.value == block), None)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement)
    if node is None:
        body = "".join(f"  {k}: {v}\n" for k, v in items.items())
        sep = "" if text.endswith("\n") or not text else "\n"
        return f"{text}{sep}{block}:\n{body}"
    if isinstance(node, yaml.ScalarNode):  # `<block>:` with nothing (null)
        flow = "{" + ", ".join(f"{k}: {v}" for k, v in items.items()) + "}"
        start = node.start_mark.index
        end = node.end_mark.index
        if start == end:
            return text[:start] + " " + flow + text[end:]
        return text[:start] + flow + text[end:]
    if not isinstance(node, yaml.MappingNode):
        raise LineGuardError(f"{block}: expected a mapping")
    present = {k.value: v for k, v in node.value}
    missing = {k: v for k, v in items.items() if k not in present}
    for key, value in items.items():
        if key in present:
            scalar = present[key]
            edits.append((scalar.start_mark.index, scalar.end_mark.index, value))
    if missing:
        if node.flow_style:
            close = node.end_mark.index - 1  # the '}'
            body = ", ".join(f"{k}: {v}" for k, v in missing.items())
            edits.append((close, close, (", " if node.value else "") + body))
        else:
            first_key = node.value[0][0]
            indent = " " * first_key.start_mark.column
            last_value = node.value[-1][1]
            line_end = text.find("\n", last_value.end_mark.index)
            at = len(text) if line_end < 0 else line_end + 1
            body = "".join(f"{indent}{k}: {v}\n" for k, v in missing.items())
            if line_end < 0:
                body = "\n" + body
            edits.append((at, at, body))
    for start, end, repl in sorted(edits, reverse=True):
        text = text[:start] + repl + text[end:]
    return text


def _thresholds_of(cfg: StationConfig) -> dict[str, Any]:
    t = cfg.thresholds
    return {"image": t.image, "pixel": t.pixel, "min_area_px": t.min_area_px}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    shutil.copymode(path, tmp)
    tmp.replace(path)


def _validated(path: Path, text: str) -> StationConfig:
    """Validate candidate text with the runtime's loader, next to the real file (same relative
    paths)."""
    probe = path.with_name(f".{path.name}.check")
    probe.write_text(text, encoding="utf-8")
    try:
        return load_station(probe, check_files=False)
    except ConfigError as exc:
        raise LineGuardError(f"{path}: the edited file would be invalid:\n{exc}") from None
    finally:
        probe.unlink(missing_ok=True)


@dataclass
class FileChange:
    path: Path
    old: dict[str, Any]
    new: dict[str, Any]
    backup: Path | None
    comments_kept: bool = True


def _rulers_of(cfg: StationConfig) -> list[dict[str, float]] | None:
    norm = None if cfg.tiling is None else cfg.tiling.position_norm
    return None if norm is None else [p.model_dump() for p in norm]


def write_thresholds(
    path: str | Path,
    values: dict[str, Any],
    position_norm: list[dict[str, float]] | None = None,
) -> FileChange:
    """Set thresholds (and, for a tiled station, its per-position rulers) in a station file,
    keeping a versioned backup (see module docstring)."""
    path = Path(path)
    unknown = set(values) - set(KEYS)
    if unknown:
        raise LineGuardError(f"unknown threshold keys: {', '.join(sorted(unknown))}")
    original = path.read_text(encoding="utf-8")
    before = load_station(path, check_files=False)
    if position_norm is not None and before.tiling is None:
        raise LineGuardError(f"{path}: per-position rulers need a tiled station")
    kept = True
    text = _edit_thresholds(original, values)
    if position_norm is not None:
        text = _edit_block(text, "tiling", {"position_norm": _flow_rulers(position_norm)})

    def wrong(cfg: StationConfig) -> bool:
        rulers_wrong = position_norm is not None and _rulers_of(cfg) != position_norm
        return rulers_wrong or any(_thresholds_of(cfg)[k] != v for k, v in values.items())

    cfg = _validated(path, text)
    if wrong(cfg):
        # Should not happen; if an unusual layout defeats the in-place edit, rewrite the data.
        log.warning("%s: in-place edit failed; rewriting the file without its comments", path)
        data = yaml.safe_load(original)
        data.setdefault("thresholds", {}).update(values)
        if position_norm is not None:
            data["tiling"]["position_norm"] = position_norm
        text = yaml.safe_dump(data, sort_keys=False)
        cfg = _validated(path, text)
        kept = False
    n = (_backups(path)[-1][0] + 1) if _backups(path) else 1
    backup = path.with_name(f"{path.name}.bak.{n}")
    shutil.copy2(path, backup)
    _write_atomic(path, text)
    return FileChange(path, _thresholds_of(before), _thresholds_of(cfg), backup, kept)


def rollback_config(path: str | Path) -> FileChange:
    """Restore the newest `<file>.bak.<N>`; the current file is kept as `<file>.undone.<M>`."""
    path = Path(path)
    backups = _backups(path)
    if not backups:
        raise LineGuardError(f"{path}: no backup (<file>.bak.<N>) to roll back to")
    _, backup = backups[-1]
    try:
        restored = load_station(backup, check_files=False)
    except ConfigError as exc:
        raise LineGuardError(f"{backup}: backup is not a valid station file:\n{exc}") from None
    current = load_station(path, check_files=False)
    m = (_backups(path, "undone")[-1][0] + 1) if _backups(path, "undone") else 1
    undone = path.with_name(f"{path.name}.undone.{m}")
    shutil.copy2(path, undone)
    os.replace(backup, path)
    return FileChange(path, _thresholds_of(current), _thresholds_of(restored), undone)


def audit_file_change(
    audit: AuditLog,
    cfg: StationConfig,
    change: FileChange,
    *,
    by: str,
    reason: str,
    action: str,
    edge_id: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return audit.append(
        station=cfg.station_id,
        line=cfg.line_id,
        by=by,
        reason=reason,
        old=change.old,
        new=change.new,
        action=action,
        source="config",
        edge_id=edge_id,
        extra={
            "file": str(change.path),
            "previous_saved_as": None if change.backup is None else str(change.backup),
            **(extra or {}),
        },
    )


# ---------------------------------------------------------------------------- live (MQTT)


class CommandRefused(LineGuardError):
    """The runtime answered on threshold/error."""


def _client(site: SiteConfig):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    b = site.broker
    if b is None:
        raise LineGuardError(
            "the site has no broker: apply to the station file (--apply config) instead"
        )
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"lineguard-calibrate-{uuid.uuid4().hex[:12]}",
        protocol=paho.MQTTv311,
        clean_session=True,
    )
    if b.tls is not None:
        ctx = ssl.create_default_context(cafile=str(b.tls.ca) if b.tls.ca else None)
        if b.tls.cert is not None:
            ctx.load_cert_chain(str(b.tls.cert), str(b.tls.key))
        if b.tls.insecure:
            ctx.check_hostname = False
        client.tls_set_context(ctx)
    if b.username:
        pw = b.password()
        client.username_pw_set(b.username, pw.get_secret_value() if pw is not None else None)
    return client


@dataclass
class LiveResult:
    before: dict[str, Any] | None  # the retained threshold/state seen before the command
    after: dict[str, Any]  # the echo
    request_id: str
    command: dict[str, Any]


def send_command(
    site: SiteConfig, cfg: StationConfig, command: dict[str, Any], timeout_s: float = 10.0
) -> LiveResult:
    """Publish a threshold/set command for `cfg`'s station and wait for the runtime's echo."""
    topics = ev.Topics(site.topic_prefix, site.edge_id)
    state_t = topics.threshold_state(cfg.line_id, cfg.station_id)
    error_t = topics.threshold_error(cfg.line_id, cfg.station_id)
    request_id = command.get("request_id") or f"calibrate:{uuid.uuid4()}"
    command = {"schema_version": 1, **command, "request_id": request_id}
    try:
        check_thresholds({k: command[k] for k in KEYS if k in command})
    except ThresholdError as exc:
        raise LineGuardError(f"threshold command would be refused: {exc}") from None
    problems = ev.schema_errors("threshold_set", command)
    if problems:
        raise LineGuardError("threshold command would be refused: " + "; ".join(problems))
    cv = threading.Condition()
    seen: dict[str, Any] = {"before": None, "after": None, "error": None, "subscribed": False}

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            with cv:
                seen["error"] = f"broker refused the connection: {reason_code}"
                cv.notify_all()
            return
        client.subscribe([(state_t, 1), (error_t, 1)])

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        with cv:
            seen["subscribed"] = True
            cv.notify_all()

    def on_message(client, userdata, msg):
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        with cv:
            if data.get("request_id") == request_id:
                key = "after" if msg.topic == state_t else "error"
                seen[key] = data if key == "after" else data.get("error", "refused")
            elif msg.topic == state_t and msg.retain and seen["before"] is None:
                seen["before"] = data
            cv.notify_all()

    client = _client(site)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    b = site.broker
    try:
        client.connect(b.host, b.port, keepalive=max(b.keepalive, 10))
    except (OSError, ssl.SSLError) as exc:
        raise LineGuardError(f"cannot connect to the broker {b.host}:{b.port}: {exc}") from None
    client.loop_start()
    try:
        with cv:
            if not cv.wait_for(lambda: seen["subscribed"] or seen["error"], timeout_s):
                raise LineGuardError(f"broker {b.host}:{b.port}: no answer in {timeout_s:.0f} s")
            if seen["error"]:
                raise LineGuardError(seen["error"])
            cv.wait_for(lambda: seen["before"] is not None, min(1.0, timeout_s))
        topic = topics.threshold_set(cfg.line_id, cfg.station_id)
        info = client.publish(topic, ev.encode(command), qos=1, retain=False)
        info.wait_for_publish(timeout_s)
        with cv:
            if not cv.wait_for(lambda: seen["after"] or seen["error"], timeout_s):
                raise LineGuardError(
                    f"no echo on {state_t} within {timeout_s:.0f} s: is the runtime of edge "
                    f"'{site.edge_id}' running with station {cfg.station_id}?"
                )
            if seen["error"]:
                raise CommandRefused(f"the runtime refused the command: {seen['error']}")
        return LiveResult(seen["before"], seen["after"], request_id, command)
    finally:
        client.disconnect()
        client.loop_stop()


def live_rollback_target(
    audit: AuditLog, cfg: StationConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(entry to undo, thresholds to restore) from the runtime's audit entries (see docstring)."""
    stack: list[dict[str, Any]] = []
    for e in audit.entries(cfg.station_id):
        if e.get("line") != cfg.line_id or e.get("action") != "threshold/set":
            continue
        if e.get("source") != "mqtt":
            continue
        if str(e.get("request_id") or "").startswith(ROLLBACK_PREFIX):
            if stack:
                stack.pop()
        else:
            stack.append(e)
    if not stack:
        raise LineGuardError(
            f"{audit.path}: no live threshold change of {cfg.line_id}/{cfg.station_id} left to "
            "roll back"
        )
    entry = stack[-1]
    old = (entry.get("old") or {}).get("active")
    if not old:
        raise LineGuardError(f"{audit.path}: entry {entry.get('ts')} has no old thresholds")
    return entry, {k: old[k] for k in KEYS if k in old}
