"""The deploy root on an edge PC: releases, the `current` link, the audit history.

<root>/releases/<version>/   unpacked bundles (read-only to the runtime); each has a
                             `state` link to <root>/state
<root>/current               symlink -> releases/<version>, switched with one rename(2)
<root>/state/                the runtime's writable state (outbox, evidence, audit log),
                             kept across releases
<root>/bundle-signing.pub    optional pinned key: signatures become mandatory
<root>/deploy.lock           flock: one install/rollback at a time
<root>/deploy-history.jsonl  append-only audit of every install/rollback attempt
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lineguard.deploy.health import HealthError
from lineguard.deploy.manifest import MANIFEST, Manifest, parse_manifest, utc_now
from lineguard.runtime.artifact import sha256_file
from lineguard.runtime.errors import LineGuardError

HISTORY = "deploy-history.jsonl"
# A public key placed here (Ansible's role does) makes signatures mandatory on this edge PC.
PINNED_KEY = "bundle-signing.pub"
INCOMING = ".incoming-"


class DeployRoot:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.releases = self.root / "releases"
        self.current = self.root / "current"
        self.state = self.root / "state"
        self.history_file = self.root / HISTORY
        self.pinned_key = self.root / PINNED_KEY

    def ensure(self) -> None:
        for d in (self.root, self.releases, self.state):
            d.mkdir(parents=True, exist_ok=True)

    def release(self, version: str) -> Path:
        return self.releases / version

    def current_version(self) -> str | None:
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        return Path(target).name

    def installed(self) -> list[str]:
        if not self.releases.is_dir():
            return []
        return sorted(
            p.name for p in self.releases.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def manifest(self, version: str) -> Manifest:
        path = self.release(version) / MANIFEST
        return parse_manifest(path.read_bytes(), str(path))

    # -- the atomic switch ----------------------------------------------------------------------

    def switch(self, version: str | None) -> None:
        """Point `current` at releases/<version> (None removes it) with one rename(2)."""
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                self.current.unlink()
        else:
            tmp = self.root / f".current.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(f"releases/{version}", tmp)
            os.replace(tmp, self.current)
        fsync_dir(self.root)

    # -- history -----------------------------------------------------------------------------

    def record(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"time": utc_now(), **entry}, sort_keys=True) + "\n"
        with open(self.history_file, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def history(self) -> list[dict[str, Any]]:
        if not self.history_file.is_file():
            return []
        out = []
        for line in self.history_file.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def activations(self) -> list[str]:
        """Versions in the order they became active (successful installs and rollbacks)."""
        return [h["version"] for h in self.history() if h.get("ok") and h.get("activated")]

    def previous_version(self) -> str | None:
        """The most recently active release, other than the current one, still installed."""
        cur, have = self.current_version(), set(self.installed())
        for v in reversed(self.activations()):
            if v != cur and v in have:
                return v
        return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_installed(release: Path) -> None:
    """An installed release must still match its manifest (nobody edited it on disk)."""
    manifest = parse_manifest((release / MANIFEST).read_bytes(), str(release / MANIFEST))
    for name, entry in manifest.files.items():
        f = release / name
        if not f.is_file() or f.is_symlink():
            raise HealthError(f"{release}: {name} is missing")
        if f.stat().st_size != entry.size or sha256_file(f) != entry.sha256:
            raise HealthError(f"{release}: {name} was modified after install")


def prune(root: DeployRoot, keep: int) -> list[str]:
    """Delete the oldest releases beyond `keep`; never the current one or the rollback target."""
    keep = max(1, keep)
    cur, prev = root.current_version(), root.previous_version()
    order = {v: i for i, v in enumerate(root.activations())}
    installed = root.installed()
    protected = [v for v in (cur, prev) if v in installed][:keep]
    rest = sorted(
        (v for v in installed if v not in protected),
        key=lambda v: (order.get(v, -1), root.release(v).stat().st_mtime),
        reverse=True,
    )
    doomed = rest[max(0, keep - len(protected)) :]
    for v in doomed:
        shutil.rmtree(root.release(v))
    return doomed


def clean_leftovers(root: DeployRoot) -> None:
    """Remove what a crashed install may have left (we hold the lock, so none is in use)."""
    for stale in root.releases.glob(INCOMING + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    for tmp in root.root.glob(".current.*.tmp"):
        tmp.unlink(missing_ok=True)


def status(root_dir: str | Path) -> dict[str, Any]:
    root = DeployRoot(root_dir)
    current = root.current_version()
    history = root.history()
    activated: dict[str, str] = {}
    for h in history:
        if h.get("ok") and h.get("activated"):
            activated[h["version"]] = h["time"]
    releases = []
    for v in root.installed():
        info: dict[str, Any] = {
            "version": v,
            "active": v == current,
            "last_activated": activated.get(v),
        }
        try:
            m = root.manifest(v)
            info.update(
                created=m.created,
                model=m.model.name,
                stations=[s.id for s in m.stations],
                files=len(m.files),
            )
        except (OSError, LineGuardError) as exc:
            info["error"] = str(exc)
        releases.append(info)
    broken = current is not None and not root.release(current).is_dir()
    return {
        "root": str(root.root),
        "current": current,
        "current_broken": broken,
        "previous": root.previous_version(),
        "releases": releases,
        "last": history[-1] if history else None,
    }
