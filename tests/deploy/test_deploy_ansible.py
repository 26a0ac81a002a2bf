"""The rollout playbook with Debian's ansible-playbook against localhost (local connection):
batches of one host, a signed bundle, and a stop at the first failed health gate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_testkit import LINEGUARD, history

from lineguard.deploy.signing import generate_keypair

PLAYBOOK = Path(__file__).resolve().parents[2] / "deploy" / "ansible" / "rollout.yml"
ANSIBLE = shutil.which("ansible-playbook")

pytestmark = pytest.mark.skipif(ANSIBLE is None, reason="ansible-playbook not installed")


def _inventory(path: Path, roots: dict[str, Path], failing: str | None = None) -> Path:
    hosts = {}
    for name, root in roots.items():
        hosts[name] = {"lineguard_root": str(root)}
        if name == failing:  # this edge's live health check fails after the switch
            hosts[name]["lineguard_health_cmd"] = "echo camera not ready >&2; exit 1"
    inv = {
        "all": {
            "children": {
                "lineguard_edges": {
                    "vars": {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                    },
                    "hosts": hosts,
                }
            }
        }
    }
    path.write_text(yaml.safe_dump(inv))
    return path


def _play(tmp: Path, inventory: Path, bundle: Path, pubkey: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-remote"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_STDOUT_CALLBACK": "default",
    }
    extra = {
        "lineguard_bundle": str(bundle),
        "lineguard_pubkey": str(pubkey),
        "lineguard_bin": LINEGUARD,
        "lineguard_health_timeout": 30,
    }
    return subprocess.run(
        [ANSIBLE, "-i", str(inventory), str(PLAYBOOK), "-e", json.dumps(extra)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
        env=env,
    )


def _current(root: Path) -> str | None:
    return os.readlink(root / "current") if (root / "current").is_symlink() else None


def test_playbook_rolls_out_and_stops_at_first_failed_gate(make_bundle, tmp_path):
    key, pub = generate_keypair(tmp_path / "keys" / "signing.key")
    roots = {f"edge{i}": tmp_path / f"edge{i}" for i in (1, 2, 3)}

    # 1) every edge gets release 1, one host per batch
    r = _play(tmp_path, _inventory(tmp_path / "inv1.yml", roots), make_bundle("1", sign=key), pub)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    for root in roots.values():
        assert _current(root) == "releases/1"
        assert (root / "current" / "site.yaml").is_file()
        assert (root / "bundle-signing.pub").is_file()
        assert not list((root / "incoming").iterdir())  # copied bundle removed after install
        st = subprocess.run(
            [LINEGUARD, "deploy", "status", "--root", str(root), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(st.stdout)["current"] == "1"

    # 2) release 2: edge1 takes it, edge2's gate fails and rolls back, edge3 is never touched
    inv = _inventory(tmp_path / "inv2.yml", roots, failing="edge2")
    r = _play(tmp_path, inv, make_bundle("2", sign=key), pub)
    assert r.returncode != 0
    assert "camera not ready" in r.stdout + r.stderr
    assert _current(roots["edge1"]) == "releases/2"
    assert _current(roots["edge2"]) == "releases/1"
    assert not (roots["edge2"] / "releases" / "2").exists()
    assert _current(roots["edge3"]) == "releases/1"
    assert [h.get("version") for h in history(roots["edge3"])] == ["1"]
    assert not (roots["edge3"] / "incoming" / "lineguard-2.tar.gz").exists()
