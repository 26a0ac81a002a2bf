"""Issue 14, finding 11: the deploy health check skipped inference when the engine could not be
imported, so a release that cannot run passed the gate. Now that fails the gate (and a failed
gate never moves `current`); only an explicit --no-inference skips it."""

from __future__ import annotations

import sys

import pytest

from lineguard.deploy.health import HealthError
from lineguard.deploy.install import Options, install


@pytest.fixture
def no_engine(monkeypatch):
    monkeypatch.setitem(sys.modules, "lineguard.runtime.engine", None)  # import raises


def test_engine_not_importable_fails_the_gate(make_bundle, tmp_path, no_engine):
    root = tmp_path / "root"
    with pytest.raises(HealthError, match="inference engine not importable"):
        install(make_bundle("1"), root, Options())
    assert not (root / "current").exists()


def test_no_inference_is_the_only_way_to_skip(make_bundle, tmp_path, no_engine):
    res = install(make_bundle("1"), tmp_path / "root", Options(inference=False))
    assert res.changed and res.health["inference"] == {"skipped": "--no-inference"}
