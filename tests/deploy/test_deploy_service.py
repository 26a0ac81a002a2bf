"""`--service`: restart through systemctl and watch the unit stay up.

Containers running the tests have no systemd as PID 1, so a small `systemctl` stand-in on PATH
plays the unit: it runs the release `current` points at, and crash-loops (NRestarts climbing)
when that release is the one marked bad. What is tested is deploy's own logic: it restarts,
notices the crash loop, rolls back, and restarts again on the previous release.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lineguard.deploy.health import HealthError
from lineguard.deploy.install import Options, install

SHIM = r"""#!{python}
import json, os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SYSTEMD"])
root = Path(os.environ["FAKE_ROOT"])
args = sys.argv[1:]
log = state / "calls.log"
version = os.path.basename(os.readlink(root / "current")) if (root / "current").is_symlink() else ""
bad = (state / "bad").read_text().split() if (state / "bad").exists() else []
if args[0] == "restart":
    with open(log, "a") as f:
        f.write(f"restart {{args[1]}} {{version}}\n")
    (state / "restarts").write_text("0")
    sys.exit(0)
if args[0] == "show":
    n = int((state / "restarts").read_text()) if (state / "restarts").exists() else 0
    if version in bad:  # Restart=on-failure keeps bringing it back: active, but NRestarts climbs
        n += 1
        (state / "restarts").write_text(str(n))
    print(f"ActiveState=active\nNRestarts={{n}}\nResult=success")
    sys.exit(0)
sys.exit(1)
"""


@pytest.fixture
def fake_systemctl(tmp_path, monkeypatch):
    bindir, state, root = tmp_path / "bin", tmp_path / "systemd", tmp_path / "root"
    bindir.mkdir()
    state.mkdir()
    shim = bindir / "systemctl"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SYSTEMD", str(state))
    monkeypatch.setenv("FAKE_ROOT", str(root))
    return state, root


def test_crash_looping_service_is_rolled_back_and_restarted(make_bundle, fake_systemctl):
    state, root = fake_systemctl
    opts = Options(inference=False, service="lineguard.service", health_timeout=1.0)
    install(make_bundle("1"), root, opts)
    (state / "bad").write_text("2")
    with pytest.raises(HealthError, match=r"did not stay up.*rolled back to 1"):
        install(make_bundle("2"), root, opts)
    assert os.readlink(root / "current") == "releases/1"
    calls = (state / "calls.log").read_text().splitlines()
    assert calls == [
        "restart lineguard.service 1",
        "restart lineguard.service 2",
        "restart lineguard.service 1",  # back on the previous release
    ]


def test_missing_systemctl_fails_the_gate(make_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(HealthError, match="systemctl is not available"):
        install(
            make_bundle("1"),
            tmp_path / "root",
            Options(inference=False, service="lineguard.service"),
        )
    assert not Path(tmp_path / "root" / "current").exists()
