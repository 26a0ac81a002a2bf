"""compress subcommands: `lineguard export` and `lineguard quantize`.

Import-light on purpose: `lineguard --help` must not load torch, OpenVINO or NNCF; the handlers
import the heavy modules when they run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lineguard.compress.schemes import FLOAT_OPS, PRESETS, SCHEMES

#: libraries that narrate every graph pass at INFO level
_CHATTY = ("onnx_ir", "onnxscript", "nncf", "torch.onnx", "torch._dynamo", "torch.export")


def _quiet() -> None:
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


def _export(args: argparse.Namespace) -> int:
    _quiet()
    from lineguard.compress.export import ExportOptions, export_artifact
    from lineguard.compress.gates import ParityBudget

    opts = ExportOptions(
        checkpoint=args.checkpoint,
        out=args.out,
        size=args.size,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        data=args.data,
        name=args.name,
        force=args.force,
        image_threshold=args.image_threshold,
        pixel_threshold=args.pixel_threshold,
        parity=ParityBudget(map_max_rel=args.max_map_diff),
        threads=args.threads,
    )
    path = export_artifact(opts)
    print(f"artifact written: {path.parent} (FP32 ONNX + OpenVINO IR, parity gate passed)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    _quiet()
    from lineguard.compress.gates import AccuracyBudget
    from lineguard.compress.quantize import QuantizeOptions, quantize_artifact

    opts = QuantizeOptions(
        artifact=args.artifact,
        checkpoint=args.checkpoint,
        data=args.data,
        calib_dir=args.calib_dir,
        calib_images=args.calib_images,
        labelled=args.labelled,
        gate_per_class=args.gate_per_class,
        gate_defects=args.gate_defects,
        scheme=args.scheme,
        preset=args.preset,
        float_ops=args.float_ops,
        accuracy_control=args.accuracy_control,
        max_drop=args.max_drop,
        budget=AccuracyBudget(
            image_auroc=args.max_image_auroc_drop,
            pixel_ap=args.max_pixel_ap_drop,
            aupro=args.max_aupro_drop,
            **{
                f"class_{key}": getattr(args, f"max_class_{key}_drop")
                for key in ("image_auroc", "pixel_ap", "aupro")
                if getattr(args, f"max_class_{key}_drop") is not None
            },
        ),
        threads=args.threads,
    )
    path = quantize_artifact(opts)
    print(f"INT8 detector added to {path.parent} (accuracy gate passed)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Register `export` and `quantize`."""
    p = sub.add_parser(
        "export",
        help="checkpoint -> ONNX + OpenVINO IR FP32 model artifact (parity-gated)",
        description=(
            "Export a training checkpoint to a model artifact: prompt_encoder and detector graphs "
            "as ONNX (opset >= 17) and OpenVINO IR FP32, uint8 RGB NHWC inputs, golden prompts, "
            "and model.json. PyTorch, ONNX Runtime and OpenVINO (true f32) are compared on "
            "held-out images first; if a figure misses its budget, no model.json is written."
        ),
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint (.pt)")
    p.add_argument("--out", type=Path, required=True, help="artifact folder to create")
    p.add_argument("--size", type=int, help="input size (must be the size trained at)")
    p.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="dynamic batch axis on images and prompt tokens: a tiled station then runs all "
        "tiles of a frame in one call (default: static batch 1)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    p.add_argument("--data", type=Path, help="training data root or pack, if moved since training")
    p.add_argument("--name", help="model name in model.json")
    p.add_argument("--force", action="store_true", help="replace an artifact already in --out")
    p.add_argument(
        "--image-threshold",
        type=float,
        default=1.0,
        help="default image threshold in normalised units (1.0 ≈ p99 of normal val)",
    )
    p.add_argument(
        "--pixel-threshold",
        type=float,
        default=1.0,
        help="default pixel threshold in normalised units",
    )
    p.add_argument(
        "--max-map-diff",
        type=float,
        default=1e-3,
        help="parity budget: max |Δmap| / map range (default 1e-3)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads for the gate (default 2)")
    p.set_defaults(handler=_export)

    q = sub.add_parser(
        "quantize",
        help="add an NNCF INT8 detector to an artifact (accuracy-gated)",
        description=(
            "Quantize the artifact's detector to INT8 with NNCF post-training quantization "
            "(transformer-aware), calibrated on NORMAL training images only. INT8 is compared "
            "with FP32 on a labelled set (--labelled) or on normal validation images plus "
            "synthetic defects; if a drop exceeds its budget the artifact is left unchanged."
        ),
    )
    q.add_argument("--artifact", type=Path, required=True, help="artifact folder from `export`")
    q.add_argument("--checkpoint", type=Path, help="training checkpoint (default: from model.json)")
    q.add_argument("--data", type=Path, help="training data root or pack, if moved since training")
    q.add_argument(
        "--calib-dir",
        type=Path,
        help="NORMAL images to calibrate on instead (<class>/ subfolders if several)",
    )
    q.add_argument(
        "--calib-images", type=int, default=300, help="number of calibration images (default 300)"
    )
    q.add_argument(
        "--labelled", type=Path, help="labelled MVTec-layout dataset for the gate (its test split)"
    )
    q.add_argument("--gate-per-class", type=int, help="cap on gate images per class")
    q.add_argument(
        "--gate-defects",
        type=int,
        default=4,
        help="synthetic defects per normal validation image in the gate set (default 4)",
    )
    # the three axes of the quantize ladder; `auto` (default) climbs each, fastest first
    ladder_axes = (
        (
            "--scheme",
            SCHEMES,
            "ops INT8 may touch: full, float-stem (stride-2 backbone convs float), "
            "float-backbone (only transformer/refiner INT8)",
        ),
        (
            "--preset",
            PRESETS,
            "NNCF preset: performance (symmetric activations, faster) or mixed (asymmetric)",
        ),
        (
            "--float-ops",
            FLOAT_OPS,
            "precision of the ops INT8 leaves in float (LayerNorm, softmax, adds), in the gate "
            "and on stations: bf16 (~5-8%% faster where the CPU has native bf16, f32 "
            "elsewhere) or f32 (most faithful)",
        ),
    )
    for flag, values, text in ladder_axes:
        q.add_argument(
            flag,
            choices=("auto", *values),
            default="auto",
            help=f"{text}; auto (default) tries {', '.join(values)} in this order and keeps "
            "the first that passes the gate",
        )
    q.add_argument(
        "--accuracy-control",
        action="store_true",
        help="NNCF accuracy-aware quantization (reverts harmful quantizers)",
    )
    q.add_argument(
        "--max-drop",
        type=float,
        help="accuracy control: largest pixel AP drop NNCF may leave, absolute fraction "
        "(default: --max-pixel-ap-drop)",
    )
    q.add_argument(
        "--max-image-auroc-drop",
        type=float,
        default=0.005,
        help="gate budget for the class-mean image AUROC, fraction (default 0.005 = 0.5 pt; "
        "each class: 1 pt, its figures rest on fewer images)",
    )
    q.add_argument(
        "--max-pixel-ap-drop",
        type=float,
        default=0.01,
        help="gate budget for the class-mean pixel AP, fraction (default 0.01 = 1 pt; each "
        "class: 1.5 pt)",
    )
    q.add_argument(
        "--max-aupro-drop",
        type=float,
        default=0.01,
        help="gate budget for the class-mean AUPRO, fraction (default 0.01 = 1 pt; each class: "
        "2 pt)",
    )
    for key, what, default in (
        ("image_auroc", "image AUROC", "0.01"),
        ("pixel_ap", "pixel AP", "0.015"),
        ("aupro", "AUPRO", "0.02"),
    ):
        q.add_argument(
            f"--max-class-{key.replace('_', '-')}-drop",
            type=float,
            help=f"gate budget for any one class's {what}, fraction (default {default})",
        )
    q.add_argument("--threads", type=int, default=2, help="CPU threads for the gate (default 2)")
    q.set_defaults(handler=_quantize)
