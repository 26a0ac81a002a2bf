"""Reading anomaly-detection datasets: the MVTec layout and plain folders of station captures.

Everything downstream (training, validation-based calibration, evaluation, packing) works on a
flat list of `Sample` records, so several datasets and categories can feed ONE model. Images are
read with OpenCV, made RGB 3-channel and resized with `cv2.INTER_AREA` — the same rule the edge
runtime applies (`model.json: resize = "cv2-area"`), so train and edge see identical pixels.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from lineguard.runtime.errors import LineGuardError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
)
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset with the metadata training and evaluation need."""

    path: Path
    category: str
    split: Literal["train", "test"]
    label: int  # 0 normal, 1 defective (= lies in a defect folder)
    defect: str  # "good" for normal images
    mask_path: Path | None
    rel_path: str  # relative to the dataset root, as `filename` in the dataset's test.json
    dataset: str


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in it if is_image(p)), key=lambda p: p.as_posix())


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    """MVTec names masks `<stem>_mask.png`; accept any image extension and a bare `<stem>.*`."""
    if not gt_dir.is_dir():
        return None
    for name in (f"{stem}_mask", stem):
        for cand in sorted(gt_dir.glob(f"{name}.*")):
            if is_image(cand):
                return cand
    return None


def _scan_category(cat_dir: Path, dataset_root: Path, dataset: str) -> list[Sample]:
    category = cat_dir.name
    out: list[Sample] = []
    good_dir = cat_dir / "train" / GOOD
    if good_dir.is_dir():
        for p in _images_in(good_dir):
            rel = p.relative_to(dataset_root).as_posix()
            out.append(Sample(p, category, "train", 0, GOOD, None, rel, dataset))
    test_dir = cat_dir / "test"
    missing: list[str] = []
    if test_dir.is_dir():
        for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
            defect = defect_dir.name
            for p in _images_in(defect_dir):
                rel = p.relative_to(dataset_root).as_posix()
                if defect == GOOD:
                    out.append(Sample(p, category, "test", 0, GOOD, None, rel, dataset))
                    continue
                mask = _find_mask(cat_dir / "ground_truth" / defect, p.stem)
                if mask is None:
                    missing.append(rel)
                out.append(Sample(p, category, "test", 1, defect, mask, rel, dataset))
    if missing:
        raise LineGuardError(
            f"{cat_dir}: {len(missing)} defective test image(s) have no mask under "
            f"ground_truth/<defect>/<stem>_mask.png, e.g. {missing[0]}"
        )
    if not any(s.split == "train" for s in out):
        raise LineGuardError(f"{cat_dir}: no training images in {good_dir}")
    return out


def scan_mvtec(
    root: str | Path | Sequence[str | Path], categories: Iterable[str] | None = None
) -> list[Sample]:
    """Scan one or more MVTec-layout roots into one sorted sample list.

    `root` is a dataset folder holding `<category>/train/good`, ..., or a single category folder,
    or a list of either. `categories` restricts the scan (names must exist in some root).
    """
    roots = [Path(root)] if isinstance(root, str | Path) else [Path(r) for r in root]
    if not roots:
        raise LineGuardError("no dataset root given")
    wanted = set(categories) if categories else None
    samples: list[Sample] = []
    found: set[str] = set()
    for r in roots:
        if not r.is_dir():
            raise LineGuardError(f"dataset root {r} does not exist or is not a folder")
        r = r.resolve()
        if _is_category(r):  # a single category folder
            cat_dirs, dataset_root = [r], r.parent
        else:
            cat_dirs = sorted(d for d in r.iterdir() if d.is_dir() and _is_category(d))
            dataset_root = r
            if not cat_dirs:
                raise LineGuardError(
                    f"{r}: no category folders (expected <category>/train/good and "
                    "<category>/test/<defect>, the MVTec AD layout)"
                )
        for cat_dir in cat_dirs:
            if wanted is not None and cat_dir.name not in wanted:
                continue
            found.add(cat_dir.name)
            samples.extend(_scan_category(cat_dir, dataset_root, dataset_root.name))
    if wanted is not None and wanted - found:
        raise LineGuardError(
            f"categories not found in {', '.join(map(str, roots))}: "
            f"{', '.join(sorted(wanted - found))}"
        )
    return sorted(samples, key=_sort_key)


def scan_folder(path: str | Path, category: str) -> list[Sample]:
    """A plain folder (searched recursively) of NORMAL captures from a station, as training data."""
    folder = Path(path)
    if not folder.is_dir():
        raise LineGuardError(f"image folder {folder} does not exist or is not a folder")
    folder = folder.resolve()
    images = _images_in(folder, recursive=True)
    if not images:
        raise LineGuardError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    return [
        Sample(p, category, "train", 0, GOOD, None, p.relative_to(folder).as_posix(), folder.name)
        for p in images
    ]


def _sort_key(s: Sample) -> tuple[str, str, str, str]:
    return (s.dataset, s.category, s.split, s.rel_path)


def validation_count(n: int, fraction: float, minimum: int = 8) -> int:
    """Validation images for a class of ``n``: max(fraction·n, minimum), at most half the class.

    Three images per class (10 % of 30) cannot rank checkpoints or set a threshold; eight can
    start to. A small class keeps at least half of its images for training, and one in any case.
    """
    if fraction <= 0 or n < 2:
        return 0
    n_val = max(round(n * fraction), min(minimum, n // 2), 1)
    return min(n_val, n - 1)


def split_validation(
    samples: Sequence[Sample], fraction: float = 0.1, seed: int = 0, minimum: int = 8
) -> tuple[list[Sample], list[Sample]]:
    """Carve a NORMAL validation set from each category's training images.

    Validation images calibrate score normalisation, map fusion and thresholds and drive
    checkpoint selection, so test images never have to. Per category
    :func:`validation_count` images; the draw depends only on (seed, category, its file list):
    adding a category does not change another's split, and the same seed gives the same split.
    Test samples are dropped.
    """
    if not 0.0 <= fraction < 1.0:
        raise LineGuardError(f"validation fraction must be in [0, 1), got {fraction}")
    by_cat: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        if s.split == "train":
            by_cat[(s.dataset, s.category)].append(s)
    train: list[Sample] = []
    val: list[Sample] = []
    for (dataset, category), items in sorted(by_cat.items()):
        items = sorted(items, key=_sort_key)
        n_val = validation_count(len(items), fraction, minimum)
        rng = np.random.default_rng([seed, zlib.crc32(f"{dataset}/{category}".encode())])
        chosen = set(rng.permutation(len(items))[:n_val].tolist())
        for i, s in enumerate(items):
            (val if i in chosen else train).append(s)
    return train, val


def _imread(path: Path, flags: int) -> np.ndarray:
    # imdecode of the raw bytes also works for non-ASCII paths, where cv2.imread fails silently
    try:
        buf = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise LineGuardError(f"cannot read image {path}: {exc}") from exc
    img = cv2.imdecode(buf, flags) if buf.size else None
    if img is None:
        raise LineGuardError(f"cannot decode image {path} (corrupt or not an image)")
    return img


def to_rgb_u8(img: np.ndarray) -> np.ndarray:
    """Any decoded image (gray, BGR, BGRA, 16-bit) to RGB uint8 H×W×3."""
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    """Square resize with the edge runtime's rule (cv2 INTER_AREA)."""
    if img.shape[:2] == (size, size):
        return np.ascontiguousarray(img)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """RGB uint8 `size×size×3` (grayscale repeated to 3 channels, INTER_AREA resize)."""
    return resize_rgb(to_rgb_u8(_imread(Path(path), cv2.IMREAD_UNCHANGED)), size)


def load_mask(path: str | Path | None, size: int) -> np.ndarray:
    """Binary uint8 `size×size` mask in {0, 1} (nearest resize, any nonzero pixel = defect)."""
    if path is None:
        return np.zeros((size, size), np.uint8)
    m = _imread(Path(path), cv2.IMREAD_GRAYSCALE)
    if m.shape != (size, size):
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
    return (m > 0).astype(np.uint8)


def categories_of(samples: Iterable[Sample]) -> list[str]:
    """Sorted distinct category names."""
    return sorted({s.category for s in samples})
