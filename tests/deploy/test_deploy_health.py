"""The pre-switch gate runs the model through the runtime's engine on every prompt image."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import yaml
from deploy_testkit import make_artifact, make_stations, tree, write_site

from lineguard.deploy.build import build_bundle
from lineguard.deploy.health import HealthError
from lineguard.deploy.install import Options, install
from lineguard.deploy.releases import status
from lineguard.runtime.artifact import load_card, write_card

pytest.importorskip("lineguard.runtime.engine")
pytest.importorskip("onnxruntime")


def _bundle(tmp: Path, name: str, version: str, broken: str | None = None) -> Path:
    src = tmp / name
    art = make_artifact(src / "artifact", nan=broken == "nan")
    if broken == "size":  # model.json disagrees with the graphs: the engine refuses to load
        card = load_card(art)
        card.input_size = [32, 32]
        write_card(art, card)
    stations = make_stations(src, art)
    site = write_site(src / "site.yaml")
    out = tmp / f"{name}.tar.gz"
    build_bundle(art, stations, version, out, site=site)
    return out


def test_install_runs_each_station_once(tmp_path):
    root = tmp_path / "root"
    res = install(_bundle(tmp_path, "good", "1"), root, Options(lock_timeout=30))
    inf = res.health["inference"]
    assert set(inf) == {"st1", "st2"}
    for r in inf.values():
        assert r["backend"] == "onnxruntime" and r["precision"] == "fp32"
        assert math.isfinite(r["score"])
    assert status(root)["current"] == "1"


@pytest.mark.parametrize(
    ("broken", "message"),
    [("nan", "not finite"), ("size", r"graphs take .*model\.json says \[32, 32\]")],
)
def test_a_model_that_does_not_run_is_never_activated(tmp_path, broken, message):
    root = tmp_path / "root"
    install(_bundle(tmp_path, "good", "1"), root, Options(lock_timeout=30))
    before = tree(root)
    with pytest.raises(HealthError, match=message):
        install(_bundle(tmp_path, "bad", "2", broken), root, Options(lock_timeout=30))
    assert tree(root) == before
    assert os.readlink(root / "current") == "releases/1"


def test_station_engine_choice_is_used(tmp_path):
    """The gate loads the model the way each station asks: st2 wants OpenVINO INT8, which this
    artifact lacks, so the gate fails and names the station."""
    src = tmp_path / "src"
    art = make_artifact(src / "artifact")
    stations = make_stations(src, art)
    cfg = yaml.safe_load((stations / "st2.yaml").read_text())
    cfg["engine"], cfg["precision"] = "openvino", "int8"
    (stations / "st2.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "b.tar.gz"
    build_bundle(art, stations, "1", out, site=write_site(src / "site.yaml"))
    with pytest.raises(HealthError, match=r"station st2: .*no int8 model"):
        install(out, tmp_path / "root", Options(lock_timeout=30))
