"""Issue 14, finding 12: `make test` stayed green when mosquitto was missing (broker tests skip).
Under CI=true a skipped broker or Ansible test now fails the run; other skips stay skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

INNER = """
import pytest

@pytest.fixture
def mosquitto():
    pytest.skip("mosquitto is not installed (apt-get install mosquitto)")

def test_broker(mosquitto):
    pass

@pytest.mark.skipif(True, reason="ansible-playbook not installed")
def test_ansible():
    pass

@pytest.mark.skip(reason="needs a GPU")
def test_other():
    pass
"""


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text("from ci_skips import pytest_runtest_makereport\n")
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("ci", ["true", "1"])
def test_in_ci_broker_and_ansible_skips_fail(tmp_path, ci):
    result = _run(tmp_path, ci)
    assert result.returncode != 0, result.stdout
    assert "must run in CI" in result.stdout
    assert "1 skipped" in result.stdout  # the GPU test still just skips
    assert "2 error" in result.stdout or "2 failed" in result.stdout, result.stdout


def test_outside_ci_they_only_skip(tmp_path):
    result = _run(tmp_path, None)
    assert result.returncode == 0, result.stdout
    assert "3 skipped" in result.stdout
