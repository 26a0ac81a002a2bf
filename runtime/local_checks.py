"""Checks of this machine that `lineguard run` would otherwise only discover by failing:
a file it must create or write, an image it must decode. Used by the config models (so
`validate-config` reports them with file, line and key) and by `calibrate` for the audit log.
"""

from __future__ import annotations

import os
from pathlib import Path


def writable_file_problem(path: Path) -> str | None:
    """Why `lineguard run` could not create or write the file `path` (None = it can)."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory, not a file"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path}: cannot create it, {parent} is not writable"
    return None


def image_problem(path: Path) -> str | None:
    """Why OpenCV cannot decode the image file `path` (None = it can, or OpenCV is missing)."""
    try:
        from lineguard.camera import read_image
    except ImportError:  # a build machine without OpenCV: `run` checks again
        return None
    image, why = read_image(str(path))
    return None if image is not None else f"{path}: {why}"


def golden_tile_count(model_dir: Path, prompt: Path, roi, tiling) -> int | None:
    """Tiles of the golden sample's grid under `tiling` (the grid per-tile prompts and rulers
    are cut on), or None when the model card or the image cannot be read (checked elsewhere)."""
    import json

    try:
        from lineguard.camera import read_image
        from lineguard.runtime.regions import roi_pixels
        from lineguard.runtime.tiling import make_grid
    except ImportError:  # a build machine without OpenCV: `run` checks again
        return None
    try:
        size = json.loads((Path(model_dir) / "model.json").read_text())["input_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    image, _ = read_image(str(prompt))
    if image is None:
        return None
    _, _, w, h = roi_pixels(roi, image.shape[1], image.shape[0])
    return make_grid(w, h, int(size[0]), tiling.scale, tiling.overlap).n
