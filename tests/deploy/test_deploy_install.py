"""Install / activate / roll back / prune under a temporary deploy root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from deploy_testkit import LINEGUARD, cli, flip_one_byte, history, tree

from lineguard.deploy.build import stage_bundle
from lineguard.deploy.bundle import write_archive
from lineguard.deploy.health import HealthError
from lineguard.deploy.install import Options, install, rollback
from lineguard.deploy.lock import DeployLock
from lineguard.deploy.manifest import file_entry
from lineguard.deploy.releases import status
from lineguard.deploy.signing import generate_keypair
from lineguard.runtime.errors import LineGuardError

FAST = Options(inference=False, lock_timeout=30)


def _opts(**kw) -> Options:
    return Options(**{**FAST.__dict__, **kw})


def _current(root: Path) -> str:
    return os.readlink(root / "current")


def test_install_activates_and_reports(make_bundle, tmp_path):
    root = tmp_path / "root"
    res = install(make_bundle("1.0"), root, _opts())
    assert res.changed and res.version == "1.0" and res.previous is None
    assert _current(root) == "releases/1.0"
    assert (root / "current" / "stations" / "st1.yaml").is_file()
    assert (root / "current" / "manifest.json").is_file()
    assert (root / "state").is_dir()
    # the config the runtime will read resolves its prompt inside the release
    cfg = yaml.safe_load((root / "current/stations/st1.yaml").read_text())
    assert (root / "current/stations" / cfg["prompt"]["image"]).resolve().is_file()
    st = status(root)
    assert st["current"] == "1.0" and st["previous"] is None
    assert [r["version"] for r in st["releases"]] == ["1.0"]
    # installing the same content again (even rebuilt later) changes nothing
    time.sleep(1.1)
    again = install(make_bundle("1.0"), root, _opts())
    assert not again.changed


@pytest.mark.parametrize("fault", ["byte", "signature"])
def test_bad_bundle_changes_nothing(make_bundle, tmp_path, fault):
    key, pub = generate_keypair(tmp_path / "k")
    root = tmp_path / "root"
    install(make_bundle("1", sign=key), root, _opts(pubkey=pub))
    before = tree(root)
    if fault == "byte":
        bad = flip_one_byte(make_bundle("2", sign=key), tmp_path / "bad.tar.gz", 0.33)
    else:
        other, _ = generate_keypair(tmp_path / "other")
        bad = make_bundle("2", sign=other)
    r = cli(
        "deploy", "install", str(bad), "--root", str(root), "--pubkey", str(pub), "--no-inference"
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert tree(root) == before
    assert _current(root) == "releases/1"
    assert history(root)[-1]["ok"] is False


def test_failed_live_health_check_rolls_back(make_bundle, tmp_path):
    root = tmp_path / "root"
    install(make_bundle("1"), root, _opts())
    before = tree(root)
    marker = tmp_path / "saw"
    # the hook sees the new release active, then fails: deploy must switch back
    cmd = f'readlink "$LINEGUARD_ROOT/current" > {marker}; test "$LINEGUARD_VERSION" != 2'
    r = cli(
        "deploy",
        "install",
        str(make_bundle("2")),
        "--root",
        str(root),
        "--no-inference",
        "--health-cmd",
        cmd,
    )
    assert r.returncode == 3, r.stderr
    assert "rolled back to 1" in r.stderr
    assert marker.read_text().strip() == "releases/2"
    assert _current(root) == "releases/1"
    assert tree(root) == before  # the failed release is not left behind
    last = history(root)[-1]
    assert last["version"] == "2" and last["ok"] is False
    assert status(root)["current"] == "1"


def test_failed_first_install_leaves_no_current(make_bundle, tmp_path):
    root = tmp_path / "root"
    with pytest.raises(HealthError, match="rolled back to no release"):
        install(make_bundle("1"), root, _opts(health_cmd="exit 1"))
    assert not (root / "current").exists() and not (root / "current").is_symlink()
    assert not (root / "releases" / "1").exists()


def test_pre_switch_health_failure_never_touches_current(workspace, make_bundle, tmp_path):
    root = tmp_path / "root"
    install(make_bundle("1"), root, _opts())
    before = tree(root)
    # a bundle whose station config this runtime rejects (e.g. built for a newer schema);
    # made by hand because `bundle build` refuses it
    stage = tmp_path / "stage"
    stage.mkdir()
    manifest = stage_bundle(
        workspace["artifact"], workspace["stations"], "2", stage, workspace["site"]
    )
    cfg = stage / "stations/st1.yaml"
    cfg.write_text(cfg.read_text() + "future_option: 1\n")
    manifest.files["stations/st1.yaml"] = file_entry(cfg)
    bad = tmp_path / "bad.tar.gz"
    write_archive(stage, manifest, bad, None)
    with pytest.raises(HealthError, match=r"releases/2/stations/st1\.yaml:\d+: future_option"):
        install(bad, root, _opts())
    assert tree(root) == before
    assert not list((root / "releases").glob(".incoming-*"))


def test_rollback_status_and_keep(make_bundle, tmp_path):
    root = tmp_path / "root"
    for v in ("1", "2", "3"):
        install(make_bundle(v), root, _opts(keep=3))
    assert status(root)["previous"] == "2"
    res = rollback(root, _opts())
    assert res.version == "2" and res.previous == "3"
    assert _current(root) == "releases/2"
    st = status(root)
    assert st["current"] == "2" and st["previous"] == "3"
    # --to picks any installed release
    rollback(root, _opts(), to="1")
    assert status(root)["current"] == "1"
    with pytest.raises(LineGuardError, match="not installed"):
        rollback(root, _opts(), to="9")
    # keep=2: installing 4 keeps 4 (current) and 1 (the rollback target) only
    res = install(make_bundle("4"), root, _opts(keep=2))
    assert sorted(res.pruned) == ["2", "3"]
    assert sorted(p.name for p in (root / "releases").iterdir()) == ["1", "4"]
    # CLI forms
    r = cli("deploy", "status", "--root", str(root), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["current"] == "4"
    r = cli("deploy", "status", "--root", str(root))
    assert "* 4" in r.stdout and "previous 1" in r.stdout
    r = cli("deploy", "rollback", "--root", str(root), "--no-inference")
    assert r.returncode == 0, r.stderr
    assert status(root)["current"] == "1"


def test_rollback_refuses_a_modified_release(make_bundle, tmp_path):
    root = tmp_path / "root"
    install(make_bundle("1"), root, _opts())
    install(make_bundle("2"), root, _opts())
    (root / "releases/1/model/detector.onnx").write_bytes(b"changed on disk")
    with pytest.raises(HealthError, match="modified after install"):
        rollback(root, _opts())
    assert _current(root) == "releases/2"


def test_same_version_with_other_content_is_refused(workspace, make_bundle, tmp_path):
    root = tmp_path / "root"
    install(make_bundle("1"), root, _opts())
    (workspace["stations"] / "st1.yaml").write_text(
        (workspace["stations"] / "st1.yaml").read_text().replace("line1", "line9")
    )
    with pytest.raises(LineGuardError, match="already installed with different content"):
        install(make_bundle("1"), root, _opts())


def test_second_install_fails_clearly_while_locked(make_bundle, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    bundle = make_bundle("1")
    with DeployLock(root):
        r = cli(
            "deploy",
            "install",
            str(bundle),
            "--root",
            str(root),
            "--no-inference",
            "--lock-timeout",
            "0",
        )
    assert r.returncode == 75
    assert "another deploy is running" in r.stderr and f"pid {os.getpid()}" in r.stderr
    assert not (root / "current").exists()


def test_concurrent_installs_are_serialised(make_bundle, tmp_path):
    root = tmp_path / "root"
    log = tmp_path / "intervals.log"
    # each install's live check logs start/end around a pause: overlapping installs would interleave
    hook = (
        f'echo "start $LINEGUARD_VERSION" >> {log}; sleep 1; echo "end $LINEGUARD_VERSION" >> {log}'
    )
    procs = [
        subprocess.Popen(
            [
                LINEGUARD,
                "deploy",
                "install",
                str(make_bundle(v)),
                "--root",
                str(root),
                "--no-inference",
                "--health-cmd",
                hook,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in ("a", "b")
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = log.read_text().split()
    events = list(zip(lines[::2], lines[1::2], strict=True))
    assert len(events) == 4
    first, second = events[0][1], events[2][1]
    assert events == [("start", first), ("end", first), ("start", second), ("end", second)]
    assert {first, second} == {"a", "b"}
    assert _current(root) == f"releases/{second}"
    assert status(root)["previous"] == first


def test_json_output_for_automation(make_bundle, tmp_path):
    root = tmp_path / "root"
    r = cli(
        "deploy", "install", str(make_bundle("7")), "--root", str(root), "--no-inference", "--json"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["changed"] is True and out["version"] == "7"
    r = cli(
        "deploy", "install", str(make_bundle("7")), "--root", str(root), "--no-inference", "--json"
    )
    assert json.loads(r.stdout)["changed"] is False


def test_deploy_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import lineguard.deploy.cli, lineguard.deploy.install, lineguard.deploy.build\n"
        "import lineguard.deploy.health, lineguard.deploy.mqtt_state, lineguard.deploy.service\n"
        "bad = [m for m in ('torch', 'timm', 'sklearn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_key_pinned_in_the_root_makes_signatures_mandatory(make_bundle, tmp_path):
    key, pub = generate_keypair(tmp_path / "k")
    root = tmp_path / "root"
    root.mkdir()
    (root / "bundle-signing.pub").write_bytes(pub.read_bytes())
    with pytest.raises(LineGuardError, match="not signed"):
        install(make_bundle("1"), root, _opts())  # no --pubkey given, still checked
    assert not (root / "current").exists()
    res = install(make_bundle("2", sign=key), root, _opts())
    assert res.version == "2"


def test_force_reinstalls_a_damaged_inactive_release(make_bundle, tmp_path):
    root = tmp_path / "root"
    install(make_bundle("1"), root, _opts())
    install(make_bundle("2"), root, _opts())
    (root / "releases/1/site.yaml").write_text("tampered: true\n")
    with pytest.raises(HealthError, match="modified after install"):
        install(make_bundle("1"), root, _opts())
    assert _current(root) == "releases/2"
    res = install(make_bundle("1"), root, _opts(force=True))
    assert res.changed and _current(root) == "releases/1"
    assert "tampered" not in (root / "current/site.yaml").read_text()
