"""`lineguard quantize`: NNCF post-training INT8 of the detector, gated on accuracy.

* Calibration: NORMAL training images of the checkpoint's data (the same split training used),
  each paired with its class's golden-prompt tokens, exactly as a station feeds the detector.
  Never test images: activations ranges would then be fitted to the defects we must detect.
* `ModelType.TRANSFORMER` so NNCF keeps LayerNorm/Softmax-sensitive spots in float and applies
  SmoothQuant to the attention/FFN MatMuls. Presets: PERFORMANCE (symmetric activations,
  unsigned after ReLU; ~4 % faster on the lite2 detector) and MIXED (asymmetric activations, more
  faithful where activations are lopsided).
* Which ops INT8 may touch is a ladder (`lineguard.compress.schemes`): `full`, `float-stem`,
  `float-backbone`, each tried with the performance then the mixed preset. By default (`auto`)
  the first rung that passes the gate is kept; `--scheme` / `--preset` pin either axis.
* Optional NNCF accuracy control (`--accuracy-control --max-drop X`): reverts the most harmful
  quantizers until the pixel AP of the gate set (the metric INT8 hurts first) has dropped by at
  most X (default: the pixel AP budget); the gate below still checks every budget.
* The prompt encoder stays FP32: it runs once per station, so INT8 would only add error.
* Gate: FP32 (true f32) vs INT8 image AUROC and pixel AP drops on a labelled set if given, else on
  normal validation images plus synthetic defects. A miss leaves the artifact as it was (its FP32
  model stays valid; no INT8 entry, no INT8 files); a pass adds `precisions.int8` and rewrites
  `model.json` last.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lineguard.compress import card as cards
from lineguard.compress.checkpoint import Checkpoint, load_checkpoint
from lineguard.compress.evalsets import (
    EvalSet,
    labelled_set,
    normal_data,
    per_class_rows,
    validation_set,
)
from lineguard.compress.export import finite
from lineguard.compress.gates import (
    AccuracyBudget,
    GateError,
    Outputs,
    accuracy_figures,
    check_accuracy,
    metrics,
    parity_figures,
    run_graphs,
)
from lineguard.compress.schemes import FLOAT_OPS, PRESETS, SCHEMES, ignored_scope
from lineguard.runtime.artifact import (
    ModelCard,
    Normalization,
    Precision,
    ScoreNormalization,
    load_card,
    sha256_file,
)
from lineguard.runtime.engine import OpenVINORunner
from lineguard.runtime.errors import LineGuardError
from lineguard.train.calibration import normalisation
from lineguard.train.data import load_image, scan_folder

log = logging.getLogger(__name__)

INT8_DETECTOR = "detector_int8.xml"
STAGING = ".int8-staging"


class QuantizeOptions(BaseModel):
    """What `lineguard quantize` does."""

    model_config = ConfigDict(extra="forbid")

    artifact: Path = Field(title="artifact folder written by `lineguard export`")
    checkpoint: Path | None = Field(None, title="training checkpoint (default: the card's)")
    data: Path | None = Field(None, title="training data root/pack instead of the recipe's")
    calib_dir: Path | None = Field(
        None, title="folder of NORMAL images for calibration (<class>/ subfolders if several)"
    )
    calib_images: int = Field(300, ge=1, title="calibration images (spread over classes)")
    labelled: Path | None = Field(None, title="labelled MVTec-layout set for the INT8 gate")
    gate_per_class: int | None = Field(None, ge=1, title="cap on gate images per class")
    gate_defects: int = Field(
        4, ge=1, title="synthetic defects per normal validation image in the gate set"
    )
    scheme: Literal["auto", "full", "float-stem", "float-backbone"] = Field(
        "auto", title="ops INT8 may touch; auto = first of full/float-stem/float-backbone to pass"
    )
    preset: Literal["auto", "performance", "mixed"] = Field(
        "auto",
        title="NNCF preset: performance (symmetric activations), mixed (asymmetric); auto = both",
    )
    float_ops: Literal["auto", "bf16", "f32"] = Field(
        "auto",
        title="precision of the ops INT8 leaves in float, in the gate and on stations",
        description="bf16 is ~5-8 % faster on CPUs with native bf16 and moved piped test maps "
        "by 0.1 % of their range (INT8 itself: 1.2 %); f32 is the most faithful; auto gates each "
        "rung with bf16, then f32.",
    )
    accuracy_control: bool = Field(False, title="use NNCF quantize_with_accuracy_control")
    max_drop: float | None = Field(
        None, ge=0, title="accuracy-control pixel AP drop (fraction); None = the pixel AP budget"
    )
    budget: AccuracyBudget = Field(default_factory=AccuracyBudget, title="INT8 gate budgets")
    threads: int = Field(2, ge=1, title="CPU threads for gate inference")
    seed: int = Field(0, title="seed of image selection and synthetic defects")


def _class_tokens(runner: OpenVINORunner, ckpt: Checkpoint) -> dict[str, np.ndarray]:
    return {c: runner.encode_prompt(ckpt.prompts[c]) for c in ckpt.classes}


def calibration_images(
    ckpt: Checkpoint, opts: QuantizeOptions, td: Any
) -> tuple[np.ndarray, list[str], str]:
    """NORMAL images for calibration, balanced over classes: (images, classes, description)."""
    if opts.calib_dir is not None:
        root = Path(opts.calib_dir)
        subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in ckpt.classes]
        if subdirs:
            samples = [s for d in subdirs for s in scan_folder(d, d.name)]
        elif len(ckpt.classes) == 1:
            samples = scan_folder(root, ckpt.classes[0])
        else:
            raise LineGuardError(
                f"{root}: the model has {len(ckpt.classes)} classes; put the images in "
                f"<class>/ subfolders ({', '.join(ckpt.classes)})"
            )
        classes = [s.category for s in samples]
        per = math.ceil(opts.calib_images / len(set(classes)))
        rows = per_class_rows(classes, per, opts.seed)
        images = np.stack([load_image(samples[i].path, ckpt.input_size) for i in rows])
        return images, [classes[i] for i in rows], f"{len(rows)} normal images from {root}"
    classes = [td.classes[i] for i in td.train_labels]
    per = math.ceil(opts.calib_images / len(set(classes)))
    rows = per_class_rows(classes, per, opts.seed)
    return (
        td.train_images[rows],
        [classes[i] for i in rows],
        f"{len(rows)} normal training images of the checkpoint's data (never test images)",
    )


def nncf_quantize(
    xml: Path,
    items: list[dict[str, np.ndarray]],
    accuracy_control: bool = False,
    validation: EvalSet | None = None,
    tokens: dict[str, np.ndarray] | None = None,
    max_drop: float = 0.005,
    scheme: str = "full",
    preset: str = "performance",
) -> Any:
    """Run NNCF PTQ (or accuracy control) on the detector IR; returns the INT8 ov.Model."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    calib = nncf.Dataset(items)
    common: dict[str, Any] = dict(
        model_type=nncf.ModelType.TRANSFORMER,
        preset=getattr(nncf.QuantizationPreset, preset.upper()),
        subset_size=len(items),
    )
    common["ignored_scope"] = ignored_scope(model, scheme)
    if not accuracy_control:
        return nncf.quantize(model, calib, **common)
    assert validation is not None and tokens is not None
    val_items = [
        {"image": img[None], "prompt_tokens": tokens[cls], "mask": m, "label": lab, "cls": cls}
        for img, cls, m, lab in zip(
            validation.images, validation.classes, validation.masks, validation.labels, strict=True
        )
    ]

    def validate(compiled: Any, data: Any) -> float:
        rows = list(data)
        maps = np.empty((len(rows), *rows[0]["mask"].shape), np.float32)
        scores = np.empty(len(rows))
        for i, r in enumerate(rows):
            out = compiled({"image": r["image"], "prompt_tokens": r["prompt_tokens"]})
            maps[i] = out[compiled.output("anomaly_map")][0, 0]
            scores[i] = float(np.asarray(out[compiled.output("image_score")]).reshape(-1)[0])
        sub = EvalSet(
            "",
            np.zeros((len(rows), 1, 1, 3), np.uint8),
            [r["cls"] for r in rows],
            np.array([r["label"] for r in rows]),
            np.stack([r["mask"] for r in rows]),
        )
        m = metrics(Outputs(maps, scores, {}), sub)["mean"]
        return m["pixel_ap"]

    return nncf.quantize_with_accuracy_control(
        model,
        calib,
        nncf.Dataset(
            val_items, lambda r: {"image": r["image"], "prompt_tokens": r["prompt_tokens"]}
        ),
        validation_fn=validate,
        max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        **common,
    )


def rungs(opts: QuantizeOptions) -> list[tuple[str, str]]:
    """(scheme, preset) pairs to try in order, fastest first; `--scheme`/`--preset` pin one.

    Accuracy control searches its own fallbacks, so it gets the `full` scheme only.
    """
    schemes = SCHEMES if opts.scheme == "auto" else (opts.scheme,)
    if opts.accuracy_control and opts.scheme == "auto":
        schemes = ("full",)
    presets = PRESETS if opts.preset == "auto" else (opts.preset,)
    return [(s, p) for s in schemes for p in presets]


def gate_set(ckpt: Checkpoint, opts: QuantizeOptions, td: Any) -> EvalSet:
    if opts.labelled is not None:
        return labelled_set(opts.labelled, ckpt, opts.gate_per_class, opts.seed)
    return validation_set(ckpt, td, opts.gate_per_class, opts.seed, opts.gate_defects)


def climb(
    det_xml: Path,
    enc_xml: Path,
    items: list[dict[str, np.ndarray]],
    evalset: EvalSet,
    tokens: dict[str, np.ndarray],
    m_fp32: dict[str, Any],
    opts: QuantizeOptions,
) -> tuple[tuple[str, str, str], OpenVINORunner, dict[str, float], Outputs, list[str]]:
    """Quantize rung by rung until one passes the gate; move its files into the artifact.

    Each (scheme, preset) is quantized once and gated with each float-ops precision in turn
    (bf16 first under `auto`: a compile hint, no second NNCF run). Returns ((scheme, preset,
    float_ops), the passing runner, gate figures, gate outputs, names of the rungs tried
    before); raises GateError naming every miss when none passes, leaving the artifact as it was.
    """
    import openvino as ov

    root = det_xml.parent
    acq_drop = opts.budget.pixel_ap if opts.max_drop is None else opts.max_drop
    float_ops = FLOAT_OPS if opts.float_ops == "auto" else (opts.float_ops,)
    misses: list[tuple[str, GateError]] = []
    staging = root / STAGING
    try:
        for scheme, preset in rungs(opts):
            int8_model = nncf_quantize(
                det_xml, items, opts.accuracy_control, evalset, tokens, acq_drop, scheme, preset
            )
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            ov.save_model(int8_model, str(staging / INT8_DETECTOR), compress_to_fp16=False)
            for fops in float_ops:
                runner = OpenVINORunner(
                    enc_xml, staging / INT8_DETECTOR, "int8", opts.threads, float_ops=fops
                )
                out = run_graphs(runner, evalset, {}, tokens)
                figures = accuracy_figures(m_fp32, metrics(out, evalset))  # mean + per class
                name = f"{scheme}/{preset}/{fops}"
                try:
                    check_accuracy(figures, opts.budget, evalset.description)
                except GateError as exc:
                    misses.append((name, exc))
                    log.warning("%s: %s", name, exc)
                    continue
                for f in staging.iterdir():  # the compiled runner keeps working after the move
                    f.replace(root / f.name)
                return (scheme, preset, fops), runner, figures, out, [n for n, _ in misses]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    raise GateError(
        " | ".join(f"[{n}] {exc}" for n, exc in misses) + " — artifact left unchanged (FP32 only)"
    )


def quantize_artifact(opts: QuantizeOptions) -> Path:
    """Quantize, gate, and add `precisions.int8` to the artifact; returns model.json's path."""

    root = opts.artifact
    card = load_card(root, verify=True)
    if "fp32" not in card.precisions:
        raise LineGuardError(f"{root}: model.json lists no fp32 model to quantize")
    ckpt_path = opts.checkpoint or Path(card.checkpoint)
    if not str(ckpt_path) or not Path(ckpt_path).is_file():
        raise LineGuardError(
            f"{root}: its checkpoint {card.checkpoint or '(unknown)'} is not here; "
            "pass --checkpoint"
        )
    if card.checkpoint_sha256 and sha256_file(Path(ckpt_path)) != card.checkpoint_sha256:
        raise LineGuardError(f"{ckpt_path} is not the checkpoint {root} was exported from (sha256)")
    ckpt = load_checkpoint(ckpt_path)
    needs_data = opts.calib_dir is None or opts.labelled is None
    td = normal_data(ckpt, opts.data) if needs_data else None
    fp32_files = card.precisions["fp32"].files
    enc_xml, det_xml = root / fp32_files["prompt_encoder"], root / fp32_files["detector"]
    fp32 = OpenVINORunner(enc_xml, det_xml, "fp32", threads=opts.threads)
    tokens = _class_tokens(fp32, ckpt)

    images, classes, calibrated_on = calibration_images(ckpt, opts, td)
    items = [
        {"image": img[None], "prompt_tokens": tokens[c]}
        for img, c in zip(images, classes, strict=True)
    ]
    evalset = gate_set(ckpt, opts, td)
    log.info("calibrating on %s; gate on %s", calibrated_on, evalset.description)
    ref = run_graphs(fp32, evalset, ckpt.prompts, tokens)
    m_fp32 = metrics(ref, evalset)  # mean and per class: the gate checks both
    rung, runner, figures, out, tried = climb(
        det_xml, enc_xml, items, evalset, tokens, m_fp32, opts
    )
    scheme, preset, float_ops = rung
    parity = parity_figures(ref, out)
    parity.pop("tokens_max_rel")  # same FP32 prompt encoder: identical by construction
    card = update_card(
        card, figures, parity, evalset.description, calibrated_on, opts, scheme, preset, float_ops
    )
    int8_card = card.precisions["int8"]
    if tried:
        int8_card.method += "; tried: " + ", ".join(tried)
    norm = int8_normalization(runner, ckpt, td, tokens)
    if norm is not None:
        int8_card.score_normalization = norm
        fp = card.score_normalization
        int8_card.parity["vs_fp32_image_center_shift"] = (
            norm.image.center - fp.image.center
        ) / fp.image.scale
        int8_card.parity["vs_fp32_pixel_center_shift"] = (
            norm.pixel.center - fp.pixel.center
        ) / fp.pixel.scale
    return cards.finalize(root, card)


def int8_normalization(
    runner: OpenVINORunner, ckpt: Checkpoint, td: Any, tokens: dict[str, np.ndarray]
) -> ScoreNormalization | None:
    """Score normalisation re-measured on INT8 outputs of the NORMAL validation images.

    Same images and rule as the training stage's calibration (median; p99 - median), so a
    threshold of 1.0 still means "the 99th percentile of normal validation images" in INT8.
    """
    if td is None or len(td.val_images) == 0:
        log.warning("no normal validation images: INT8 keeps the FP32 score normalisation")
        return None
    classes = [td.classes[i] for i in td.val_labels]
    n, s = len(classes), td.val_images.shape[1]
    maps, scores = np.empty((n, s, s), np.float32), np.empty(n)
    for i, (img, cls) in enumerate(zip(td.val_images, classes, strict=True)):
        maps[i], scores[i] = runner.detect(img, tokens[cls])
    stats = normalisation(scores, maps, "val")
    return ScoreNormalization(
        image=Normalization(**stats["image"]),
        pixel=Normalization(**stats["pixel"]),
        source=f"{n} normal validation images scored by the INT8 model (never test images)",
        count=n,
    )


def update_card(
    card: ModelCard,
    figures: dict[str, float],
    parity: dict[str, float],
    evaluated_on: str,
    calibrated_on: str,
    opts: QuantizeOptions,
    scheme: str,
    preset: str,
    float_ops: str,
) -> ModelCard:
    method = "NNCF accuracy control" if opts.accuracy_control else "NNCF PTQ"
    budgets = {f"max_{k}_drop": v for k, v in opts.budget.model_dump().items()}
    if opts.accuracy_control:
        budgets["accuracy_control_max_pixel_ap_drop"] = (
            opts.budget.pixel_ap if opts.max_drop is None else opts.max_drop
        )
    int8 = Precision(
        files={
            "prompt_encoder": card.precisions["fp32"].files["prompt_encoder"],
            "detector": INT8_DETECTOR,
        },
        parity={f"vs_fp32_{k}": v for k, v in finite(parity).items()},
        accuracy=finite(figures),
        evaluated_on=f"{evaluated_on}; FP32 in OpenVINO true f32, INT8 with its float ops in "
        f"{float_ops}",
        float_ops=float_ops,
        method=f"{method}, transformer model type, {preset} preset, scheme {scheme}, "
        f"float ops {float_ops}",
        budgets=budgets,
        calibrated_on=calibrated_on,
    )
    return card.model_copy(update={"precisions": {**card.precisions, "int8": int8}})
