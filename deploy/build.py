"""`lineguard bundle build`: lay a model artifact, station configs, their prompt images and the
site config out as a self-contained bundle, then pack it (`bundle.write_archive`).

Station and site configs are validated with the runtime's loader twice: as the user wrote them
(errors name their file and line) and as rewritten for the bundle (paths now relative to it).
Paths the runtime writes to must point into `state/` (each release links it to <root>/state),
and secrets/certificates must be absolute paths on the edge PC: they are never bundled.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lineguard.deploy import configs, signing
from lineguard.deploy.bundle import write_archive
from lineguard.deploy.manifest import (
    MODEL_DIR,
    PROMPTS_DIR,
    SITE_FILE,
    STATE_DIR,
    STATIONS_DIR,
    VERSION_RE,
    Manifest,
    StationEntry,
    check_version,
    file_entry,
    model_summary,
    runtime_versions,
    utc_now,
)
from lineguard.runtime.artifact import load_card
from lineguard.runtime.errors import LineGuardError

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    sha256: str
    signed: bool


def _copy_tree_files(src: Path, dst: Path) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_dir():
            continue
        if not f.is_file():
            raise LineGuardError(f"{f}: not a regular file (the artifact may hold only files)")
        if f.name.endswith(".tmp"):
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)


def _station_files(stations: Path) -> list[Path]:
    if stations.is_file():
        return [stations]
    if not stations.is_dir():
        raise LineGuardError(f"{stations}: no such station config file or folder")
    files = sorted(p for p in stations.iterdir() if p.suffix in configs.YAML_SUFFIXES)
    if not files:
        raise LineGuardError(f"{stations}: no station configs (*.yaml) found")
    return files


def _check_state_path(value: Any, bundle_dir: str, where: str) -> None:
    """Relative paths the runtime writes to must land in `state/` (releases are read-only)."""
    if not isinstance(value, str) or Path(os.path.expanduser(value)).is_absolute():
        return
    inside = os.path.normpath(os.path.join(bundle_dir, value))
    if inside != STATE_DIR and not inside.startswith(STATE_DIR + "/"):
        raise LineGuardError(
            f"{where}: {value!r} would be written inside the read-only release; use a path "
            f"under {STATE_DIR}/ (relative to the bundle root), which persists across releases, "
            "or an absolute path"
        )


def _stage_station(src: Path, stage: Path, artifact: Path, used: dict[str, str]) -> StationEntry:
    """Copy one station config and its prompt image into `stage`, rewriting their paths."""
    configs.validate_station_file(src)  # errors name the user's file and line
    data = configs.read_mapping(src, "station")
    sid = configs.station_id(data, src)
    if not VERSION_RE.match(sid):
        raise LineGuardError(f"{src}: station_id {sid!r} cannot be used as a folder name")
    if sid in used:
        raise LineGuardError(f"{src}: station_id {sid!r} is also used by {used[sid]}")
    used[sid] = str(src)
    key = ".".join(configs.PROMPT_KEY)
    image = configs.resolve(configs.get_key(data, configs.PROMPT_KEY), src.parent.absolute())
    if image is None or not image.is_file():
        raise LineGuardError(f"{src}: {key}: prompt image {image or '(missing)'} not found")
    rel = f"{PROMPTS_DIR}/{sid}/{image.name}"
    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, stage / rel)
    configs.set_key(data, configs.PROMPT_KEY, f"../{rel}")
    model = configs.resolve(configs.get_key(data, configs.MODEL_KEY), src.parent.absolute())
    if model is None:
        raise LineGuardError(f"{src}: model: missing (the model artifact folder)")
    if model.resolve() != artifact:
        raise LineGuardError(
            f"{src}: model: names {model}, but the bundle carries {artifact}: one bundle holds "
            "one model"
        )
    configs.set_key(data, configs.MODEL_KEY, f"../{MODEL_DIR}")
    _check_state_path(
        configs.get_key(data, ("evidence", "save_dir")), STATIONS_DIR, f"{src}: evidence.save_dir"
    )
    rel_cfg = f"{STATIONS_DIR}/{src.name}"
    (stage / rel_cfg).parent.mkdir(parents=True, exist_ok=True)
    (stage / rel_cfg).write_bytes(configs.dump_yaml(data))
    return StationEntry(id=sid, config=rel_cfg, prompts=[rel])


def _stage_site(site: Path, stage: Path, names: dict[Path, str]) -> None:
    """Copy the site config, pointing `stations` at the bundled station files."""
    configs.validate_site_file(site, check_files=False)  # TLS files live on the edge PC
    data = configs.read_mapping(site, "site")
    configs.check_site_local_paths(data, site)
    listed = []
    for f in configs.site_station_files(data, site):
        if f.resolve() not in names:
            raise LineGuardError(f"{site}: stations: {f} is not among the bundled --stations")
        listed.append(names[f.resolve()])
    unlisted = sorted(set(names.values()) - set(listed))
    if unlisted:
        log.warning("%s does not list %s: the runtime will not run them", site, unlisted)
    data["stations"] = listed
    _check_state_path(configs.get_key(data, ("outbox", "path")), ".", f"{site}: outbox.path")
    _check_state_path(data.get("audit_log"), ".", f"{site}: audit_log")
    (stage / SITE_FILE).write_bytes(configs.dump_yaml(data))


def stage_bundle(
    artifact: Path, stations: Path, version: str, stage: Path, site: Path | None = None
) -> Manifest:
    """Lay the bundle out in `stage` and return its (unsigned) manifest."""
    check_version(version)
    artifact = artifact.resolve()
    card = load_card(artifact, verify=True)
    _copy_tree_files(artifact, stage / MODEL_DIR)
    used: dict[str, str] = {}
    entries = []
    names: dict[Path, str] = {}
    for src in _station_files(stations):
        entry = _stage_station(src, stage, artifact, used)
        entries.append(entry)
        names[src.resolve()] = entry.config
    if site is not None:
        _stage_site(site, stage, names)
    else:
        log.warning("no --site: the bundle has no site.yaml, which `lineguard run` needs")
    files = {
        p.relative_to(stage).as_posix(): file_entry(p)
        for p in sorted(stage.rglob("*"))
        if p.is_file()
    }
    return Manifest(
        version=version,
        created=utc_now(),
        runtime=runtime_versions(),
        model=model_summary(card, stage / MODEL_DIR),
        stations=entries,
        site=SITE_FILE if site is not None else None,
        files=files,
    )


def build_bundle(
    artifact: Path,
    stations: Path,
    version: str,
    out: Path,
    site: Path | None = None,
    sign_key: Path | None = None,
) -> BuildResult:
    key = signing.load_private_key(sign_key) if sign_key is not None else None
    with tempfile.TemporaryDirectory(prefix="lineguard-bundle-") as tmp:
        stage = Path(tmp)
        manifest = stage_bundle(Path(artifact), Path(stations), version, stage, site)
        from lineguard.deploy.health import check_configs

        # the rewritten copies must still validate (machine-local files are checked on the edge)
        try:
            check_configs(stage, manifest, on_edge=False)
        except LineGuardError as exc:
            raise LineGuardError(str(exc).replace(str(stage), f"{out} (staged)")) from exc
        sig = signing.sign(manifest.to_bytes(), key) if key is not None else None
        digest = write_archive(stage, manifest, Path(out), sig)
    return BuildResult(Path(out), manifest, digest, sig is not None)
