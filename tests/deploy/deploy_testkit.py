"""Helpers for deploy tests: a tiny but valid model artifact (real ONNX graphs built with
onnx.helper, no torch), station configs with prompt images, bundle builders and a real broker.

A uniquely named module (not `conftest`) so `from deploy_testkit import ...` can never pick up
another folder's conftest; `conftest.py` here only re-exports the fixtures."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from lineguard.deploy.build import build_bundle
from lineguard.runtime.artifact import (
    GraphSpec,
    ModelCard,
    Normalization,
    Precision,
    ScoreNormalization,
    TensorSpec,
    Thresholds,
    sha256_file,
    write_card,
)

H = W = 16
N, D = H * W, 3
LINEGUARD = str(Path(sys.executable).parent / "lineguard")


def _onnx_graphs(out: Path, nan: bool = False) -> None:
    """prompt_encoder: u8 image -> per-pixel tokens; detector: |image - tokens| per pixel.

    With `nan`, the detector divides zero by zero: a model that loads but is broken.
    """
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, N, D])
    map_shape = helper.make_tensor("map_shape", TensorProto.INT64, [4], [1, 1, H, W])
    img = helper.make_tensor_value_info("image", TensorProto.UINT8, [1, H, W, 3])
    tok = helper.make_tensor_value_info("prompt_tokens", TensorProto.FLOAT, [1, N, D])
    enc = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["f", "shape"], ["prompt_tokens"]),
        ],
        "prompt_encoder",
        [img],
        [tok],
        [shape],
    )
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "shape"], ["q"]),
        helper.make_node("Sub", ["q", "prompt_tokens"], ["d"]),
        helper.make_node("Abs", ["d"], ["a"]),
        helper.make_node("ReduceMean", ["a"], ["m"], axes=[2], keepdims=0),
    ]
    if nan:
        nodes += [
            helper.make_node("Sub", ["m", "m"], ["z"]),
            helper.make_node("Div", ["z", "z"], ["m2"]),
        ]
    last = "m2" if nan else "m"
    nodes += [
        helper.make_node("Reshape", [last, "map_shape"], ["anomaly_map"]),
        helper.make_node("ReduceMax", ["anomaly_map"], ["image_score"], axes=[1, 2, 3], keepdims=0),
    ]
    det = helper.make_graph(
        nodes,
        "detector",
        [img, tok],
        [
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, H, W]),
            helper.make_tensor_value_info("image_score", TensorProto.FLOAT, [1]),
        ],
        [shape, map_shape],
    )
    for name, g in (("prompt_encoder", enc), ("detector", det)):
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, out / f"{name}.onnx")


def make_artifact(root: Path, nan: bool = False, name: str = "tiny") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _onnx_graphs(root, nan=nan)
    img = TensorSpec(name="image", shape=[1, H, W, 3], dtype="uint8")
    tok = TensorSpec(name="prompt_tokens", shape=[1, N, D], dtype="float32")
    card = ModelCard(
        name=name,
        created="2026-11-23T00:00:00Z",
        input_size=[H, W],
        resize="cv2-area",
        backbone="none",
        classes=["widget"],
        prompt_encoder=GraphSpec(
            inputs=[img], outputs=[tok], files={"onnx": "prompt_encoder.onnx"}
        ),
        detector=GraphSpec(
            inputs=[img, tok],
            outputs=[
                TensorSpec(name="anomaly_map", shape=[1, 1, H, W], dtype="float32"),
                TensorSpec(name="image_score", shape=[1], dtype="float32"),
            ],
            files={"onnx": "detector.onnx"},
        ),
        score_normalization=ScoreNormalization(
            image=Normalization(center=0.0, scale=1.0),
            pixel=Normalization(center=0.0, scale=1.0),
            source="test fixture",
            count=1,
        ),
        thresholds=Thresholds(image=1.0, pixel=1.0),
        precisions={
            "fp32": Precision(
                files={"prompt_encoder": "prompt_encoder.onnx", "detector": "detector.onnx"}
            )
        },
        sha256={f: sha256_file(root / f) for f in ("prompt_encoder.onnx", "detector.onnx")},
    )
    write_card(root, card)
    return root


def make_stations(root: Path, artifact: Path, ids=("st1", "st2"), seed: int = 0) -> Path:
    stations = root / "stations"
    images = root / "golden"
    stations.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for sid in ids:
        img = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        cv2.imwrite(str(images / f"{sid}.png"), img)
        cfg = {
            "station_id": sid,
            "line_id": "line1",
            "model": str(artifact),
            "engine": "onnxruntime",
            "precision": "fp32",
            "camera": {"kind": "folder", "path": "/srv/replay"},
            "prompt": {
                "image": f"../golden/{sid}.png",
                "sha256": sha256_file(images / f"{sid}.png"),
            },
            "evidence": {"save_dir": "../state/evidence"},
        }
        (stations / f"{sid}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return stations


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    artifact = make_artifact(tmp_path / "src" / "artifact")
    stations = make_stations(tmp_path / "src", artifact)
    site = write_site(tmp_path / "src" / "site.yaml")
    return {"tmp": tmp_path, "artifact": artifact, "stations": stations, "site": site}


@pytest.fixture
def make_bundle(workspace: dict[str, Path]) -> Callable[..., Path]:
    def _make(
        version: str,
        sign: Path | None = None,
        site: Path | None = None,
        artifact: Path | None = None,
    ) -> Path:
        out = workspace["tmp"] / "bundles" / f"lineguard-{version}.tar.gz"
        build_bundle(
            artifact or workspace["artifact"],
            workspace["stations"],
            version,
            out,
            site=site or workspace["site"],
            sign_key=sign,
        )
        return out

    return _make


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed `lineguard` command in a child process (as an operator would)."""
    return subprocess.run([LINEGUARD, *args], capture_output=True, text=True, timeout=timeout)


def tree(root: Path) -> dict[str, str]:
    """Everything under a deploy root that an install may change (not the lock/audit files)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel in ("deploy.lock", "deploy-history.jsonl"):
            continue
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_file():
            out[rel] = sha256_file(p)
        else:
            out[rel] = "dir"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


@pytest.fixture
def deploy_broker(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A real mosquitto on a free loopback port."""
    exe = _mosquitto()
    if exe is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("mosquitto did not start")
    yield "127.0.0.1", port
    proc.terminate()
    proc.wait(timeout=10)


def write_site(path: Path, host: str | None = None, port: int = 1883, edge: str = "edge-a") -> Path:
    """A site config next to the source `stations/` folder, optionally with a broker."""
    data = {"edge_id": edge, "topic_prefix": "lgtest", "stations": ["stations/*.yaml"]}
    if host is not None:
        data["broker"] = {"host": host, "port": port}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def history(root: Path) -> list[dict]:
    f = root / "deploy-history.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def flip_one_byte(path: Path, out: Path, start: float = 0.5) -> Path:
    """Copy `path` to `out` with one byte changed, from `start` (fraction of the size) on.

    A few bit positions of a deflate stream carry no information (padding after the last
    block, codes for unused symbols); skip those so the change is one the content sees.
    """
    import gzip
    import zlib

    data = path.read_bytes()
    plain = gzip.decompress(data)
    for pos in range(int(len(data) * start), len(data)):
        changed = bytearray(data)
        changed[pos] ^= 0x10
        try:
            same = gzip.decompress(bytes(changed)) == plain
        except (OSError, EOFError, ValueError, zlib.error):
            same = False
        if not same:
            out.write_bytes(bytes(changed))
            return out
    raise AssertionError("no byte of the archive matters?")
