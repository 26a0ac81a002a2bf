"""`lineguard export`: checkpoint -> ONNX + OpenVINO IR FP32 artifact, gated on parity.

Two graphs (docs/architecture.md): `prompt_encoder` (runs once per station) and `detector` (runs
per frame). ONNX comes from the torch.export-based exporter (opset 18); the OpenVINO IR is
converted from that very ONNX file with FP32 weights (`compress_to_fp16=False`), so all three
(PyTorch, ONNX Runtime, OpenVINO) can be compared on the same images before `model.json` exists.
OpenVINO runs the gate in TRUE f32 (`INFERENCE_PRECISION_HINT=f32`): on CPUs with native bf16 it
would otherwise run bf16 and the gate would measure bf16 rounding, not the export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from lineguard.compress import card as cards
from lineguard.compress.checkpoint import Checkpoint, load_checkpoint
from lineguard.compress.evalsets import parity_set, try_normal_data
from lineguard.compress.gates import (
    ParityBudget,
    check_parity,
    parity_figures,
    run_graphs,
    run_torch,
)
from lineguard.compress.graphs import DetectorGraph, PromptEncoderGraph, export_copy
from lineguard.runtime.artifact import MODEL_JSON, Precision, Thresholds, sha256_file
from lineguard.runtime.engine import OnnxRuntimeRunner, OpenVINORunner
from lineguard.runtime.errors import LineGuardError

log = logging.getLogger(__name__)

OPSET = 18
GRAPH_FILES = ("prompt_encoder", "detector")
#: everything an export or quantize run writes into an artifact folder
ARTIFACT_GLOBS = ("*.onnx", "*.xml", "*.bin", MODEL_JSON, cards.PROMPTS_DIR)


class ExportOptions(BaseModel):
    """What `lineguard export` does."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(title="training checkpoint (lineguard-onenip/1)")
    out: Path = Field(title="artifact folder to write")
    size: int | None = Field(None, title="input size; must equal the size the model was trained at")
    dynamic_batch: bool = Field(
        False,
        title="dynamic batch axis on images and prompt tokens (tiled stations run all tiles in "
        "one call; default: static 1, NPU-friendly)",
    )
    opset: int = Field(OPSET, ge=17, title="ONNX opset")
    data: Path | None = Field(None, title="training data root/pack instead of the recipe's")
    name: str | None = Field(None, title="model name in model.json")
    force: bool = Field(False, title="replace an existing artifact in `out`")
    image_threshold: float = Field(1.0, title="default image threshold (normalised units)")
    pixel_threshold: float = Field(1.0, title="default pixel threshold (normalised units)")
    parity_per_class: int = Field(2, ge=1, title="validation images per class in the parity set")
    parity: ParityBudget = Field(default_factory=ParityBudget, title="parity budgets")
    threads: int = Field(2, ge=1, title="CPU threads for the gate's inference")


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    opset: int = OPSET,
) -> Path:
    """One graph to a self-contained .onnx file (weights inside, no external data)."""
    import onnx

    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=256)
        # images and prompt tokens share the batch axis: one call runs a frame's tiles, each
        # against its own position's tokens
        dynamic_shapes = {name: {0: batch} for name in input_names}
    sink = io.StringIO()  # the exporter narrates every step on stdout
    with contextlib.redirect_stdout(sink), torch.no_grad():
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    log.debug("exporter output for %s:\n%s", path.name, sink.getvalue())
    onnx.checker.check_model(str(path))
    return path


def onnx_to_openvino(onnx_path: Path, xml_path: Path) -> Path:
    """Convert ONNX to OpenVINO IR keeping FP32 weights (the default would halve them)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return xml_path


def export_graphs(
    model: torch.nn.Module, out: Path, dynamic_batch: bool, opset: int = OPSET
) -> None:
    """Both graphs as ONNX and OpenVINO IR FP32 into `out` (from an `export_copy` of `model`)."""
    model = export_copy(model)
    size = int(model.cfg.input_size)
    # torch.export specialises size-1 axes, so a dynamic batch needs an example batch of 2
    image = torch.randint(0, 256, (2 if dynamic_batch else 1, size, size, 3), dtype=torch.uint8)
    encoder = PromptEncoderGraph(model)
    with torch.no_grad():
        tokens = encoder(image)
    steps = [
        (
            "prompt_encoder.onnx",
            lambda: export_onnx(
                encoder,
                (image,),
                out / "prompt_encoder.onnx",
                ["image"],
                ["prompt_tokens"],
                dynamic_batch,
                opset,
            ),
        ),
        (
            "detector.onnx",
            lambda: export_onnx(
                DetectorGraph(model),
                (image, tokens),
                out / "detector.onnx",
                ["image", "prompt_tokens"],
                ["anomaly_map", "image_score"],
                dynamic_batch,
                opset,
            ),
        ),
        (
            "prompt_encoder.xml",
            lambda: onnx_to_openvino(out / "prompt_encoder.onnx", out / "prompt_encoder.xml"),
        ),
        ("detector.xml", lambda: onnx_to_openvino(out / "detector.onnx", out / "detector.xml")),
    ]
    for name, step in tqdm(steps, desc="export", unit="file"):
        try:
            step()
        except Exception as exc:
            raise LineGuardError(f"exporting {out / name} failed: {exc}") from exc


def prepare_out(out: Path, force: bool) -> None:
    """An empty folder, or (with force) an old artifact whose files are removed first."""
    if out.exists() and not out.is_dir():
        raise LineGuardError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.iterdir()):
        return
    if not force:
        raise LineGuardError(f"{out} is not empty; pass --force to replace the artifact in it")
    clean(out)


def clean(out: Path) -> None:
    """Remove what export/quantize write (model.json first: the artifact is void from here)."""
    (out / MODEL_JSON).unlink(missing_ok=True)
    for pattern in ARTIFACT_GLOBS:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def finite(figures: dict[str, float]) -> dict[str, float]:
    """JSON has no NaN: undefined figures (e.g. a rank correlation of 2 scores) are left out."""
    return {k: float(v) for k, v in figures.items() if not math.isnan(float(v))}


def check_export_parity(
    model: torch.nn.Module, ckpt: Checkpoint, out: Path, opts: ExportOptions
) -> tuple[dict[str, float], str]:
    """PyTorch vs ONNX Runtime vs OpenVINO (true f32) on held-out images; raises GateError."""
    evalset = parity_set(ckpt, try_normal_data(ckpt, opts.data), opts.parity_per_class)
    log.info("parity gate on %s", evalset.description)
    ref = run_torch(model, evalset, ckpt.prompts)
    runners = {
        "onnxruntime": OnnxRuntimeRunner(
            out / "prompt_encoder.onnx", out / "detector.onnx", threads=opts.threads
        ),
        "openvino": OpenVINORunner(
            out / "prompt_encoder.xml", out / "detector.xml", "fp32", threads=opts.threads
        ),
    }
    figures = {
        name: parity_figures(ref, run_graphs(runner, evalset, ckpt.prompts))
        for name, runner in tqdm(runners.items(), desc="parity", unit="backend")
    }
    check_parity(figures, opts.parity, "export (vs PyTorch)")
    flat = {f"{b}_{k}": v for b, figs in figures.items() for k, v in figs.items()}
    return finite(flat), f"{evalset.description}, vs PyTorch"


def versions(opset: int) -> dict[str, str]:
    import onnx
    import onnxruntime
    import openvino

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnx_opset": str(opset),
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
    }


def export_artifact(opts: ExportOptions) -> Path:
    """Export, gate and write the FP32 artifact; returns the path of model.json."""
    ckpt = load_checkpoint(opts.checkpoint)
    if opts.size is not None and opts.size != ckpt.input_size:
        raise LineGuardError(
            f"--size {opts.size}: {opts.checkpoint} was trained at {ckpt.input_size} px and its "
            f"positional embedding fits only that size; train at {opts.size} to export it"
        )
    out = opts.out
    prepare_out(out, opts.force)
    model = ckpt.build_model()
    try:
        export_graphs(model, out, opts.dynamic_batch, opts.opset)
        prompts = cards.save_prompts(out, ckpt.prompts)
        parity, evaluated_on = check_export_parity(model, ckpt, out, opts)
    except BaseException:
        clean(out)
        raise
    tokens_shape = (model.prompt_token_count, model.cfg.hidden_dim)
    encoder, detector = cards.graph_specs(ckpt.input_size, *tokens_shape, opts.dynamic_batch)
    fp32 = Precision(
        files={g: f"{g}.xml" for g in GRAPH_FILES},
        parity=parity,
        evaluated_on=evaluated_on,
        budgets={f"parity_{k}": v for k, v in opts.parity.model_dump().items()},
    )
    name = opts.name or (
        f"onenip-{ckpt.model_config.backbone}-{ckpt.input_size}-{len(ckpt.classes)}cls"
    )
    card = cards.build_card(
        ckpt,
        name=name,
        encoder=encoder,
        detector=detector,
        prompts=prompts,
        precisions={"fp32": fp32},
        thresholds=Thresholds(image=opts.image_threshold, pixel=opts.pixel_threshold),
        checkpoint_sha256=sha256_file(ckpt.path),
        versions=versions(opts.opset),
        hashes={},
    )
    return cards.finalize(out, card)
