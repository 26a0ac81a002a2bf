"""Applying calibrated thresholds to a station file (comments kept, versioned backups, refused
bad values, rollback through the backups) and the live-rollback stack read from the audit log."""

from __future__ import annotations

from pathlib import Path

import pytest

from lineguard.runtime.audit import AuditLog
from lineguard.runtime.calibration.apply import (
    list_backups,
    live_rollback_target,
    rollback_config,
    write_thresholds,
)
from lineguard.runtime.config_loader import load_station
from lineguard.runtime.errors import LineGuardError

BLOCK = """# station comment
station_id: s1
line_id: line1   # trailing comment
model: model
camera:
  kind: folder
  path: frames
prompt:
  image: golden.png
thresholds:
  # thresholds tuned on 2026-01-01
  image: 1.25    # image
  min_area_px: 12
debounce: {consecutive: 2}
"""


@pytest.mark.parametrize(
    "text",
    [
        BLOCK,
        BLOCK.replace(
            "thresholds:\n  # thresholds tuned on 2026-01-01\n  image: 1.25    # image\n"
            "  min_area_px: 12\n",
            "thresholds: {image: 1.25, min_area_px: 12}  # flow\n",
        ),
        BLOCK.replace(
            "thresholds:\n  # thresholds tuned on 2026-01-01\n  image: 1.25    # image\n"
            "  min_area_px: 12\n",
            "",
        ),
        BLOCK.replace(
            "  min_area_px: 12\ndebounce: {consecutive: 2}\n", "  min_area_px: 12"
        ),  # thresholds last, no final newline
    ],
    ids=["block", "flow", "absent", "last-no-newline"],
)
def test_write_thresholds_keeps_comments_and_versioned_backups(tmp_path, text):
    path = tmp_path / "s1.yaml"
    path.write_text(text)
    change = write_thresholds(path, {"image": 0.8123, "pixel": 0.61})
    new_text = path.read_text()
    cfg = load_station(path, check_files=False)
    assert (cfg.thresholds.image, cfg.thresholds.pixel) == (0.8123, 0.61)
    assert change.new["image"] == 0.8123 and change.comments_kept
    for line in text.splitlines():
        if "#" in line and "image: 1.25" not in line:
            assert line in new_text  # every comment line survives
    assert cfg.debounce.consecutive == 2 or "debounce" not in text
    if "min_area_px: 12" in text:
        assert cfg.thresholds.min_area_px == 12
    assert change.backup == tmp_path / "s1.yaml.bak.1" and change.backup.read_text() == text
    write_thresholds(path, {"image": 0.9})
    assert list_backups(path) == [tmp_path / "s1.yaml.bak.1", tmp_path / "s1.yaml.bak.2"]
    assert load_station(path, check_files=False).thresholds.pixel == 0.61


def test_rollback_walks_back_through_the_backups(tmp_path):
    path = tmp_path / "s1.yaml"
    path.write_text(BLOCK)
    write_thresholds(path, {"image": 0.8})
    second = path.read_text()
    write_thresholds(path, {"image": 0.7})
    change = rollback_config(path)
    assert change.old["image"] == 0.7 and change.new["image"] == 0.8
    assert path.read_text() == second
    rollback_config(path)
    assert path.read_text() == BLOCK  # byte for byte
    assert len(list(tmp_path.glob("s1.yaml.undone.*"))) == 2  # nothing lost
    with pytest.raises(LineGuardError, match="no backup"):
        rollback_config(path)


def test_a_bad_value_never_reaches_the_file(tmp_path):
    path = tmp_path / "s1.yaml"
    path.write_text(BLOCK)
    with pytest.raises(LineGuardError):
        write_thresholds(path, {"min_area_px": 0})  # the loader refuses min_area_px < 1
    with pytest.raises(LineGuardError):
        write_thresholds(path, {"image": float("nan")})
    assert path.read_text() == BLOCK and not list_backups(path)


def test_live_rollback_target_is_a_stack_over_the_runtime_audit_entries(tmp_path):
    cfg = load_station(_station_file(tmp_path), check_files=False)
    audit = AuditLog(tmp_path / "audit.jsonl")

    def live(old, new, rid):
        audit.append(
            station="s1",
            line="line1",
            by="x",
            reason="r",
            old={"active": {"image": old, "pixel": 1.0, "min_area_px": 4}, "shadow": None},
            new={"active": {"image": new, "pixel": 1.0, "min_area_px": 4}, "shadow": None},
            request_id=rid,
        )

    with pytest.raises(LineGuardError, match="no live threshold change"):
        live_rollback_target(audit, cfg)
    live(1.0, 2.0, "a")
    live(2.0, 3.0, "b")
    assert live_rollback_target(audit, cfg)[1]["image"] == 2.0
    live(3.0, 2.0, "rollback:1")
    assert live_rollback_target(audit, cfg)[1]["image"] == 1.0
    audit.append(
        station="s1",
        line="line1",
        by="x",
        reason="r",
        old=None,
        new=None,
        action="threshold/shadow",
    )
    assert live_rollback_target(audit, cfg)[1]["image"] == 1.0


def _station_file(tmp_path: Path) -> Path:
    path = tmp_path / "s1.yaml"
    path.write_text(BLOCK)
    return path
