"""Bundle build/verify: self-contained layout, signatures, and refusal of every tampering."""

from __future__ import annotations

import gzip
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest
import yaml
from deploy_testkit import cli, flip_one_byte, make_artifact

from lineguard.deploy.build import build_bundle
from lineguard.deploy.bundle import verify_bundle
from lineguard.deploy.signing import generate_keypair
from lineguard.runtime.artifact import sha256_file
from lineguard.runtime.errors import LineGuardError


def _members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _repack(out: Path, members: dict[str, bytes], extra=()) -> Path:
    """Write `members` (name -> bytes) plus raw TarInfo `extra` entries as a bundle would be
    written (same gzip header), so only the content differs from a real one."""
    with (
        open(out, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def test_build_is_self_contained_and_verifies(workspace, make_bundle):
    bundle = make_bundle("1.0.0")
    v = verify_bundle(bundle)
    m = v.manifest
    files = _members(bundle)
    # every file but the manifest is listed, with its real size and sha256
    assert set(m.files) == set(files) - {"manifest.json"}
    for name, entry in m.files.items():
        assert entry.size == len(files[name])
    assert m.version == "1.0.0" and not v.signed
    assert m.runtime.lineguard and m.runtime.onnxruntime
    assert m.model.name == "tiny" and m.model.input_size == [16, 16]
    assert m.model.model_json_sha256 == sha256_file(workspace["artifact"] / "model.json")
    assert [s.id for s in m.stations] == ["st1", "st2"]
    # the station config now points inside the bundle, and the image bytes came along
    cfg = yaml.safe_load(files["stations/st1.yaml"])
    assert cfg["prompt"]["image"] == "../prompts/st1/st1.png"
    assert cfg["model"] == "../model"
    assert cfg["camera"]["path"] == "/srv/replay"  # site-local paths stay as they are
    assert cfg["evidence"]["save_dir"] == "../state/evidence"
    site = yaml.safe_load(files["site.yaml"])
    assert site["stations"] == ["stations/st1.yaml", "stations/st2.yaml"]
    assert site["edge_id"] == "edge-a"
    src = (workspace["tmp"] / "src" / "golden" / "st1.png").read_bytes()
    assert files["prompts/st1/st1.png"] == src


def test_cli_build_sign_verify(workspace, tmp_path):
    key = tmp_path / "keys" / "signing.key"
    r = cli("bundle", "keygen", "--out", str(key))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    out = tmp_path / "b.tar.gz"
    r = cli(
        "bundle",
        "build",
        "--artifact",
        str(workspace["artifact"]),
        "--stations",
        str(workspace["stations"]),
        "--version",
        "2.0",
        "--sign",
        str(key),
        "--out",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["signed"] is True
    r = cli("bundle", "verify", str(out), "--pubkey", f"{key}.pub")
    assert r.returncode == 0, r.stderr
    assert "valid signature" in r.stdout
    other, _ = generate_keypair(tmp_path / "other.key")
    r = cli("bundle", "verify", str(out), "--pubkey", f"{other}.pub")
    assert r.returncode == 1
    assert "signature does not match" in r.stderr and "Traceback" not in r.stderr


def test_unsigned_bundle_fails_when_a_key_is_required(make_bundle, tmp_path):
    _, pub = generate_keypair(tmp_path / "k")
    with pytest.raises(LineGuardError, match="not signed"):
        verify_bundle(make_bundle("1"), pub)


@pytest.mark.parametrize("where", [0.0, 0.33, 0.5, 0.9])
def test_one_changed_byte_in_the_archive_fails(make_bundle, tmp_path, where):
    bad = flip_one_byte(make_bundle("1"), tmp_path / "bad.tar.gz", where)
    with pytest.raises(LineGuardError, match=r"bad\.tar\.gz: (corrupt|not a bundle)"):
        verify_bundle(bad)


def test_changed_gzip_header_or_appended_bytes_fail(make_bundle, tmp_path):
    data = make_bundle("1").read_bytes()
    bad = tmp_path / "bad.tar.gz"
    stamped = bytearray(data)
    stamped[4] = 0x01  # gzip mtime: means nothing to the content, still not our bundle
    for variant in (bytes(stamped), data + b"x", data[:-1]):
        bad.write_bytes(variant)
        with pytest.raises(LineGuardError):
            verify_bundle(bad)


def test_one_changed_byte_in_a_file_fails_naming_it(make_bundle, tmp_path):
    members = _members(make_bundle("1"))
    body = bytearray(members["model/detector.onnx"])
    body[-1] ^= 0xFF
    members["model/detector.onnx"] = bytes(body)
    bad = _repack(tmp_path / "bad.tar.gz", members)
    with pytest.raises(LineGuardError, match=r"model/detector\.onnx does not match its sha256"):
        verify_bundle(bad)


def test_rewritten_manifest_breaks_the_signature(make_bundle, workspace, tmp_path):
    key, pub = generate_keypair(tmp_path / "k")
    members = _members(make_bundle("1", sign=key))
    # an attacker swaps a model file AND updates the manifest so hashes agree again
    members["model/detector.onnx"] = b"evil"
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["model/detector.onnx"] = {"sha256": sha256_file_bytes(b"evil"), "size": 4}
    members["manifest.json"] = json.dumps(manifest).encode()
    bad = _repack(tmp_path / "bad.tar.gz", members)
    verify_bundle(bad)  # hashes are consistent ...
    with pytest.raises(LineGuardError, match="signature does not match"):
        verify_bundle(bad, pub)  # ... but the signature is not


def sha256_file_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("traversal", "path leaves the bundle"),
        ("absolute", "path leaves the bundle"),
        ("symlink", "links are not allowed"),
        ("hardlink", "links are not allowed"),
        ("fifo", "only regular files"),
        ("unlisted", "does not list"),
        ("duplicate", "appears twice"),
    ],
)
def test_hostile_archive_entries_are_refused(make_bundle, tmp_path, kind, message):
    members = _members(make_bundle("1"))
    extra = []
    if kind == "traversal":
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 1
        extra.append((info, b"x"))
    elif kind == "absolute":
        info = tarfile.TarInfo("/etc/evil")
        info.size = 1
        extra.append((info, b"x"))
    elif kind in ("symlink", "hardlink"):
        info = tarfile.TarInfo("model/link")
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname = "/etc/passwd"
        extra.append((info, None))
    elif kind == "fifo":
        info = tarfile.TarInfo("model/fifo")
        info.type = tarfile.FIFOTYPE
        extra.append((info, None))
    elif kind == "unlisted":
        info = tarfile.TarInfo("model/extra.bin")
        info.size = 3
        extra.append((info, b"abc"))
    elif kind == "duplicate":
        data = members["model/model.json"]
        info = tarfile.TarInfo("./model/model.json")
        info.size = len(data)
        extra.append((info, data))
    bad = _repack(tmp_path / "bad.tar.gz", members, extra)
    with pytest.raises(LineGuardError, match=message):
        verify_bundle(bad)


def test_build_refuses_a_broken_artifact(workspace, tmp_path):
    art = make_artifact(tmp_path / "broken")
    with open(art / "detector.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(LineGuardError, match="does not match its sha256"):
        build_bundle(art, workspace["stations"], "1", tmp_path / "x.tar.gz")
    assert not (tmp_path / "x.tar.gz").exists()


def test_build_refuses_a_station_naming_another_model(workspace, tmp_path):
    other = make_artifact(tmp_path / "other", name="other")
    cfg_path = workspace["stations"] / "st2.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"] = str(other)
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(LineGuardError, match="one bundle holds one model"):
        build_bundle(workspace["artifact"], workspace["stations"], "1", tmp_path / "x.tar.gz")


def test_build_refuses_a_prompt_that_does_not_match_its_sha256(workspace, tmp_path):
    cfg_path = workspace["stations"] / "st1.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["prompt"]["sha256"] = "0" * 64
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        LineGuardError, match=r"src/stations/st1\.yaml:\d+: prompt\.sha256: .*config says 0{64}"
    ):
        build_bundle(workspace["artifact"], workspace["stations"], "1", tmp_path / "x.tar.gz")


@pytest.mark.parametrize("version", ["../x", "a/b", "", ".hidden", "x" * 65])
def test_unsafe_versions_are_refused(workspace, tmp_path, version):
    with pytest.raises(LineGuardError, match="bundle version"):
        build_bundle(workspace["artifact"], workspace["stations"], version, tmp_path / "x.tgz")


def test_site_listing_a_station_outside_the_bundle_is_refused(workspace, tmp_path):
    site = tmp_path / "site.yaml"
    extra = tmp_path / "extra.yaml"
    extra.write_text((workspace["stations"] / "st1.yaml").read_text())
    site.write_text(yaml.safe_dump({"edge_id": "e1", "stations": [str(extra)]}))
    with pytest.raises(LineGuardError, match="not among the bundled --stations"):
        build_bundle(
            workspace["artifact"], workspace["stations"], "1", tmp_path / "b.tgz", site=site
        )


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        ("site", ("outbox", "path"), "outbox.sqlite", "read-only release"),
        ("site", ("audit_log",), "../audit.jsonl", "read-only release"),
        ("station", ("evidence", "save_dir"), "evidence", "read-only release"),
        ("site", ("broker", "tls", "ca"), "ca.pem", "absolute path on the edge PC"),
    ],
)
def test_paths_the_release_cannot_hold_are_refused(workspace, tmp_path, where, key, value, message):
    path = workspace["site"] if where == "site" else workspace["stations"] / "st1.yaml"
    data = yaml.safe_load(path.read_text())
    if key[0] == "broker":
        data["broker"] = {"host": "localhost"}
    node = data
    for k in key[:-1]:
        node = node.setdefault(k, {})
    node[key[-1]] = value
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(LineGuardError, match=message):
        build_bundle(
            workspace["artifact"],
            workspace["stations"],
            "1",
            tmp_path / "b.tgz",
            site=workspace["site"],
        )


def test_invalid_station_config_is_refused_with_file_and_line(workspace, tmp_path):
    path = workspace["stations"] / "st2.yaml"
    path.write_text(path.read_text() + "treshold: 3\n")
    with pytest.raises(LineGuardError, match=r"stations/st2\.yaml:\d+: treshold"):
        build_bundle(
            workspace["artifact"],
            workspace["stations"],
            "1",
            tmp_path / "b.tgz",
            site=workspace["site"],
        )
