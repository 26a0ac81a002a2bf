"""Install, activate and roll back releases (layout: `releases.py`).

An install never edits a release in place: it unpacks into `releases/.incoming-*`, checks it there
(configs, model, one inference per station), renames it into place, and only then moves `current`.
After the switch the live checks run (service restart, runtime online, health hook); if any
fails, `current` goes back to the previous release. A crash at any point leaves `current` on a
complete release.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lineguard.deploy import configs
from lineguard.deploy.bundle import Verified, extract_verified, verify_bundle
from lineguard.deploy.health import HealthError, check_release, run_health_cmd
from lineguard.deploy.lock import DeployLock
from lineguard.deploy.manifest import (
    MANIFEST,
    SITE_FILE,
    STATE_DIR,
    parse_manifest,
    utc_now,
)
from lineguard.deploy.releases import (
    INCOMING,
    DeployRoot,
    check_installed,
    clean_leftovers,
    fsync_dir,
    prune,
)
from lineguard.runtime.artifact import sha256_file
from lineguard.runtime.errors import LineGuardError

log = logging.getLogger(__name__)


@dataclass
class Options:
    """How to install/activate; the CLI flags of `deploy install` and `deploy rollback`."""

    pubkey: Path | None = None
    keep: int = 3
    service: str | None = None
    health_timeout: float = 60.0
    health_cmd: str | None = None
    wait_online: str = "auto"  # auto: when a service is managed and the site names a broker
    lock_timeout: float | None = 600.0
    inference: bool = True
    backend: str | None = None
    precision: str | None = None
    force: bool = False
    publish: bool = True


@dataclass
class Result:
    action: str
    version: str | None
    previous: str | None
    changed: bool
    health: dict[str, Any] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)
    published: str | None = None
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


# ---- live checks after the switch --------------------------------------------------------------


def _broker(release: Path):
    site = release / SITE_FILE
    try:
        return configs.broker_info(site)
    except LineGuardError as exc:
        log.warning("cannot read broker settings from %s: %s", site, exc)
        return None


def _station_topics(release: Path, manifest: Any) -> list[tuple[str, str]]:
    """(line, station) of every station of the release: the status topics the gate reads."""
    out = []
    for st in manifest.stations:
        cfg = configs.validate_station_file(release / st.config, check_files=False)
        out.append((cfg.line_id, cfg.station_id))
    return out


def _live_checks(root: DeployRoot, version: str, previous: str | None, opts: Options) -> None:
    from lineguard.deploy.mqtt_state import OnlineWatcher

    release = root.release(version)
    broker = _broker(release) if opts.wait_online != "no" else None
    if opts.wait_online == "yes" and broker is None:
        raise HealthError(f"--wait-online yes, but {release / SITE_FILE} names no MQTT broker")
    env = {
        "LINEGUARD_ROOT": str(root.root),
        "LINEGUARD_RELEASE": str(release),
        "LINEGUARD_VERSION": version,
        "LINEGUARD_PREVIOUS": previous or "",
    }
    with contextlib.ExitStack() as stack:
        watcher = None
        if broker is not None and (opts.wait_online == "yes" or opts.service):
            try:  # subscribe before the restart so the new process's `online` cannot be missed
                stations = _station_topics(release, root.manifest(version))
                watcher = stack.enter_context(OnlineWatcher(broker, stations=stations))
            except HealthError as exc:
                if opts.wait_online == "yes":
                    raise
                # auto: an unreachable broker must not block a deploy (the outbox covers it)
                log.warning("%s; skipping the online check", exc)
        if opts.service:
            from lineguard.deploy.service import restart_service

            restart_service(opts.service, opts.health_timeout)
        if opts.health_cmd:
            run_health_cmd(opts.health_cmd, env, opts.health_timeout)
        if watcher is not None:
            watcher.wait(opts.health_timeout)


def _activate(root: DeployRoot, version: str, previous: str | None, opts: Options) -> None:
    """Switch to `version`, run the live checks, and switch back to `previous` if they fail."""
    root.switch(version)
    try:
        _live_checks(root, version, previous, opts)
    except (HealthError, LineGuardError) as exc:
        root.switch(previous)
        note = ""
        if opts.service and previous:
            from lineguard.deploy.service import restart_service

            try:
                restart_service(opts.service, opts.health_timeout)
            except HealthError as again:
                note = f"; restarting {opts.service} on {previous} failed too: {again}"
        raise HealthError(
            f"release {version} failed its health check after activation ({exc}); "
            f"rolled back to {previous or 'no release'}{note}"
        ) from exc


def _publish(root: DeployRoot, version: str, previous: str | None, opts: Options) -> str | None:
    if not opts.publish:
        return None
    release = root.release(version)
    broker = _broker(release)
    if broker is None:
        return None
    from lineguard.deploy.mqtt_state import bundle_topic, publish_bundle_state

    manifest = root.manifest(version)
    state = {
        "edge": broker.edge_id,
        "version": version,
        "previous": previous,
        "manifest_sha256": sha256_file(release / MANIFEST),
        "model": manifest.model.name,
        "model_json_sha256": manifest.model.model_json_sha256,
        "stations": [s.id for s in manifest.stations],
        "activated_at": utc_now(),
    }
    try:
        publish_bundle_state(broker, state)
    except (ConnectionError, OSError) as exc:
        log.warning("could not publish the bundle state: %s", exc)
        return None
    return bundle_topic(broker)


# ---- commands -------------------------------------------------------------------------------


def _same_release(root: DeployRoot, verified: Verified) -> bool:
    """Same version and byte-identical files (a rebuild differs only in its build time)."""
    path = root.release(verified.manifest.version) / MANIFEST
    if not path.is_file():
        return False
    try:
        installed = parse_manifest(path.read_bytes(), str(path))
    except LineGuardError:
        return False
    return installed.files == verified.manifest.files


def install(bundle: str | Path, root_dir: str | Path, opts: Options) -> Result:
    root = DeployRoot(root_dir)
    root.ensure()
    with DeployLock(root.root, opts.lock_timeout):
        entry: dict[str, Any] = {"action": "install", "bundle": str(Path(bundle).absolute())}
        try:
            result = _install_locked(root, Path(bundle), opts, entry)
        except LineGuardError as exc:
            root.record({**entry, "ok": False, "error": str(exc)})
            raise
        root.record(
            {
                **entry,
                "ok": True,
                "activated": result.changed,
                "version": result.version,
                "previous": result.previous,
            }
        )
        return result


def _pubkey(root: DeployRoot, opts: Options) -> Path | None:
    """--pubkey, else the key pinned in the root: forgetting the flag must not skip the check."""
    if opts.pubkey is not None:
        return Path(opts.pubkey)
    return root.pinned_key if root.pinned_key.is_file() else None


def _install_locked(root: DeployRoot, bundle: Path, opts: Options, entry: dict) -> Result:
    clean_leftovers(root)
    pubkey = _pubkey(root, opts)
    verified = verify_bundle(bundle, pubkey, require_signature=pubkey is not None)
    version = verified.manifest.version
    entry.update(
        version=version,
        bundle_sha256=verified.sha256,
        signed=verified.signed,
        key=verified.key_fingerprint,
    )
    current = root.current_version()
    release = root.release(version)
    if release.exists() and version != current and opts.force:
        shutil.rmtree(release)  # unpack afresh, whatever is on disk
    if release.exists() and not _same_release(root, verified):
        raise LineGuardError(
            f"{release}: version {version} is already installed with different content; "
            "build the bundle under a new version"
            + ("" if version == current else " (or pass --force to replace it)")
        )
    if release.exists():
        check_installed(release)
        if version == current:
            return Result(
                "install",
                version,
                root.previous_version(),
                changed=False,
                message=f"{version} is already installed and active",
            )
        health = check_release(
            release, verified.manifest, opts.inference, opts.backend, opts.precision
        )
    else:
        tmp = Path(tempfile.mkdtemp(prefix=INCOMING + version + "-", dir=root.releases))
        try:
            staged = tmp / "r"
            extract_verified(verified, staged)
            # the runtime's writable state lives outside releases; relative state/ paths reach it
            os.symlink(f"../../{STATE_DIR}", staged / STATE_DIR)
            health = check_release(
                staged,
                verified.manifest,
                opts.inference,
                opts.backend,
                opts.precision,
                label=str(release),
            )
            os.replace(staged, release)
            fsync_dir(root.releases)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        _activate(root, version, current, opts)
    except HealthError:
        if not any(v == version for v in root.activations()):
            shutil.rmtree(release, ignore_errors=True)  # never worked: do not keep it around
        raise
    published = _publish(root, version, current, opts)
    pruned = prune(root, opts.keep)
    return Result(
        "install",
        version,
        current,
        changed=True,
        health=health.as_dict(),
        pruned=pruned,
        published=published,
        message=f"{version} is active" + (f" (previous {current})" if current else ""),
    )


def rollback(root_dir: str | Path, opts: Options, to: str | None = None) -> Result:
    root = DeployRoot(root_dir)
    if not root.releases.is_dir():
        raise LineGuardError(f"{root.root}: no releases installed here")
    with DeployLock(root.root, opts.lock_timeout):
        current = root.current_version()
        target = to or root.previous_version()
        entry = {"action": "rollback", "version": target, "previous": current}
        try:
            if target is None:
                raise LineGuardError(f"{root.root}: no earlier release to roll back to")
            if target not in root.installed():
                raise LineGuardError(
                    f"{root.root}: release {target} is not installed "
                    f"(installed: {', '.join(root.installed()) or 'none'})"
                )
            if target == current:
                raise LineGuardError(f"{root.root}: {target} is already the active release")
            release = root.release(target)
            check_installed(release)
            health = check_release(
                release, root.manifest(target), opts.inference, opts.backend, opts.precision
            )
            _activate(root, target, current, opts)
        except LineGuardError as exc:
            root.record({**entry, "ok": False, "error": str(exc)})
            raise
        root.record({**entry, "ok": True, "activated": True})
        published = _publish(root, target, current, opts)
        return Result(
            "rollback",
            target,
            current,
            changed=True,
            health=health.as_dict(),
            published=published,
            message=f"rolled back from {current} to {target}",
        )
