"""The systemd side: render the unit template and restart/check a managed service.

The unit in `deploy/systemd/lineguard.service` uses `{{ name }}` placeholders so the same file
serves Ansible's `template` module and `lineguard deploy unit` (which substitutes them here).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lineguard.deploy.health import HealthError
from lineguard.runtime.errors import LineGuardError

UNIT_TEMPLATE = Path(__file__).parent / "systemd" / "lineguard.service"
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


def default_bin() -> str:
    """The `lineguard` script next to the running interpreter (a venv's bin/), else PATH's."""
    here = Path(sys.executable).parent / "lineguard"
    return str(here) if here.exists() else (shutil.which("lineguard") or "/usr/local/bin/lineguard")


def render_unit(
    root: str | Path, bin_path: str | None = None, user: str = "lineguard", group: str | None = None
) -> str:
    values = {
        "lineguard_root": str(Path(root).absolute()),
        "lineguard_bin": bin_path or default_bin(),
        "lineguard_user": user,
        "lineguard_group": group or user,
    }

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise LineGuardError(f"{UNIT_TEMPLATE}: unknown placeholder {m.group(0)}")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(sub, UNIT_TEMPLATE.read_text())


def _systemctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = shutil.which("systemctl")
    if exe is None:
        raise HealthError("--service was given but systemctl is not available on this machine")
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise HealthError(f"systemctl {' '.join(args)} timed out after {timeout:g}s") from exc


def _show(name: str) -> dict[str, str]:
    out = _systemctl("show", "-p", "ActiveState", "-p", "NRestarts", "-p", "Result", name).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def restart_service(name: str, timeout: float, settle: float = 5.0) -> None:
    """Restart `name` and require it to reach `active` and stay there without auto-restarts.

    `Restart=on-failure` hides a crash-looping service behind short `active` windows, so the
    gate also watches NRestarts across a settle period.
    """
    proc = _systemctl("restart", name, timeout=timeout)
    if proc.returncode != 0:
        raise HealthError(f"systemctl restart {name} failed: {proc.stderr.strip()}")
    deadline = time.monotonic() + timeout
    state = _show(name)
    while state.get("ActiveState") != "active":
        if time.monotonic() > deadline or state.get("ActiveState") == "failed":
            raise HealthError(
                f"service {name} is {state.get('ActiveState')} "
                f"({state.get('Result')}) after restart"
            )
        time.sleep(0.5)
        state = _show(name)
    restarts = state.get("NRestarts")
    end = time.monotonic() + min(settle, max(timeout, 0.0))
    while time.monotonic() < end:
        time.sleep(0.5)
        now = _show(name)
        if now.get("ActiveState") != "active" or now.get("NRestarts") != restarts:
            raise HealthError(
                f"service {name} did not stay up after restart "
                f"(state {now.get('ActiveState')}, restarts {now.get('NRestarts')})"
            )
