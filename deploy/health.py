"""Health gates for a release.

Two gates, because they can fail for different reasons:

* before `current` moves (`check_release`): the configs validate, the model artifact's files match
  model.json, and — when the inference engine is installed — the model loads and runs once on each
  station's prompt image with finite outputs. A failure here never touches `current`.
* after `current` moved (`live_checks` in install.py): the service restarted and stays up, the
  live runtime reports online over MQTT, or an operator-supplied `--health-cmd` passes. A failure
  there rolls `current` back.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lineguard.deploy import configs
from lineguard.deploy.manifest import MODEL_DIR, Manifest
from lineguard.runtime.artifact import load_card
from lineguard.runtime.errors import LineGuardError

log = logging.getLogger(__name__)


class HealthError(LineGuardError):
    """A release failed a health gate (exit code 3, so scripts can tell it from usage errors)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)


@dataclass
class HealthReport:
    configs: str = "not checked"
    model: str = "not checked"
    inference: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"configs": self.configs, "model": self.model, "inference": self.inference}


def check_configs(release: Path, manifest: Manifest) -> str:
    """Validate the site and every station config; return how they were validated."""
    if manifest.site:
        configs.validate_site_file(release / manifest.site)
    for st in manifest.stations:
        configs.validate_station_file(release / st.config)
        for p in st.prompts:
            if not (release / p).is_file():
                raise HealthError(f"{release / st.config}: prompt image {p} missing from release")
    if configs.runtime_validation_available():
        return "validated with lineguard.runtime.config"
    return "YAML and referenced files checked (runtime config models not installed)"


def _load_engine_fn() -> Any | None:
    try:
        mod = importlib.import_module("lineguard.runtime.engine")
    except ImportError as exc:
        log.info("inference engine not importable (%s): health check skips inference", exc)
        return None
    return getattr(mod, "load_engine", None)


def _prompt_for(release: Path, manifest: Manifest, station: str) -> Path | None:
    """The station's prompt image: the runtime config says which when it is installed."""
    st = next(s for s in manifest.stations if s.id == station)
    cfg = release / st.config
    data = configs.read_yaml(cfg)
    refs = configs.image_refs(data, cfg.parent)
    prompt_refs = [r for r in refs if any("prompt" in str(k).lower() for k in r.key)]
    chosen = (prompt_refs or refs or [None])[0]
    return chosen.target if chosen is not None else None


def _read_rgb(path: Path, size: list[int]):
    import cv2
    import numpy as np

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise HealthError(f"{path}: cannot decode prompt image")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = size
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img, dtype=np.uint8)


def _engine_options(release: Path, manifest: Manifest, station: str) -> dict[str, Any]:
    """backend/precision/threads a station asks for (keys as the runtime config names them)."""
    st = next(s for s in manifest.stations if s.id == station)
    data = configs.read_yaml(release / st.config) or {}
    out: dict[str, Any] = {}
    for section in (
        data,
        data.get("model") if isinstance(data.get("model"), dict) else {},
        data.get("engine") if isinstance(data.get("engine"), dict) else {},
    ):
        for k in ("backend", "precision", "threads"):
            if k in section and not isinstance(section[k], dict | list):
                out[k] = section[k]
    return out


def run_inference(
    release: Path, manifest: Manifest, backend: str | None, precision: str | None, threads: int = 1
) -> dict[str, Any]:
    """Load the model and run it once per station on its prompt image; outputs must be finite."""
    load_engine = _load_engine_fn()
    if load_engine is None:
        return {"skipped": "lineguard.runtime.engine not available"}
    import numpy as np

    results: dict[str, Any] = {}
    engines: dict[tuple, Any] = {}
    model_dir = release / MODEL_DIR
    for st in manifest.stations:
        opts = _engine_options(release, manifest, st.id)
        if backend:
            opts["backend"] = backend
        if precision:
            opts["precision"] = precision
        opts.setdefault("threads", threads)
        key = tuple(sorted(opts.items()))
        try:
            if key not in engines:
                engines[key] = load_engine(model_dir, **opts)
            engine = engines[key]
            prompt = _prompt_for(release, manifest, st.id)
            if prompt is None:
                results[st.id] = {"skipped": "station config names no prompt image"}
                continue
            img = _read_rgb(prompt, list(engine.card.input_size))
            tokens = engine.encode_prompt(img)
            amap, score = engine.detect(img, tokens)
        except LineGuardError:
            raise
        except Exception as exc:  # any engine failure is a failed gate, named for the operator
            raise HealthError(f"station {st.id}: model failed to load or run ({exc!r})") from exc
        amap = np.asarray(amap)
        if not np.all(np.isfinite(amap)) or not np.isfinite(float(score)):
            raise HealthError(f"station {st.id}: model output is not finite on the prompt image")
        results[st.id] = {**{k: v for k, v in opts.items()}, "score": float(score)}
    return results


def check_release(
    release: Path,
    manifest: Manifest,
    inference: bool = True,
    backend: str | None = None,
    precision: str | None = None,
) -> HealthReport:
    """The pre-switch gate; raises HealthError (or LineGuardError from a loader) on failure."""
    report = HealthReport()
    try:
        report.configs = check_configs(release, manifest)
        card = load_card(release / MODEL_DIR, verify=True)
        report.model = f"{card.name}: model.json valid, {len(card.sha256)} files match sha256"
        if inference:
            report.inference = run_inference(release, manifest, backend, precision)
        else:
            report.inference = {"skipped": "--no-inference"}
    except HealthError:
        raise
    except LineGuardError as exc:
        raise HealthError(str(exc)) from exc
    return report


def run_health_cmd(cmd: str, env: dict[str, str], timeout: float) -> None:
    """Run an operator's health hook through the shell; a non-zero exit fails the gate."""
    try:
        proc = subprocess.run(
            cmd,
            shell=True,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise HealthError(f"health command timed out after {timeout:g}s: {cmd}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise HealthError(
            f"health command exited {proc.returncode}: {cmd}"
            + (f": {' | '.join(tail)}" if tail else "")
        )
