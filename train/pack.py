"""A compact, self-describing cache of a dataset at training resolution (`lineguard data pack`).

Why: decoding and INTER_AREA-resizing large originals every epoch wastes GPU time, and a GPU
machine should receive only what a run needs. A pack is ONE `.npz` file holding every image and
mask already resized, each stored as a lossless PNG (or WebP) byte string in a flat buffer with
offsets (no pickle), plus a JSON index of the sample metadata and a content fingerprint. Loading
decodes everything into two uint8 arrays (`images` N×S×S×3 RGB, `masks` N×S×S in {0, 1}); the
pixels are bit-identical to `load_image`/`load_mask` on the original files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from tqdm import tqdm

from lineguard.runtime.artifact import sha256_file
from lineguard.runtime.errors import LineGuardError
from lineguard.train.data import Sample, load_image, load_mask, scan_folder, scan_mvtec

PACK_FORMAT = "lineguard-pack/1"
Codec = Literal["png", "webp"]


@dataclass
class Pack:
    """Samples with their decoded images and masks at one square resolution."""

    size: int
    samples: list[Sample]
    images: np.ndarray  # N×S×S×3 uint8 RGB
    masks: np.ndarray  # N×S×S uint8 {0, 1}
    hashes: list[str]  # sha256 of each sample's source file
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return data_fingerprint(self.samples, self.hashes)

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, keep: Callable[[Sample], bool]) -> Pack:
        """A new Pack with the samples for which `keep` is true (arrays are indexed copies)."""
        idx = [i for i, s in enumerate(self.samples) if keep(s)]
        return Pack(
            self.size,
            [self.samples[i] for i in idx],
            self.images[idx],
            self.masks[idx],
            [self.hashes[i] for i in idx],
            self.meta,
        )

    def upsized(self, size: int) -> Pack:
        """The pack at a LARGER model input, resized as the loader would (INTER_AREA; masks
        nearest). Exactly the pixels of a pack made at `size` when the pack holds the images at
        their own square size (e.g. PIPED's 128 px patches): a small pack travels to a GPU box
        and feeds a 224 px model there."""
        if size < self.size:
            raise LineGuardError(
                f"pack holds images at {self.size} px, smaller than the {size} px asked for only "
                f"by re-packing: run `lineguard data pack --size {size}`"
            )
        if size == self.size:
            return self
        dim = (size, size)
        images = np.stack([cv2.resize(im, dim, interpolation=cv2.INTER_AREA) for im in self.images])
        masks = np.stack([cv2.resize(m, dim, interpolation=cv2.INTER_NEAREST) for m in self.masks])
        return Pack(size, self.samples, images, masks, self.hashes, self.meta)

    def index_of(self) -> dict[tuple[str, str], int]:
        """(dataset, rel_path) -> row, to find a Sample's pixels."""
        return {(s.dataset, s.rel_path): i for i, s in enumerate(self.samples)}


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def data_fingerprint(samples: Iterable[Sample], hashes: Sequence[str] | None = None) -> str:
    """sha256 over each sample's identity and its file's content: same data -> same fingerprint,
    whether it was read from the folders or from a pack."""
    samples = list(samples)
    if hashes is None:
        hashes = [sha256_file(s.path) for s in samples]
    rows = sorted(
        f"{s.dataset}/{s.rel_path}|{s.category}|{s.split}|{s.label}|{h}"
        for s, h in zip(samples, hashes, strict=True)
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def load_arrays(
    samples: Sequence[Sample], size: int, desc: str = "loading images", progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Read and resize every sample's image and mask (threaded; OpenCV releases the GIL)."""
    images = np.empty((len(samples), size, size, 3), np.uint8)
    masks = np.empty((len(samples), size, size), np.uint8)

    def work(i: int) -> None:
        images[i] = load_image(samples[i].path, size)
        masks[i] = load_mask(samples[i].mask_path, size)

    with ThreadPoolExecutor(_threads()) as ex:
        for _ in tqdm(
            ex.map(work, range(len(samples))),
            total=len(samples),
            desc=desc,
            disable=not progress,
            unit="img",
        ):
            pass
    return images, masks


def build_pack(samples: Sequence[Sample], size: int, progress: bool = True) -> Pack:
    """Load `samples` at `size` into memory, fingerprinted by file content."""
    if not samples:
        raise LineGuardError("no samples to pack")
    samples = list(samples)
    images, masks = load_arrays(samples, size, progress=progress)
    with ThreadPoolExecutor(_threads()) as ex:
        hashes = list(ex.map(lambda s: sha256_file(s.path), samples))
    return Pack(size, samples, images, masks, hashes)


def _encode(img: np.ndarray, codec: Codec) -> np.ndarray:
    """Lossless bytes; a grey image (R = G = B) is stored with ONE channel (about 3x smaller)
    and decodes (IMREAD_COLOR) to the same three equal channels."""
    if img.ndim == 3:
        if np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]):
            img = np.ascontiguousarray(img[..., 0])
        else:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if codec == "webp":
        ok, buf = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101])  # >100 = lossless
    else:
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise LineGuardError(f"OpenCV could not encode an image as {codec}")
    return buf.ravel()


def _flat(bufs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(bufs) + 1, np.int64)
    offsets[1:] = np.cumsum([b.size for b in bufs])
    data = np.concatenate(bufs) if bufs else np.zeros(0, np.uint8)
    return data.astype(np.uint8, copy=False), offsets


def _sample_dict(s: Sample) -> dict[str, Any]:
    return {
        "path": str(s.path),
        "category": s.category,
        "split": s.split,
        "label": s.label,
        "defect": s.defect,
        "mask_path": None if s.mask_path is None else str(s.mask_path),
        "rel_path": s.rel_path,
        "dataset": s.dataset,
    }


def _sample_from(d: dict[str, Any]) -> Sample:
    mp = d["mask_path"]
    return Sample(
        Path(d["path"]),
        d["category"],
        d["split"],
        int(d["label"]),
        d["defect"],
        None if mp is None else Path(mp),
        d["rel_path"],
        d["dataset"],
    )


def save_pack(pack: Pack, out: str | Path, codec: Codec = "png", progress: bool = True) -> Path:
    """Write `pack` as one .npz (PNG/WebP byte strings + JSON index); returns the path."""
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    n = len(pack)
    with ThreadPoolExecutor(_threads()) as ex:
        img_bufs = list(
            tqdm(
                ex.map(lambda i: _encode(pack.images[i], codec), range(n)),
                total=n,
                desc=f"encoding {codec}",
                disable=not progress,
                unit="img",
            )
        )
        mask_bufs = list(
            ex.map(
                lambda i: (
                    _encode(pack.masks[i] * 255, "png")
                    if pack.masks[i].any()
                    else np.zeros(0, np.uint8)
                ),
                range(n),
            )
        )
    img_data, img_off = _flat(img_bufs)
    mask_data, mask_off = _flat(mask_bufs)
    meta = {
        **{k: v for k, v in pack.meta.items() if k not in ("format", "size", "codec")},
        "format": PACK_FORMAT,
        "size": pack.size,
        "codec": codec,
        "fingerprint": pack.fingerprint,
        "samples": [_sample_dict(s) for s in pack.samples],
        "file_sha256": pack.hashes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(
        tmp,
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        image_data=img_data,
        image_offsets=img_off,
        mask_data=mask_data,
        mask_offsets=mask_off,
    )
    tmp.replace(out)
    return out


def load_pack(path: str | Path, progress: bool = True) -> Pack:
    """Read a pack written by `save_pack` and decode all images and masks."""
    path = Path(path)
    if not path.is_file():
        raise LineGuardError(f"pack {path} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(z["meta"]).decode())
        img_data, img_off = z["image_data"], z["image_offsets"]
        mask_data, mask_off = z["mask_data"], z["mask_offsets"]
    except (OSError, ValueError, KeyError) as exc:
        raise LineGuardError(f"{path} is not a LineGuard data pack ({exc})") from exc
    if meta.get("format") != PACK_FORMAT:
        raise LineGuardError(f"{path}: unknown pack format {meta.get('format')!r}")
    size = int(meta["size"])
    samples = [_sample_from(d) for d in meta["samples"]]
    n = len(samples)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)

    def work(i: int) -> None:
        a, b = img_off[i], img_off[i + 1]
        images[i] = cv2.cvtColor(cv2.imdecode(img_data[a:b], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        a, b = mask_off[i], mask_off[i + 1]
        if b > a:
            masks[i] = cv2.imdecode(mask_data[a:b], cv2.IMREAD_GRAYSCALE) > 0

    with ThreadPoolExecutor(_threads()) as ex:
        for _ in tqdm(
            ex.map(work, range(n)),
            total=n,
            desc=f"unpacking {path.name}",
            disable=not progress,
            unit="img",
        ):
            pass
    hashes = [str(h) for h in meta["file_sha256"]]
    meta_rest = {k: v for k, v in meta.items() if k not in ("samples", "file_sha256")}
    return Pack(size, samples, images, masks, hashes, meta_rest)


def open_data(
    data: str | Path | Sequence[str | Path],
    size: int,
    categories: Iterable[str] | None = None,
    folders: Sequence[tuple[str | Path, str]] = (),
    progress: bool = True,
) -> Pack:
    """One entry point for training and evaluation: a `.npz` pack (checked for `size`) or one or
    more MVTec-layout roots (plus plain folders of normal captures as `(folder, category)`)."""
    paths = [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]
    if len(paths) == 1 and paths[0].suffix == ".npz" and not folders:
        pack = load_pack(paths[0], progress=progress)
        if pack.size > size:
            raise LineGuardError(
                f"pack {paths[0]} holds images at {pack.size} px but {size} px were asked for; "
                f"re-pack with --size {size}"
            )
        pack = pack.upsized(size)
        if categories:
            wanted = set(categories)
            missing = wanted - {s.category for s in pack.samples}
            if missing:
                raise LineGuardError(f"categories not in {paths[0]}: {', '.join(sorted(missing))}")
            pack = pack.select(lambda s: s.category in wanted)
        return pack
    samples = scan_mvtec(paths, categories) if paths else []
    for folder, cat in folders:
        samples.extend(scan_folder(folder, cat))
    return build_pack(samples, size, progress=progress)
