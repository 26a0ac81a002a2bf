"""`lineguard train`: help, recipes, clear errors (file, line, key), an end-to-end tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.runtime.cli import main
from lineguard.train.train_config import load_train_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "train").glob("*.yaml"))


def test_help_is_torch_free_and_documents_options() -> None:
    code = (
        "import sys, argparse\n"
        "import lineguard.train.cli as c\n"
        "p = argparse.ArgumentParser(); c.register(p.add_subparsers())\n"
        "assert 'torch' not in sys.modules, 'train.cli imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run(
        [sys.executable, "-m", "lineguard.runtime.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for opt in ("--config", "--data", "--epochs", "--out", "--resume", "--device", "torchrun"):
        assert opt in out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe: Path) -> None:
    cfg = load_train_config(recipe)
    assert cfg.model.input_size % 16 == 0
    for src in cfg.data.mvtec:
        assert src.root.is_absolute()  # resolved against the recipe's folder


def test_yaml_paths_are_relative_to_the_file_cli_paths_to_the_cwd(tmp_path) -> None:
    sub = tmp_path / "cfgs"
    sub.mkdir()
    (sub / "r.yaml").write_text(
        "data:\n  mvtec: [{root: ../data}]\n  folders: [{path: caps, category: x}]\n"
        "out_dir: ../out\n"
    )
    cfg = load_train_config(sub / "r.yaml")
    assert cfg.data.mvtec[0].root.resolve() == (tmp_path / "data").resolve()
    assert cfg.data.folders[0].path.resolve() == (sub / "caps").resolve()
    assert cfg.out_dir.resolve() == (tmp_path / "out").resolve()
    over = load_train_config(sub / "r.yaml", {"epochs": 7, "data": {"mvtec": []}})
    assert over.epochs == 7 and over.data.mvtec == [] and len(over.data.folders) == 1


def test_expected_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {"piped.yaml", "mtd.yaml", "cpu_small.yaml", "tiny_test.yaml"} <= names


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(["train", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_unknown_key_names_file_line_and_key(tmp_path, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: 3\nmodel:\n  input_size: 64\n  hiden_dim: 8\n")
    rc, _, err = run_cli(["--config", str(cfg)], capsys)
    assert rc == 1
    assert "bad.yaml:4" in err and "model.hiden_dim" in err and "Traceback" not in err


def test_bad_value_and_yaml_syntax(tmp_path, capsys) -> None:
    cfg = tmp_path / "v.yaml"
    cfg.write_text("epochs: -2\nmodel:\n  input_size: 100\n")
    rc, _, err = run_cli(["--config", str(cfg)], capsys)
    assert rc == 1 and "v.yaml:1: epochs" in err and "multiple of 16" in err
    cfg.write_text("epochs: [1\n")
    rc, _, err = run_cli(["--config", str(cfg)], capsys)
    assert rc == 1 and "v.yaml:" in err and "YAML syntax" in err
    rc, _, err = run_cli(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 1 and "nope.yaml" in err and "not found" in err


def test_missing_data_is_a_clear_error(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "epochs: 1\ndevice: cpu\nmodel: {backbone: tf_efficientnet_lite0, input_size: 64}\n"
    )
    rc, _, err = run_cli(["--config", str(cfg)], capsys)
    assert rc == 1 and "no training data" in err
    rc, _, err = run_cli(["--config", str(cfg), "--data", str(tmp_path / "missing")], capsys)
    assert rc == 1 and "missing" in err and "does not exist" in err


def make_mvtec(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        good = root / f"part{c}" / "train" / "good"
        good.mkdir(parents=True)
        for i in range(per_class):
            img = cv2.GaussianBlur(rng.random((40, 48, 3)).astype(np.float32), (0, 0), 2) * 255
            cv2.imwrite(str(good / f"{i:02d}.png"), img.astype(np.uint8))
    return root


def tiny_recipe_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`lineguard train` arguments for the tiny test recipe on `data`, writing to `out`."""
    tiny = str(REPO / "configs/train/tiny_test.yaml")
    return ["--config", tiny, "--data", str(data), "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow
def test_cli_trains_tiny_recipe_end_to_end(tmp_path, capsys) -> None:
    data = make_mvtec(tmp_path / "ds")
    out = tmp_path / "run"
    rc, stdout, err = run_cli(tiny_recipe_args(data, out, "--epochs", "1"), capsys)
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["classes"] == 2 and summary["epochs"] == 1
    assert (out / "final.pt").is_file() and (out / "last.pt").is_file()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temp files
    # the checkpoint keys every image file it trained on, and none of its validation split
    from lineguard.runtime.calibration.seen import file_key
    from lineguard.train.checkpoint import read_checkpoint

    ckpt = read_checkpoint(out / "final.pt")
    keys = set(ckpt["trained_file_keys"])
    trained = [data / rel.split("/", 1)[1] for rel in ckpt["split"]["train"]]
    held = [data / rel.split("/", 1)[1] for rel in ckpt["split"]["val"]]
    assert trained and held and len(keys) == len(trained)
    assert {file_key(f) for f in trained} == keys and not {file_key(f) for f in held} & keys

    # time-boxed: stop after epoch 1 of 2, then resume to the end
    out2 = tmp_path / "run2"
    common = tiny_recipe_args(data, out2)
    rc, stdout, err = run_cli([*common, "--stop-after", "1"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["epochs_done"] == 1 and not (out2 / "final.pt").exists()
    rc, stdout, err = run_cli([*common, "--resume", str(out2 / "last.pt")], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["epochs_done"] == 2 and (out2 / "final.pt").is_file()


@pytest.mark.slow
def test_torchrun_ddp_shards_the_data_and_writes_one_checkpoint(tmp_path) -> None:
    """Two CPU processes (gloo) through torchrun: each runs half the steps, rank 0 writes."""
    data = make_mvtec(tmp_path / "ds", classes=2, per_class=9)  # 7 train + 2 val per class
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lineguard.runtime.cli",
        "train",
        *tiny_recipe_args(data, out, "--epochs", "1", "--threads", "1"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"checkpoint"') == 1  # only rank 0 reports
    assert (out / "final.pt").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # 14 training images: 7 per rank -> ONE step of batch 8 (a single process would take 2)
    assert len(log) == 1 and log[0]["steps"] == 1
