"""The systemd unit: rendered for a root, hardened, and accepted by `systemd-analyze verify`."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_testkit import LINEGUARD, cli

from lineguard.deploy.service import UNIT_TEMPLATE, render_unit

ANALYZE = shutil.which("systemd-analyze")


def _service_section(text: str) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    return dict(parser["Service"])


def test_unit_runs_current_release_hardened(tmp_path):
    root = tmp_path / "lg"
    text = render_unit(root, bin_path=LINEGUARD, user="lineguard")
    assert "{{" not in text
    svc = _service_section(text)
    assert svc["ExecStart"] == f"{LINEGUARD} run --site {root}/current/site.yaml"
    assert svc["Restart"] == "on-failure"
    assert svc["User"] == "lineguard"
    assert svc["ProtectSystem"] == "strict"
    assert svc["PrivateTmp"] == "yes"
    assert svc["NoNewPrivileges"] == "yes"
    # only the state dir is writable; releases stay read-only to the runtime
    assert svc["ReadWritePaths"] == f"{root}/state"


def test_cli_renders_the_unit(tmp_path):
    out = tmp_path / "lineguard.service"
    r = cli("deploy", "unit", "--root", str(tmp_path / "lg"), "--user", "edge", "--out", str(out))
    assert r.returncode == 0, r.stderr
    svc = _service_section(out.read_text())
    assert svc["User"] == "edge" and svc["Group"] == "edge"


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt package systemd)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    root = tmp_path / "lg"
    (root / "state").mkdir(parents=True)
    unit = tmp_path / "lineguard.service"
    unit.write_text(render_unit(root, bin_path=LINEGUARD))
    r = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify warns about unknown keys and bad values on stderr, and fails on a missing binary
    problems = [ln for ln in r.stderr.splitlines() if unit.name in ln or "Unknown" in ln]
    assert r.returncode == 0 and not problems, r.stderr
    # and the hardening is real: systemd's own exposure score (0 best .. 10 worst) stays low
    r = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--threshold=30", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt package systemd)")
def test_systemd_analyze_catches_a_broken_unit(tmp_path):
    """The check above can fail: a typo in a key is reported."""
    unit = tmp_path / "broken.service"
    text = render_unit(tmp_path, bin_path=LINEGUARD).replace("ProtectSystem=", "ProtectSytem=")
    unit.write_text(text)
    r = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in r.stderr


def test_template_is_packaged_next_to_the_code():
    assert Path(__file__).resolve().parents[2] / "deploy/systemd/lineguard.service" == UNIT_TEMPLATE
