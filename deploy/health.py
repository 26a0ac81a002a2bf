"""Health gates for a release.

Two gates, because they can fail for different reasons:

* before `current` moves (`check_release`): the configs validate, the model artifact's files match
  model.json, and the model loads and runs once on each station's prompt image with finite
  outputs (an inference engine that cannot be imported fails the gate; only `--no-inference`
  skips it). A failure here never touches `current`.
* after `current` moved (`live_checks` in install.py): the service restarted and stays up, the
  live runtime reports online over MQTT, the edge and every station of the release (each
  station's status `online`), or an operator-supplied `--health-cmd` passes. A failure there
  rolls `current` back.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
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


def check_configs(release: Path, manifest: Manifest, on_edge: bool = True) -> str:
    """Validate the site and every station config with the runtime's loader.

    `on_edge=False` (at build time) skips checking machine-local files the site names (TLS
    certificates): they exist on the edge PC, not on the build machine.
    """
    if manifest.site:
        configs.validate_site_file(release / manifest.site, check_files=on_edge)
    for st in manifest.stations:
        cfg = configs.validate_station_file(release / st.config, check_files=True)
        if cfg.station_id != st.id:
            raise HealthError(
                f"{release / st.config}: station_id {cfg.station_id!r}, manifest says {st.id!r}"
            )
    what = f"site + {len(manifest.stations)}" if manifest.site else f"{len(manifest.stations)}"
    return f"{what} station config(s) valid (lineguard.runtime.config)"


def _run_station(engine: Any, cfg: Any) -> dict[str, Any]:
    """One pass over the prompt image through the runtime's own pipeline (ROI, resize, norm)."""
    import numpy as np

    from lineguard.runtime.pipeline import Pipeline, Thresholds
    from lineguard.runtime.station import read_prompt

    prompt, _ = read_prompt(Path(cfg.prompt.image), cfg.prompt.sha256)
    pipe = Pipeline(
        engine,
        prompt,
        thresholds=Thresholds.resolve(cfg.thresholds, engine.card.thresholds),
        roi=cfg.roi,
        ignore_masks=cfg.ignore_masks,
        tiling=cfg.tiling,
    )
    d = pipe.process(prompt)
    amap, score, defective = np.asarray(d.score_map), d.image_score, d.defective
    if not np.all(np.isfinite(amap)) or not np.isfinite(float(score)):
        raise HealthError(f"station {cfg.station_id}: model output is not finite on its prompt")
    return {"score": float(score), "prompt_defective": defective}


def run_inference(
    release: Path, manifest: Manifest, backend: str | None, precision: str | None
) -> dict[str, Any]:
    """Load the model as each station asks and run it once on the station's prompt image."""
    try:
        from lineguard.runtime.engine import load_engine
    except ImportError as exc:  # fail closed: a release that cannot infer is not healthy
        raise HealthError(
            f"inference engine not importable ({exc}): the model cannot be checked, and the "
            "runtime could not run it either (install lineguard[edge], or pass --no-inference "
            "to skip this check on purpose)"
        ) from exc
    results: dict[str, Any] = {}
    engines: dict[tuple, Any] = {}
    try:
        for st in manifest.stations:
            cfg = configs.validate_station_file(release / st.config)
            opts = {
                "backend": backend or cfg.engine,
                "precision": precision or cfg.precision,
                "threads": cfg.threads,
            }
            key = (str(cfg.model), *opts.values())
            try:
                if key not in engines:
                    engines[key] = load_engine(cfg.model, **opts)
                res = _run_station(engines[key], cfg)
            except LineGuardError as exc:
                raise HealthError(f"station {st.id}: {exc}") from exc
            except Exception as exc:  # any engine failure fails the gate, named for the operator
                raise HealthError(
                    f"station {st.id}: model failed to load or run ({exc!r})"
                ) from exc
            if res["prompt_defective"]:
                log.warning("station %s: its own prompt image is judged defective", st.id)
            results[st.id] = {**opts, **res}
    finally:
        for engine in engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()
    return results


def check_release(
    release: Path,
    manifest: Manifest,
    inference: bool = True,
    backend: str | None = None,
    precision: str | None = None,
    label: str | None = None,
) -> HealthReport:
    """The pre-switch gate; raises HealthError on failure.

    `label` replaces the (temporary) release path in messages, so they name the release.
    """
    report = HealthReport()
    try:
        report.configs = check_configs(release, manifest)
        card = load_card(release / MODEL_DIR, verify=True)
        report.model = f"{card.name}: model.json valid, {len(card.sha256)} files match sha256"
        if inference:
            report.inference = run_inference(release, manifest, backend, precision)
        else:
            report.inference = {"skipped": "--no-inference"}
    except LineGuardError as exc:
        msg = str(exc)
        if label:
            msg = msg.replace(str(release), label).replace(os.path.relpath(release), label)
        raise HealthError(msg) from exc
    return report


def run_health_cmd(cmd: str, env: dict[str, str], timeout: float) -> None:
    """Run an operator's health hook through the shell; a non-zero exit fails the gate.

    Output goes to temporary files, not pipes: a hook that starts something in the background
    (which inherits them) must not keep deploy waiting for end-of-file.
    """
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.run(
                cmd,
                shell=True,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise HealthError(f"health command timed out after {timeout:g}s: {cmd}") from exc
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise HealthError(
            f"health command exited {proc.returncode}: {cmd}" + (f": {tail}" if tail else "")
        )
