"""Which calibration images the model trained on (no numpy, no torch: runs on the edge PC).

A model scores the images it trained on lower than new parts of the same kind, so a threshold
fitted on them alarms too often on the line (on piped one station reached 18.75 % for a 1 %
target). Training records a short key of every image FILE it trained on (the first
`KEY_DIGITS` hex digits of its sha256; validation images, never trained on, are not listed),
export carries them in `model.json` (`trained_file_keys`), and `lineguard calibrate --folder`
counts the folder's files among them and says so. Camera frames are new captures and never
match; a re-encoded copy of a training image is not recognised (its bytes differ), nor a whole
frame whose tiles a tiled model trained on (the tiles are files of their own).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lineguard.runtime.artifact import sha256_file

KEY_DIGITS = 16  # 64 bits: collisions among a plant's images are out of the question


def file_key(path: str | Path) -> str:
    """The key of one file: the first `KEY_DIGITS` hex digits of the sha256 of its bytes."""
    return sha256_file(Path(path))[:KEY_DIGITS]


def keys_of(sha256_hex: Iterable[str]) -> list[str]:
    """Sorted unique keys from full sha256 hex digests (what training stores)."""
    return sorted({h[:KEY_DIGITS] for h in sha256_hex})


def trained_on(files: Iterable[Path], trained_keys: Iterable[str]) -> dict[str, Any]:
    """How many of `files` the model trained on; `checked` is False when the artifact lists no
    training files (exported before they were recorded, or trained from arrays)."""
    known = set(trained_keys)
    files = list(files)
    if not known:
        return {"checked": False, "frames": None, "of": len(files), "names": []}
    hits = [f.name for f in files if file_key(f) in known]
    return {"checked": True, "frames": len(hits), "of": len(files), "names": hits[:20]}


def warning(found: dict[str, Any]) -> str | None:
    """The report's warning for :func:`trained_on`'s result, or None when there is nothing to
    say."""
    if not found["checked"]:
        return (
            "cannot tell whether the model trained on these images (the artifact lists no "
            "training files): calibrate on parts it never saw"
        )
    if found["frames"]:
        return (
            f"{found['frames']} of {found['of']} frames are images this model TRAINED ON: their "
            "scores run low, so the proposed threshold will alarm too often on new parts; "
            "calibrate on frames of parts it never saw (e.g. --frames from the station's camera)"
        )
    return None
