"""Which training-free third map helps a trained model, judged on VALIDATION only.

The learned map compares the query with one golden sample. Two families of training-free maps
could add what it misses: finer or wider prompt matches (other backbone taps, a larger search
radius, a nearest neighbour over the whole prompt) and Gaussians of the training images'
descriptors (position-free or per position, on the neck grid or at stride 8). Each is blended
with the learned map at shares 0.25–1 (its spread matched on normal validation pixels, as the
shipped rules do) and scored on the checkpoint's normal validation images against two defect
families: the held-out judge (``train/judge_defects.py``, never trained on) and the training
synthesis. No test image is read.

    .venv/bin/python benchmarks/third_map_study.py --checkpoint runs/mtd/final.pt \\
        --data DATA/mtd --out benchmarks/results/third_map_mtd.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lineguard.train import prompt_match as pm
from lineguard.train.backbone import neck
from lineguard.train.calibration import (
    blend,
    image_scores,
    learned_map,
    match_scale,
    score_parts,
    to_tensor,
)
from lineguard.train.checkpoint import load_model, read_checkpoint
from lineguard.train.proxy import judge_validation, separation, synthetic_validation
from lineguard.train.train_config import DataConfig, TrainConfig
from lineguard.train.train_data import load_training_data_for, make_synthesizer

WEIGHTS = (0.25, 0.5, 0.75, 1.0)
#: name -> (taps, zoom, stride, radius; None = nearest neighbour over the whole prompt)
MATCHES = {
    "match s4+s8 r2 z1 (shipped)": ((1, 2), 1, 4, 2),
    "match s4+s8 r2 z2 (shipped)": ((1, 2), 2, 4, 2),
    "match s4+s8 r4 z1": ((1, 2), 1, 4, 4),
    "match s4+s8+s16 r2 z1": ((1, 2, 3), 1, 4, 2),
    "match s8+s16 r1 z1": ((2, 3), 1, 8, 1),
    "match s8+s16 r2 z1": ((2, 3), 1, 8, 2),
    "match s8+s16 r1 z2": ((2, 3), 2, 8, 1),
    "match s4+s8 global z1": ((1, 2), 1, 4, None),
    "match s8+s16 global z1": ((2, 3), 1, 8, None),
}
#: name -> (descriptor grid, per position)
GAUSSIANS = {
    "gauss neck global": ("neck", False),
    "gauss neck per position": ("neck", True),
    "gauss s8 global": ("s8", False),
    "gauss s8 per position": ("s8", True),
}


class Study:
    def __init__(self, checkpoint: Path, data: list[Path]) -> None:
        ckpt = read_checkpoint(checkpoint)
        self.cfg = TrainConfig.model_validate(ckpt["train_config"])
        roots = DataConfig.model_validate({"mvtec": [{"root": str(p)} for p in data]})
        self.td = load_training_data_for(self.cfg, data=roots)
        self.model, _ = load_model(checkpoint, "cpu")
        self.size = self.model.cfg.input_size
        self.prompts = self.td.prompt_images()

    @torch.no_grad()
    def _desc(self, x: torch.Tensor, taps_idx, zoom: int, stride: int) -> torch.Tensor:
        z = self.model.normalise(x)
        if zoom > 1:
            side = self.size * zoom
            z = F.interpolate(z, size=(side, side), mode="bilinear", align_corners=True)
        taps = self.model.backbone(z)
        g = self.size * zoom // stride
        parts = [
            t
            if t.shape[-1] == g
            else F.interpolate(t, size=(g, g), mode="bilinear", align_corners=True)
            for t in (taps[i] for i in taps_idx)
        ]
        return F.avg_pool2d(torch.cat(parts, 1), 3, stride=1, padding=1)

    def _full(self, d: torch.Tensor) -> np.ndarray:
        up = F.interpolate(d, size=(self.size, self.size), mode="bilinear", align_corners=True)
        return self.model.smooth(up)[:, 0].numpy()

    @torch.no_grad()
    def match(self, images: np.ndarray, labels: np.ndarray, spec) -> np.ndarray:
        taps_idx, zoom, stride, radius = spec
        out = np.zeros((len(images), self.size, self.size), np.float32)
        for cls in np.unique(labels):
            p = self._desc(to_tensor(self.prompts[int(cls)][None], "cpu"), taps_idx, zoom, stride)
            idx = np.flatnonzero(labels == cls)
            for s in range(0, len(idx), 16):
                part = idx[s : s + 16]
                q = self._desc(to_tensor(images[part], "cpu"), taps_idx, zoom, stride)
                if radius is None:
                    qf, pf = q.flatten(2).transpose(1, 2), p.flatten(2).transpose(1, 2)
                    d = torch.cdist(qf, pf.expand(len(part), -1, -1)).amin(-1)
                    d = d.reshape(len(part), 1, *q.shape[-2:])
                else:
                    d = pm.match_distance(q, p, radius * zoom)
                out[part] = self._full(d)
        return out

    @torch.no_grad()
    def _grid_feats(self, images: np.ndarray, kind: str) -> torch.Tensor:
        out = []
        for s in range(0, len(images), 32):
            x = to_tensor(images[s : s + 32], "cpu")
            if kind == "neck":
                g = self.size // 16
                out.append(neck(self.model.taps(x), (g, g)))
            else:
                out.append(self._desc(x, (2, 3), 1, 8))
        return torch.cat(out)

    def gaussian(self, kind: str, per_position: bool):
        """Fit on the TRAINING split; returns a function images -> map."""
        ft = self._grid_feats(self.td.train_images, kind)
        n, c, g, _ = ft.shape
        eye = torch.eye(c, dtype=torch.float64)
        if per_position:
            x = ft.permute(2, 3, 0, 1).reshape(g * g, n, c).double()
            mu = x.mean(1, keepdim=True)
            cov = (x - mu).transpose(1, 2) @ (x - mu) / (n - 1)
            ridge = 0.01 * cov.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]
            prec = torch.from_numpy(np.linalg.inv((cov + ridge * eye).numpy())).float()
        else:
            x = ft.permute(0, 2, 3, 1).reshape(-1, c).double()
            mu = x.mean(0)
            cov = (x - mu).T @ (x - mu) / (len(x) - 1)
            prec = torch.linalg.inv(cov + 0.01 * eye * torch.trace(cov) / c).float()
        mu = mu.float()

        def score(images: np.ndarray) -> np.ndarray:
            f = self._grid_feats(images, kind)
            b = f.shape[0]
            if per_position:
                v = f.permute(2, 3, 0, 1).reshape(g * g, b, c) - mu
                d = torch.einsum("pbc,pcd,pbd->pb", v, prec, v).T.reshape(b, 1, g, g)
            else:
                v = f.permute(0, 2, 3, 1) - mu
                d = torch.einsum("bijc,cd,bijd->bij", v, prec, v)[:, None]
            return self._full(d.clamp_min(0).sqrt())

        return score

    def run(self) -> dict:
        td, model = self.td, self.model
        n = len(td.val_images)
        sets = {
            "judge": judge_validation(td, self.cfg.seed),
            "train_family": synthetic_validation(
                td, make_synthesizer(td, self.cfg.synthesis), self.cfg.seed
            ),
        }
        gauss = {name: self.gaussian(*spec) for name, spec in GAUSSIANS.items()}
        out: dict = {"validation_normal": n, "training_images": len(td.train_images)}
        for set_name, (bad, masks, bad_labels) in sets.items():
            both = np.concatenate([td.val_images, bad])
            labels = np.concatenate([td.val_labels, bad_labels])
            s_rec, m_hat, _ = score_parts(
                model, both, labels, self.prompts, "cpu", with_match=False
            )
            learned = learned_map(model, s_rec, m_hat)
            res = {"learned map": separation(image_scores(model, learned), learned, n, masks)}
            makers = [
                (name, lambda x, y, s=spec: self.match(x, y, s)) for name, spec in MATCHES.items()
            ]
            makers += [(name, lambda x, y, f=f: f(x)) for name, f in gauss.items()]
            for name, make in makers:
                t0 = time.perf_counter()
                h = make(both, labels)
                k = match_scale(learned[:n], h[:n])
                row = {"seconds": round(time.perf_counter() - t0, 1)}
                for w in WEIGHTS:
                    amap = blend(learned, h, w, k)
                    row[f"{w:g}"] = separation(image_scores(model, amap), amap, n, masks)
                res[name] = row
                print(set_name, name, {w: round(row[f"{w:g}"]["val_proxy"], 4) for w in WEIGHTS})
            out[set_name] = res
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    result = {
        "command": "python benchmarks/third_map_study.py --checkpoint "
        f"{args.checkpoint} --data {' '.join(map(str, args.data))} --out {args.out}",
        "loadavg_at_start": round(os.getloadavg()[0], 2),
        **Study(args.checkpoint, args.data).run(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
