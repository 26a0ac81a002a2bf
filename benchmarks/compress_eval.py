"""FP32 vs INT8 on a dataset's real TEST split: what compression costs in detection quality.

Exports the checkpoint (parity-gated), quantizes it (calibrated on NORMAL training images, gated
on normal validation images + synthetic defects, never on the test set), then scores the whole
test split with both models in OpenVINO (true f32 for FP32 and for INT8's float ops), each class
against its fixed golden prompt, and computes the train stage's metrics per class and averaged.

    .venv/bin/python benchmarks/compress_eval.py --checkpoint runs/piped/final.pt \\
        --dataset DATA/piped --name piped
writes benchmarks/results/compress_piped.{json,md}.

When the INT8 gate refuses every rung of the ladder, the artifact stays FP32 only (fail closed:
that is what a station would run); the result then records the refusal of each rung and the FP32
test figures, and `int8` is null.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")


def _clean(value):
    """JSON without NaN (undefined metrics become null)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def build(args: argparse.Namespace) -> tuple[Path, str | None]:
    """Export + quantize into `<work>/artifact` (or reuse `--artifact`); (artifact, the gate's
    refusal when no INT8 rung passed, else None)."""
    from lineguard.compress.export import ExportOptions, export_artifact
    from lineguard.compress.gates import AccuracyBudget, GateError
    from lineguard.compress.quantize import QuantizeOptions, quantize_artifact
    from lineguard.runtime.artifact import load_card

    if args.artifact is not None:
        if "int8" not in load_card(args.artifact).precisions:
            raise SystemExit(f"{args.artifact} has no int8 model")
        return args.artifact, None
    art = args.work / "artifact"
    export_artifact(ExportOptions(checkpoint=args.checkpoint, out=art, force=True, data=args.data))
    try:
        quantize_artifact(
            QuantizeOptions(
                artifact=art,
                checkpoint=args.checkpoint,
                data=args.data,
                scheme=args.scheme,
                preset=args.preset,
                float_ops=args.float_ops,
                accuracy_control=args.accuracy_control,
                budget=AccuracyBudget(
                    image_auroc=args.max_image_auroc_drop, pixel_ap=args.max_pixel_ap_drop
                ),
            )
        )
    except GateError as exc:
        return art, str(exc)
    return art, None


def _header(args: argparse.Namespace, art: Path, card, test) -> dict:
    """What was evaluated and how, shared by both kinds of result."""
    return {
        "dataset": args.name,
        "dataset_root": str(args.dataset),
        "checkpoint": str(args.checkpoint),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "artifact": str(art),
        "input_size": card.input_size[0],
        "test_images": len(test),
    }


def refusal(args: argparse.Namespace, art: Path, why: str) -> dict:
    """Result when the gate kept no INT8 rung: each rung's refusal and the FP32 test figures."""
    from lineguard.compress.checkpoint import load_checkpoint
    from lineguard.compress.evalsets import labelled_set
    from lineguard.compress.gates import metrics, run_graphs
    from lineguard.runtime.artifact import load_card
    from lineguard.runtime.engine import OpenVINORunner

    card = load_card(art, verify=True)
    ckpt = load_checkpoint(args.checkpoint)
    test = labelled_set(args.dataset, ckpt)
    files = card.precisions["fp32"].files
    runner = OpenVINORunner(
        art / files["prompt_encoder"], art / files["detector"], "fp32", threads=args.threads
    )
    m = metrics(run_graphs(runner, test, ckpt.prompts), test)
    rungs = [part.strip() for part in why.split(" — ")[0].split(" | ")]
    return _clean(
        {
            **_header(args, art, card, test),
            "shipped": "fp32",
            "int8": None,
            "gate_refused": rungs,
            "fp32": {"mean": m["mean"]},
            "per_class": {c: {"fp32": m[c]} for c in sorted(set(test.classes))},
            "gate": {"export_parity": card.precisions["fp32"].parity},
        }
    )


def refusal_markdown(r: dict) -> str:
    lines = [
        f"# Compression: FP32 vs INT8 on the {r['dataset']} test split",
        "",
        f"**No INT8 model: the accuracy gate refused every rung of the ladder** "
        f"({len(r['gate_refused'])} tried), so the artifact stays FP32, which stations run.",
        "",
        "| | " + " | ".join(KEYS) + " |",
        "|---|" + "---|" * len(KEYS),
        "| FP32 | " + " | ".join(_pct(r["fp32"]["mean"][k]) for k in KEYS) + " |",
        "",
        "## Refusals",
        "",
        *[f"- {why}" for why in r["gate_refused"]],
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


def evaluate(args: argparse.Namespace, art: Path) -> dict:
    from lineguard.compress.checkpoint import load_checkpoint
    from lineguard.compress.evalsets import labelled_set
    from lineguard.compress.gates import metrics, parity_figures, run_graphs
    from lineguard.runtime.artifact import load_card
    from lineguard.runtime.engine import OpenVINORunner

    card = load_card(art, verify=True)
    ckpt = load_checkpoint(args.checkpoint)
    test = labelled_set(args.dataset, ckpt)
    kept_ops = card.precisions["int8"].float_ops
    other_ops = "f32" if kept_ops == "bf16" else "bf16"
    runs, seconds = {}, {}
    # the INT8 model as recorded, then with the other float-ops precision (what that choice costs)
    for name, prec, ops in (
        ("fp32", "fp32", "f32"),
        ("int8", "int8", kept_ops),
        ("int8_other_float_ops", "int8", other_ops),
    ):
        files = card.precisions[prec].files
        runner = OpenVINORunner(
            art / files["prompt_encoder"],
            art / files["detector"],
            prec,
            threads=args.threads,
            float_ops=ops,
        )
        t0 = time.perf_counter()
        runs[name] = run_graphs(runner, test, ckpt.prompts)
        seconds[name] = round(time.perf_counter() - t0, 1)
    m = {prec: metrics(out, test) for prec, out in runs.items()}
    drop = {k: m["fp32"]["mean"][k] - m["int8"]["mean"][k] for k in KEYS}
    budgets = {"image_auroc": args.max_image_auroc_drop, "pixel_ap": args.max_pixel_ap_drop}
    classes = sorted(set(test.classes))
    return _clean(
        {
            **_header(args, art, card, test),
            "prompts": "fixed golden prompt per class (the checkpoint's, as in model.json)",
            "fp32": {"mean": m["fp32"]["mean"]},
            "int8": {"mean": m["int8"]["mean"]},
            "drop": drop,
            "budgets": budgets,
            "within_budget": {k: bool(drop[k] <= v) for k, v in budgets.items()},
            "per_class": {c: {"fp32": m["fp32"][c], "int8": m["int8"][c]} for c in classes},
            "int8_vs_fp32_on_test": parity_figures(runs["fp32"], runs["int8"]),
            "int8_other_float_ops": {
                "float_ops": other_ops,
                "mean": m["int8_other_float_ops"]["mean"],
                "vs_int8_on_test": parity_figures(runs["int8"], runs["int8_other_float_ops"]),
            },
            "gate": {
                "export_parity": card.precisions["fp32"].parity,
                "int8_accuracy": card.precisions["int8"].accuracy,
                "int8_evaluated_on": card.precisions["int8"].evaluated_on,
                "int8_calibrated_on": card.precisions["int8"].calibrated_on,
                "int8_method": card.precisions["int8"].method,
            },
            "seconds": seconds,
        }
    )


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def markdown(r: dict) -> str:
    lines = [
        f"# Compression: FP32 vs INT8 on the {r['dataset']} test split",
        "",
        f"{r['test_images']} test images at {r['input_size']} px, {r['prompts']}. "
        "Both models in OpenVINO. INT8: NNCF PTQ calibrated on "
        f"{r['gate']['int8_calibrated_on']}; gate on {r['gate']['int8_evaluated_on']}.",
        "",
        "| | " + " | ".join(KEYS) + " |",
        "|---|" + "---|" * len(KEYS),
    ]
    for name in ("fp32", "int8"):
        lines.append(
            f"| {name.upper()} | " + " | ".join(_pct(r[name]["mean"][k]) for k in KEYS) + " |"
        )
    lines.append("| drop (pt) | " + " | ".join(_pct(r["drop"][k]) for k in KEYS) + " |")
    ok = ", ".join(
        f"{k} {'within' if v else 'OVER'} budget ({100 * r['budgets'][k]:.1f} pt)"
        for k, v in r["within_budget"].items()
    )
    other = r["int8_other_float_ops"]
    lines += [
        "",
        f"Budgets: {ok}.",
        "",
        f"The same INT8 model with its float ops in {other['float_ops']} instead: "
        + ", ".join(f"{k} {_pct(other['mean'][k])}" for k in KEYS)
        + f"; maps differ from the kept INT8 by "
        f"{100 * other['vs_int8_on_test']['map_mean_rel']:.2f} % of their range on average "
        f"(INT8 vs FP32: {100 * r['int8_vs_fp32_on_test']['map_mean_rel']:.2f} %).",
        "",
        "## Per class (FP32 → INT8)",
        "",
    ]
    lines += ["| class | image AUROC | pixel AP | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for c, v in r["per_class"].items():
        cells = [
            f"{_pct(v['fp32'][k])} → {_pct(v['int8'][k])}"
            for k in ("image_auroc", "pixel_ap", "pixel_auroc", "aupro")
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--dataset", type=Path, required=True, help="MVTec-layout root (test split)")
    p.add_argument("--name", required=True, help="dataset name for the result files")
    p.add_argument("--data", type=Path, help="training data root/pack if moved since training")
    p.add_argument("--artifact", type=Path, help="reuse an artifact that already has int8")
    p.add_argument("--work", type=Path, help="where to build the artifact (default runs/...)")
    p.add_argument("--accuracy-control", action="store_true")
    p.add_argument("--scheme", default="auto", help="INT8 scheme (see lineguard quantize)")
    p.add_argument("--preset", default="auto", help="NNCF preset (see lineguard quantize)")
    p.add_argument("--float-ops", default="auto", help="INT8 float ops (see lineguard quantize)")
    p.add_argument("--max-image-auroc-drop", type=float, default=0.005)
    p.add_argument("--max-pixel-ap-drop", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.work = args.work or Path("runs/compress_eval") / args.name
    import torch

    torch.set_num_threads(args.threads)
    art, refused = build(args)
    result = evaluate(args, art) if refused is None else refusal(args, art, refused)
    text = markdown(result) if refused is None else refusal_markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compress_{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"compress_{args.name}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
