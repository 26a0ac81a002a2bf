"""Issue 14, finding 9: `validate-config` passed but `run` failed for an unset `password_env`, a
prompt image that is not an image and an outbox path that is a directory; `run` created
`state/` before failing. Now validate-config checks what run needs, without touching the disk,
and run writes nothing before everything it needs is in place."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lineguard.runtime.cli import main

STATION = """\
station_id: s1
line_id: line1
model: model
camera: {kind: folder, path: frames}
prompt: {image: golden.png}
"""


@pytest.fixture
def site(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")  # exists; not a loadable artifact
    (tmp_path / "frames").mkdir()
    cv2.imwrite(str(tmp_path / "golden.png"), np.full((8, 8, 3), 100, np.uint8))
    (tmp_path / "s1.yaml").write_text(STATION)
    (tmp_path / "site.yaml").write_text("edge_id: e1\nstations: [s1.yaml]\n")
    return tmp_path


def _cli(*argv: str) -> int:
    return main(list(argv))


def _break(site, how: str, monkeypatch) -> str:
    """Make the site invalid in one way; returns the text the error must contain."""
    if how == "password_env":
        monkeypatch.delenv("LG_TEST_UNSET_PW", raising=False)
        (site / "site.yaml").write_text(
            "edge_id: e1\nstations: [s1.yaml]\nbroker: {host: 127.0.0.1, port: 1, "
            "username: u, password_env: LG_TEST_UNSET_PW}\n"
        )
        return "LG_TEST_UNSET_PW is not set"
    if how == "prompt":
        (site / "golden.png").write_bytes(b"\x89PNG not really")
        return "not an image OpenCV can decode"
    if how == "outbox_dir":
        (site / "box").mkdir()
        (site / "site.yaml").write_text("edge_id: e1\nstations: [s1.yaml]\noutbox: {path: box}\n")
        return "is a directory"
    if how == "audit_parent_file":
        (site / "afile").write_text("x")
        (site / "site.yaml").write_text("edge_id: e1\nstations: [s1.yaml]\naudit_log: afile/a\n")
        return "is not a directory"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["password_env", "prompt", "outbox_dir", "audit_parent_file"])
def test_validate_config_catches_what_run_would_fail_on(site, how, monkeypatch, capsys):
    assert _cli("validate-config", str(site / "site.yaml")) == 0
    capsys.readouterr()
    needle = _break(site, how, monkeypatch)
    assert _cli("validate-config", str(site / "site.yaml")) == 1
    assert needle in capsys.readouterr().err
    assert _cli("run", "--site", str(site / "site.yaml")) == 1
    assert needle in capsys.readouterr().err
    assert not (site / "state").exists()


def test_no_file_checks_says_what_it_did_not_check(site, monkeypatch, capsys):
    _break(site, "password_env", monkeypatch)
    assert _cli("validate-config", "--no-file-checks", str(site / "site.yaml")) == 0
    assert "not checked (--no-file-checks)" in capsys.readouterr().out


def test_run_failing_at_start_leaves_no_state_folder(site, capsys):
    """The model cannot be loaded (model.json is not an artifact): nothing written to disk."""
    assert _cli("validate-config", str(site / "site.yaml")) == 0
    assert _cli("run", "--site", str(site / "site.yaml")) != 0
    assert not (site / "state").exists()
