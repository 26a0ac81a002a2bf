"""Honest evaluation of a OneNIP checkpoint (`lineguard evaluate`).

The model is used only through `encode_prompt` / `detect`, exactly as a station uses the exported
graphs: each class's prompt is encoded once and every test image of the class is scored against
it. Maps are judged raw at the model's input resolution (rank metrics need no normalisation, and
nothing is ever fitted on test images). Also reported: the spread over random prompt draws and a
class-agnostic mode where the prompt is retrieved by pooled-feature similarity.
With `tiling` (train/tiles.py) images are scored at their original size as a tiled station scores
frames, and the metrics and saved maps are at the ORIGINAL image size.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lineguard.runtime.errors import LineGuardError
from lineguard.train.data import categories_of
from lineguard.train.metrics import class_metrics, mean_metrics, std_metrics
from lineguard.train.pack import Pack, open_data
from lineguard.train.prompts import (
    fixed_prompts,
    random_prompt_draws,
    retrieve_classes,
    to_tensor,
)
from lineguard.train.report import class_figures, write_reports

log = logging.getLogger(__name__)


@torch.no_grad()
def detect_all(
    model: torch.nn.Module,
    images: np.ndarray,
    assign: np.ndarray,
    prompts: Sequence[np.ndarray],
    device: torch.device | str,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "detect",
) -> tuple[np.ndarray, np.ndarray]:
    """Score each image against prompt `assign[i]`: (maps N×H×W float32, scores N float64).

    Each prompt is encoded ONCE (its tokens do not depend on the query, as at a station); images
    sharing a prompt go through `detect` in batches with the 1×N×D tokens.
    """
    n, h, w = len(images), images.shape[1], images.shape[2]
    maps = np.zeros((n, h, w), np.float32)
    scores = np.zeros(n, np.float64)
    bar = tqdm(total=n, desc=desc, disable=not progress, unit="img")
    for pid in np.unique(assign):
        tokens = model.encode_prompt(to_tensor(np.asarray(prompts[int(pid)])[None], device))
        idx = np.flatnonzero(assign == pid)
        for a in range(0, len(idx), batch_size):
            part = idx[a : a + batch_size]
            amap, score = model.detect(to_tensor(images[part], device), tokens)
            amap = amap.float()
            if amap.shape[-2:] != (h, w):
                raise LineGuardError(
                    f"model map is {tuple(amap.shape[-2:])} but its input is {(h, w)}"
                )
            maps[part] = amap[:, 0].cpu().numpy()
            scores[part] = score.float().reshape(-1).cpu().numpy()
            bar.update(len(part))
    bar.close()
    return maps, scores


def per_class_metrics(
    test: Pack, maps: np.ndarray, scores: np.ndarray, classes: Iterable[str]
) -> dict[str, dict[str, float]]:
    """The five metrics of every class, from the test set's folder labels and masks."""
    cats = np.array([s.category for s in test.samples])
    labels = np.array([s.label for s in test.samples])
    out = {}
    for cls in classes:
        idx = np.flatnonzero(cats == cls)
        out[cls] = class_metrics(labels[idx], scores[idx], test.masks[idx], maps[idx])
    return out


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load(checkpoint: str | Path | Mapping[str, Any], device: torch.device):
    from lineguard.train.checkpoint import load_model, read_checkpoint

    if isinstance(checkpoint, Mapping):
        from lineguard.train.torch_model import OneNIP, OneNIPConfig

        model = OneNIP(OneNIPConfig.model_validate(checkpoint["model_config"]), pretrained=False)
        model.load_state_dict(checkpoint["state_dict"], strict=True)
        return model.to(device).eval(), dict(checkpoint)
    read_checkpoint(checkpoint)  # clear errors before building anything
    return load_model(checkpoint, device)


def fixed_prompt_pairs(
    pack: Pack, test: Pack, size: int, prompt: str | None, stored: Mapping | None
) -> tuple[list[str], dict[str, tuple[str, np.ndarray]], np.ndarray]:
    """(classes of ``test``, each class's fixed prompt ``(path, image)``, each test image's
    class index): how every test image is paired with its station's golden prompt."""
    classes = categories_of(test.samples)
    chosen = fixed_prompts(classes, pack.samples, pack.images, size, prompt, stored)
    index = {c: i for i, c in enumerate(classes)}
    return classes, chosen, np.array([index[s.category] for s in test.samples])


def evaluate_checkpoint(
    checkpoint: str | Path | Mapping[str, Any] | None,
    data: str | Path | Sequence[str | Path] | Pack,
    categories: Iterable[str] | None = None,
    prompt: str | None = "fixed",
    random_prompts: int = 0,
    retrieval: bool = False,
    out_dir: str | Path | None = None,
    save_maps: str | Path | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    model: torch.nn.Module | None = None,
    input_size: int | None = None,
    tiling: Any | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (path or dict; or a live `model`) on the test images of `data`.

    `data` is an MVTec-layout root (or several), a `.npz` pack, or a loaded `Pack` holding test
    samples (and training samples for `first` / random prompts). Returns
    `{"mean", "per_class", "random_prompt": {"mean", "std", ...} | None,
    "retrieval_accuracy": float | None, ...}` with metrics as fractions; writes JSON, markdown
    and one PNG per class under `out_dir`, and maps + scores.csv under `save_maps`.
    """
    t0 = time.perf_counter()
    dev = _resolve_device(device)
    ckpt: dict[str, Any] = {}
    if model is None:
        if checkpoint is None:
            raise LineGuardError("evaluate needs a checkpoint or a model")
        model, ckpt = _load(checkpoint, dev)
    elif isinstance(checkpoint, Mapping):
        ckpt = dict(checkpoint)
    model = model.to(dev)
    was_training = model.training
    model.eval()
    size = int(
        input_size
        or ckpt.get("model_config", {}).get("input_size")
        or getattr(getattr(model, "cfg", None), "input_size", 0)
    )
    if size <= 0:
        raise LineGuardError("cannot tell the model's input size; pass input_size")
    if tiling is not None:
        try:
            if random_prompts or retrieval:
                raise LineGuardError("random prompts and retrieval do not support tiling yet")
            opts = dict(categories=categories, prompt=prompt, save_maps=save_maps)
            opts.update(out_dir=out_dir, batch_size=batch_size, progress=progress)
            return _evaluate_tiled(model, ckpt, data, tiling, dev, size, t0, **opts)
        finally:
            model.train(was_training)

    if isinstance(data, Pack):
        pack = data
        if categories:
            wanted = set(categories)
            pack = pack.select(lambda s: s.category in wanted)
        if pack.size != size:
            raise LineGuardError(f"data is at {pack.size} px but the model takes {size} px")
    else:
        pack = open_data(data, size, categories, progress=progress)
    test = pack.select(lambda s: s.split == "test")
    if not len(test):
        raise LineGuardError("no test images in the data (expected <category>/test/<defect>)")
    try:
        classes, chosen, truth = fixed_prompt_pairs(pack, test, size, prompt, ckpt.get("prompts"))
        unknown = sorted(set(classes) - set(ckpt.get("classes", classes)))
        if unknown:
            log.warning("classes not in the checkpoint's training classes: %s", ", ".join(unknown))
        prompt_imgs = [chosen[c][1] for c in classes]

        maps, scores = detect_all(
            model,
            test.images,
            truth,
            prompt_imgs,
            dev,
            batch_size,
            progress,
            "evaluate (fixed prompts)",
        )
        per_class = per_class_metrics(test, maps, scores, classes)
        results: dict[str, Any] = {
            "mean": mean_metrics(per_class),
            "per_class": per_class,
            "random_prompt": None,
            "retrieval_accuracy": None,
            "prompts": {c: chosen[c][0] for c in classes},
            "classes": classes,
            "test_images": len(test),
            "input_size": size,
            "device": str(dev),
            "data_fingerprint": pack.fingerprint,
        }
        if save_maps is not None:
            write_maps(save_maps, test, maps, scores)
        if out_dir is not None:
            class_figures(Path(out_dir), test, maps, scores, ckpt.get("calibration"))

        if random_prompts > 0:
            draws = random_prompt_draws(classes, pack.samples, random_prompts, seed)
            runs, used = [], []
            for k, draw in enumerate(draws):
                imgs = [pack.images[draw[c]] for c in classes]
                m, s = detect_all(
                    model,
                    test.images,
                    truth,
                    imgs,
                    dev,
                    batch_size,
                    progress,
                    f"random prompts {k + 1}/{len(draws)}",
                )
                runs.append(mean_metrics(per_class_metrics(test, m, s, classes)))
                used.append({c: pack.samples[draw[c]].rel_path for c in classes})
            results["random_prompt"] = {
                "mean": mean_metrics(dict(enumerate(runs))),
                "std": std_metrics(runs),
                "draws": runs,
                "prompts": used,
                "seed": seed,
            }

        if retrieval:
            picked = retrieve_classes(model, test.images, np.stack(prompt_imgs), dev, batch_size)
            correct = picked == truth
            m, s = detect_all(
                model,
                test.images,
                picked,
                prompt_imgs,
                dev,
                batch_size,
                progress,
                "evaluate (retrieved prompts)",
            )
            rc = per_class_metrics(test, m, s, classes)
            results["retrieval_accuracy"] = float(correct.mean())
            results["retrieval"] = {
                "mean": mean_metrics(rc),
                "per_class": rc,
                "accuracy_per_class": {
                    c: float(correct[truth == i].mean()) for i, c in enumerate(classes)
                },
            }
    finally:
        model.train(was_training)
    results["eval_time_s"] = round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        write_reports(Path(out_dir), results)
    return results


def _evaluate_tiled(
    model: torch.nn.Module,
    ckpt: Mapping[str, Any],
    data: Any,
    tiling: Any,
    dev: torch.device,
    size: int,
    t0: float,
    *,
    categories: Iterable[str] | None,
    prompt: str | None,
    save_maps: str | Path | None,
    out_dir: str | Path | None,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """`evaluate_checkpoint` with tiling: MVTec-layout roots read at their original size."""
    from types import SimpleNamespace

    from lineguard.train.data import scan_mvtec
    from lineguard.train.tiles import evaluate_tiled, position_validation

    if isinstance(data, Pack) or any(Path(d).suffix == ".npz" for d in _as_list(data)):
        raise LineGuardError("tiled evaluation reads the original images: give dataset roots")
    samples = scan_mvtec(_as_list(data), categories)
    results, maps, scores = evaluate_tiled(
        model, samples, tiling, dev, prompt, ckpt.get("prompts"), batch_size, progress, size,
        val=position_validation(ckpt),
    )  # fmt: skip
    results.update(random_prompt=None, retrieval_accuracy=None, device=str(dev))
    if save_maps is not None:
        test = SimpleNamespace(samples=[s for s in samples if s.split == "test"])
        write_maps(save_maps, test, maps, scores)  # type: ignore[arg-type]
    results["eval_time_s"] = round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        write_reports(Path(out_dir), results)
    return results


def _as_list(data: Any) -> list[Path]:
    return [Path(data)] if isinstance(data, str | Path) else [Path(d) for d in data]


def write_maps(
    root: str | Path, test: Pack, maps: Sequence[np.ndarray], scores: np.ndarray
) -> None:
    """`root/<category>/<defect>/<stem>.npy` (float32 map) and `root/scores.csv` (path,score).
    Maps are written at the size they are given (tiled evaluation: the original image size)."""
    root = Path(root)
    for s, m in zip(test.samples, maps, strict=True):
        p = root / s.category / s.defect / f"{s.path.stem}.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, m.astype(np.float32, copy=False))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score"])
        for s, sc in zip(test.samples, scores, strict=True):
            w.writerow([s.rel_path, repr(float(sc))])
