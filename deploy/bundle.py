"""The bundle archive: write it, verify it, unpack it.

A bundle is one tar.gz (built by `build.py`); inside, and in `releases/<version>/` after install:

    manifest.json            versions, model summary, sha256 + size of every other file
    manifest.sig             optional ed25519 signature over manifest.json's exact bytes
    model/...                the model artifact (model.json + graphs)
    stations/<name>.yaml     station configs, paths rewritten relative to the bundle
    prompts/<station>/...    each station's prompt image
    site.yaml                the site config (broker, edge id, station list)

Verification reads the archive member by member and never trusts it: only regular files and
folders, no absolute paths, no `..`, no duplicates, nothing the manifest does not list, every size
and sha256 as listed. Unpacking writes each file itself (no `extractall`) and checks every hash
again while writing, so a bundle swapped between verify and unpack cannot slip through.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lineguard.deploy import signing
from lineguard.deploy.manifest import (
    MANIFEST,
    MODEL_DIR,
    SIGNATURE,
    TOP_LEVEL,
    Manifest,
    parse_manifest,
)
from lineguard.runtime.artifact import MODEL_JSON, sha256_file
from lineguard.runtime.errors import LineGuardError

CHUNK = 1 << 20
MAX_MANIFEST = 16 << 20
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
# The exact gzip header `write_archive` produces (no name, mtime 0, level 9, OS unknown). Checking
# it means a changed byte anywhere fails: header here, body by the CRC and the manifest hashes,
# trailer by reading the stream to its end.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"


# ---- write ---------------------------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, mtime
    tar.addfile(info, io.BytesIO(data))


def write_archive(stage: Path, manifest: Manifest, out: Path, signature: bytes | None) -> str:
    """Pack `stage` into `out` (temp file + rename) and return the archive's sha256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    mtime = 0  # reproducible archives: the build time lives in the manifest
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add_bytes(tar, MANIFEST, manifest.to_bytes(), mtime)
            if signature is not None:
                _add_bytes(tar, SIGNATURE, signature, mtime)
            for name in manifest.files:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = manifest.files[name].size, 0o644, mtime
                with open(stage / name, "rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(out)


# ---- verify --------------------------------------------------------------------------------------


@dataclass
class Verified:
    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    sha256: str
    signed: bool
    signature_checked: bool
    key_fingerprint: str | None


def safe_member_name(member: tarfile.TarInfo, where: str) -> str:
    """The member's normalised relative name, or an error for anything that could escape."""
    name = member.name
    if not name or "\x00" in name or "\\" in name:
        raise LineGuardError(f"{where}: refusing archive entry {name!r}: bad characters")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part == ".." for part in p.parts):
        raise LineGuardError(f"{where}: refusing archive entry {name!r}: path leaves the bundle")
    parts = [part for part in p.parts if part not in ("", ".")]
    if not parts:
        raise LineGuardError(f"{where}: refusing archive entry {name!r}: empty path")
    if member.issym() or member.islnk():
        raise LineGuardError(
            f"{where}: refusing archive entry {name!r}: links are not allowed in a bundle"
        )
    if not (member.isfile() or member.isdir()):
        raise LineGuardError(
            f"{where}: refusing archive entry {name!r}: only regular files and folders are allowed"
        )
    return "/".join(parts)


def _members(tar: tarfile.TarFile, where: str) -> Iterator[tuple[tarfile.TarInfo, str]]:
    seen: set[str] = set()
    for m in tar:
        name = safe_member_name(m, where)
        if m.isdir():
            continue
        if name in seen:
            raise LineGuardError(f"{where}: archive entry {name!r} appears twice")
        seen.add(name)
        yield m, name


@contextlib.contextmanager
def _open_archive(path: Path) -> Iterator[tuple[tarfile.TarFile, Iterator]]:
    """Open a bundle for one pass; any decompression or tar error anywhere in the `with`
    body (also while reading a member's bytes) becomes one clear LineGuardError."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            if f.read(len(GZIP_HEADER)) != GZIP_HEADER:
                raise LineGuardError(
                    f"{where}: not a bundle written by `lineguard bundle build` (gzip header)"
                )
        with tarfile.open(path, mode="r:gz") as tar:
            yield tar, _members(tar, where)
            while tar.fileobj.read(CHUNK):  # to the end: the gzip CRC covers every byte
                pass
    except _ARCHIVE_ERRORS as exc:
        raise LineGuardError(f"{where}: corrupt or truncated bundle archive ({exc})") from exc


def _read_small(tar: tarfile.TarFile, m: tarfile.TarInfo, where: str) -> bytes:
    if m.size > MAX_MANIFEST:
        raise LineGuardError(f"{where}: {m.name} is implausibly large ({m.size} bytes)")
    f = tar.extractfile(m)
    assert f is not None
    return f.read()


def _stream(tar: tarfile.TarFile, m: tarfile.TarInfo, sink=None) -> tuple[str, int]:
    f = tar.extractfile(m)
    assert f is not None
    h, n = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
        n += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return h.hexdigest(), n


def _check_consistency(manifest: Manifest, where: str) -> None:
    files = manifest.files
    for name in files:
        if name.split("/", 1)[0] not in TOP_LEVEL:
            raise LineGuardError(f"{where}: manifest lists {name!r} outside the bundle layout")
    needed = [f"{MODEL_DIR}/{MODEL_JSON}"]
    needed += [s.config for s in manifest.stations] + [
        p for s in manifest.stations for p in s.prompts
    ]
    needed += [manifest.site] if manifest.site else []
    for name in needed:
        if name not in files:
            raise LineGuardError(f"{where}: manifest refers to {name} but does not list it")
    if files[f"{MODEL_DIR}/{MODEL_JSON}"].sha256 != manifest.model.model_json_sha256:
        raise LineGuardError(f"{where}: model summary does not match model/model.json")


def verify_bundle(
    path: str | Path, pubkey: str | Path | None = None, require_signature: bool = False
) -> Verified:
    """Check every size, hash and (with `pubkey`) the signature; LineGuardError on any fault."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise LineGuardError(f"{where}: no such bundle file")
    manifest_bytes: bytes | None = None
    signature: bytes | None = None
    got: dict[str, tuple[str, int]] = {}
    with _open_archive(path) as (tar, members):
        for m, name in members:
            if name == MANIFEST:
                manifest_bytes = _read_small(tar, m, where)
            elif name == SIGNATURE:
                signature = _read_small(tar, m, where)
            else:
                got[name] = _stream(tar, m)
    if manifest_bytes is None:
        raise LineGuardError(f"{where}: not a LineGuard bundle (no manifest.json)")
    manifest = parse_manifest(manifest_bytes, where)
    _check_consistency(manifest, where)
    extra = sorted(set(got) - set(manifest.files))
    if extra:
        raise LineGuardError(
            f"{where}: archive holds files the manifest does not list: {extra[:5]}"
        )
    for name, entry in manifest.files.items():
        if name not in got:
            raise LineGuardError(f"{where}: {name} is listed in the manifest but missing")
        digest, size = got[name]
        if size != entry.size:
            raise LineGuardError(f"{where}: {name} has {size} bytes, manifest says {entry.size}")
        if digest != entry.sha256:
            raise LineGuardError(f"{where}: {name} does not match its sha256 in the manifest")
    fingerprint = None
    if pubkey is not None:
        key = signing.load_public_key(pubkey)
        fingerprint = signing.key_fingerprint(key)
        if signature is None:
            raise LineGuardError(f"{where}: bundle is not signed, but a public key was given")
        signing.check_signature(manifest_bytes, signature, key, where)
    elif require_signature:
        raise LineGuardError(f"{where}: a signature is required: pass --pubkey")
    return Verified(
        path=path,
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        sha256=sha256_file(path),
        signed=signature is not None,
        signature_checked=pubkey is not None,
        key_fingerprint=fingerprint,
    )


def extract_verified(verified: Verified, dest: Path) -> None:
    """Unpack into the empty folder `dest`, re-checking each file against the verified manifest."""
    where = str(verified.path)
    files = verified.manifest.files
    dest.mkdir(parents=True, exist_ok=False)
    root = dest.resolve()
    written: set[str] = set()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with _open_archive(verified.path) as (tar, members):
        for m, name in members:
            if name not in files and name not in (MANIFEST, SIGNATURE):
                raise LineGuardError(f"{where}: {name} is not in the verified manifest")
            target = (root / name).resolve()
            if root not in target.parents:
                raise LineGuardError(f"{where}: {name} would be written outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
                if name in (MANIFEST, SIGNATURE):
                    data = _read_small(tar, m, where)
                    if name == MANIFEST and data != verified.manifest_bytes:
                        raise LineGuardError(
                            f"{where}: manifest.json changed since it was verified"
                        )
                    if name == SIGNATURE and not verified.signed:
                        raise LineGuardError(f"{where}: a signature appeared since verification")
                    out.write(data)
                else:
                    digest, size = _stream(tar, m, out)
                    if (digest, size) != (files[name].sha256, files[name].size):
                        raise LineGuardError(
                            f"{where}: {name} changed since the bundle was verified"
                        )
                out.flush()
                os.fsync(out.fileno())
            written.add(name)
    missing = sorted(set(files) - written)
    if missing:
        raise LineGuardError(f"{where}: {missing[0]} missing while unpacking")
