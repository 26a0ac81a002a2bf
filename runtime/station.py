"""`Station`: one inspection station at run time: camera thread → bounded queue → inference
thread → decision → debounce → event, reported to the service through two callbacks.

Threads: the camera's reader thread only captures and enqueues; one inference thread per station
runs the pipeline. Neither ever waits on the network. Events: with a `writer` (what `lineguard
run` gives, `event_writer.py`) the inference thread only hands `(frame, decision)` over and the
writer thread renders the evidence, builds the payload and commits it (group commit); without
one, `on_event` is called on the inference thread and is expected to commit to the durable
outbox and return (the service publishes from there).

Queue policy (counted in `stats()["dropped_frames"]`, never silent): when the queue is full a
live source drops per `queue.drop` ("oldest": the newest frames win, latency stays bounded;
"newest": the incoming frame is discarded). A file replay without `fps` (folder/video "as fast
as possible") applies back pressure instead, so every recorded frame is inspected.

Status: "online" when started and whenever the camera recovers, "camera-lost" (with the
camera's reason) when it is lost, "offline" when stopped or when a finite source has ended and
its last frame was inspected. Only changes are reported.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lineguard.camera import CameraConfigError, Frame, decode_image, open_camera, to_rgb_u8
from lineguard.runtime import events
from lineguard.runtime.errors import LineGuardError
from lineguard.runtime.event_writer import EventJob
from lineguard.runtime.evidence import EvidenceStore, encode_bounded, render_overlay
from lineguard.runtime.frame_queue import FrameQueue
from lineguard.runtime.pipeline import Debouncer, Decision, Pipeline, Thresholds
from lineguard.runtime.threshold_limits import check_score

log = logging.getLogger(__name__)

__all__ = ["FrameQueue", "Station", "read_prompt"]  # FrameQueue lives in frame_queue.py

EventCallback = Callable[[dict[str, Any], bytes | None], None]
StatusCallback = Callable[[str, str], None]


def read_prompt(path: Path, expected_sha256: str | None) -> tuple[np.ndarray, str]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LineGuardError(f"prompt image {path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise LineGuardError(
            f"prompt image {path} has sha256 {digest}, config says {expected_sha256}"
        )
    image, why = decode_image(data)
    if image is None:
        raise LineGuardError(f"prompt image {path}: {why}")
    return to_rgb_u8(image, "BGR"), digest


def _model_sha256(model_dir: Path, card: Any) -> str:
    path = Path(model_dir) / "model.json"
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(card.model_dump_json().encode()).hexdigest()


class Station:
    """One station's worker. Heavy work (engine load, prompt tokens) happens in the constructor,
    so a bad artifact or prompt fails before any thread starts; `start()` starts the threads."""

    def __init__(
        self,
        cfg: Any,
        *,
        on_event: EventCallback,
        on_status: StatusCallback,
        edge_id: str = "edge",
        engine: Any | None = None,
        evidence_topic: Callable[[str], str] | None = None,
        stats_window_s: float = 10.0,
        writer: Any | None = None,
        metrics: Any | None = None,
    ) -> None:
        self.cfg = cfg
        self.station_id, self.line_id, self.edge_id = cfg.station_id, cfg.line_id, edge_id
        self.on_event, self.on_status = on_event, on_status
        self.evidence_topic = evidence_topic
        self.writer, self.metrics = writer, metrics  # EventWriter, metrics.StationMetrics
        prompt, self.prompt_sha256 = read_prompt(cfg.prompt.image, cfg.prompt.sha256)
        self._owns_engine = engine is None
        if engine is None:
            from lineguard.runtime.engine import load_engine  # heavy; only when really needed

            engine = load_engine(
                cfg.model, backend=cfg.engine, precision=cfg.precision, threads=cfg.threads
            )
        self.engine = engine
        card = engine.card
        self.model_sha256 = _model_sha256(cfg.model, card)
        thresholds = Thresholds.resolve(cfg.thresholds, card.thresholds)
        try:
            self.pipeline = Pipeline(
                engine,
                prompt,
                thresholds=thresholds,
                roi=cfg.roi,
                ignore_masks=cfg.ignore_masks,
                tiling=cfg.tiling,
            )
        except ValueError as exc:
            raise LineGuardError(f"station {self.station_id}: {exc}") from exc
        self.debouncer = Debouncer(cfg.debounce.consecutive, cfg.debounce.cooldown_s)
        ev = cfg.evidence
        self.store = (
            EvidenceStore(ev.save_dir, retention_days=ev.retention_days) if ev.save_dir else None
        )
        self.queue = FrameQueue(cfg.queue.size, cfg.queue.drop)
        self._backpressure = cfg.camera.kind in ("folder", "video") and not cfg.camera.fps
        try:
            self.camera = open_camera(
                cfg.camera,
                name=self.station_id,
                on_frame=self._enqueue,
                on_lost=lambda reason: self._set_state("camera-lost", reason),
                on_recovered=lambda: self._set_state("online", ""),
                on_end=self._source_ended,
            )
        except CameraConfigError as exc:
            raise LineGuardError(f"station {self.station_id}: camera: {exc}") from exc
        self._stop = threading.Event()
        self._ended = threading.Event()
        self._done = threading.Event()
        self._state_lock = threading.Lock()
        self._state = "offline"
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._window_s = stats_window_s
        self._recent: deque[tuple[float, float]] = deque(maxlen=100_000)
        self._started_at: float | None = None
        self.frames = self.defective_frames = self.events = self.errors = 0
        self._shadow_counts = {"frames": 0, "active_defects": 0, "candidate_defects": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Station:
        if self._thread is not None:
            raise RuntimeError(f"station {self.station_id} already started")
        self._started_at = time.monotonic()
        self._set_state("online", "")
        self._thread = threading.Thread(
            target=self._run, name=f"infer-{self.station_id}", daemon=True
        )
        self._thread.start()
        self.camera.start()
        return self

    def stop(self, reason: str = "stopped", timeout: float = 5.0) -> None:
        """Stop capture and inference (queued frames are discarded) and report offline."""
        self._stop.set()
        self.queue.close()  # first: wakes a capture thread blocked on back pressure
        self.camera.stop(timeout)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._owns_engine and hasattr(self.engine, "close"):
            self.engine.close()
            self._owns_engine = False
        self._set_state("offline", reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until inference has finished: a finite source ended and every queued frame was
        inspected (or the station was stopped). False on timeout."""
        return self._done.wait(timeout)

    @property
    def state(self) -> str:
        return self._state

    # ------------------------------------------------------------------ thresholds
    @property
    def max_area_px(self) -> int:
        return self.pipeline.max_area_px

    def thresholds(self) -> dict[str, Any]:
        return self.pipeline.thresholds.as_dict()

    def set_thresholds(
        self, image: float | None = None, pixel: float | None = None, min_area_px: int | None = None
    ) -> dict[str, Any]:
        """Change thresholds live (thread-safe), from the next frame on; returns the new set."""
        return self.pipeline.set_thresholds(image, pixel, min_area_px).as_dict()

    def shadow(self) -> dict[str, Any] | None:
        s = self.pipeline.shadow
        return None if s is None else s.as_dict()

    def set_shadow(
        self, image: float | None, pixel: float | None = None, min_area_px: int | None = None
    ) -> dict[str, Any] | None:
        """Evaluate candidate thresholds alongside the active ones (counted, never alerted).
        Missing values copy the active ones; `image=None` and `pixel=None` stop the shadow."""
        with self._stats_lock:
            self._shadow_counts = {"frames": 0, "active_defects": 0, "candidate_defects": 0}
            if image is None and pixel is None:
                self.pipeline.set_shadow(None)
                return None
            a = self.pipeline.thresholds
            cand = Thresholds(
                image=a.image if image is None else check_score("image", image),
                pixel=a.pixel if pixel is None else check_score("pixel", pixel),
                min_area_px=a.min_area_px
                if min_area_px is None
                else self.pipeline.check_area(min_area_px),
            )
            self.pipeline.set_shadow(cand)
            return cand.as_dict()

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Rates over the last `stats_window_s`, counters since start; latency: capture→decision."""
        now = time.monotonic()
        with self._stats_lock:
            while self._recent and now - self._recent[0][0] > self._window_s:
                self._recent.popleft()
            lat = np.array([x[1] for x in self._recent], np.float64) * 1000.0
            shadow = self.pipeline.shadow
            shadow_stats = (
                None if shadow is None else {"thresholds": shadow.as_dict(), **self._shadow_counts}
            )
            span = min(self._window_s, now - self._started_at) if self._started_at else 0.0
            return {
                "state": self._state,
                "fps": float(len(lat) / span) if span > 0 else 0.0,
                "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                "latency_p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
                "frames": self.frames,
                "frames_captured": self.camera.frames_read,
                "dropped_frames": self.queue.dropped,
                "queue_depth": len(self.queue),
                "defective_frames": self.defective_frames,
                "events": self.events,
                "errors": self.errors,
                "camera_lost": self.camera.lost,
                "camera_reconnects": self.camera.reconnects,
                "shadow": shadow_stats,
                "shadow_defects": shadow_stats["candidate_defects"] if shadow_stats else 0,
            }

    # ------------------------------------------------------------------ internals
    def _set_state(self, state: str, reason: str) -> None:
        with self._state_lock:
            if state == self._state:
                return
            if self._stop.is_set() and state != "offline":
                return
            self._state = state
            try:
                self.on_status(state, reason)
            except Exception:
                log.exception("station %s: on_status callback failed", self.station_id)

    def _enqueue(self, frame: Frame) -> None:
        self.queue.put(frame, block=self._backpressure)

    def _source_ended(self) -> None:
        self._ended.set()  # the inference loop finishes once the queue is empty

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.queue.get(timeout=0.2)
                if frame is None:
                    if self._ended.is_set() and len(self.queue) == 0:
                        self._set_state("offline", f"end of {self.camera.source.describe()}")
                        return
                    continue
                self._inspect(frame)
        finally:
            self._done.set()

    def _inspect(self, frame: Frame) -> None:
        try:
            decision = self.pipeline.process(frame.image)
        except Exception:
            self.errors += 1
            if self.errors <= 3 or self.errors % 100 == 0:
                log.exception("station %s: frame %d failed", self.station_id, frame.frame_id)
            return
        now = time.monotonic()
        latency = now - frame.monotonic
        with self._stats_lock:
            self.frames += 1
            self.defective_frames += int(decision.defective)
            self._recent.append((now, latency))
            if decision.shadow_defective is not None:
                self._shadow_counts["frames"] += 1
                self._shadow_counts["active_defects"] += int(decision.defective)
                self._shadow_counts["candidate_defects"] += int(decision.shadow_defective)
        if self.metrics is not None:
            self.metrics.observe(decision.infer_s, latency)
        if self.debouncer.update(decision.defective, frame.monotonic):
            self._emit(frame, decision, latency)

    def _emit(self, frame: Frame, decision: Decision, latency_s: float) -> None:
        if self.writer is not None:  # off this thread: evidence, payload, commit
            self.writer.submit(
                EventJob(
                    self.station_id,
                    lambda: self.build_event(frame, decision, latency_s),
                    self._event_done,
                )
            )
            return
        try:
            payload, jpeg = self.build_event(frame, decision, latency_s)
        except Exception:
            self.errors += 1
            log.exception("station %s: event not built", self.station_id)
            return
        try:
            self.on_event(payload, jpeg)
            self.events += 1
        except Exception:
            self.errors += 1
            log.exception(
                "station %s: on_event failed for %s", self.station_id, payload["event_id"]
            )

    def _event_done(self, committed: bool) -> None:
        """Writer thread, after the group commit: only that thread writes these counters."""
        if committed:
            self.events += 1
        else:
            self.errors += 1

    def build_event(
        self, frame: Frame, decision: Decision, latency_s: float
    ) -> tuple[dict[str, Any], bytes | None]:
        """The defect payload and the evidence JPEG to publish (None when not on MQTT)."""
        payload = events.defect_payload(
            edge_id=self.edge_id,
            line=self.line_id,
            station=self.station_id,
            frame_id=frame.frame_id,
            captured_at=frame.timestamp,
            image_score=decision.image_score,
            thresholds=decision.thresholds.as_dict(),
            regions=[r.to_dict() for r in decision.regions],
            model_sha256=self.model_sha256,
            prompt_sha256=self.prompt_sha256,
            frame_size=decision.frame_size,
            latency_ms=latency_s * 1000.0,
            model_name=getattr(self.engine.card, "name", None),
            engine=self.cfg.engine,
            precision=self.cfg.precision,
        )
        jpeg = self._evidence(frame, decision, payload)
        return payload, jpeg if self.cfg.evidence.mqtt else None

    def _evidence(self, frame: Frame, decision: Decision, payload: dict) -> bytes | None:
        ev = self.cfg.evidence
        if not ev.mqtt and self.store is None:
            return None
        try:
            overlay = render_overlay(
                frame.image,
                decision.score_map,
                decision.roi,
                decision.regions,
                decision.thresholds.pixel,
                image_score=decision.image_score,
            )
            jpeg, size = encode_bounded(overlay, ev.max_bytes)
            eid = payload["event_id"]
            path = self.store.save(f"{self.station_id}_{eid}", jpeg) if self.store else None
            topic = self.evidence_topic(eid) if (ev.mqtt and self.evidence_topic) else None
            events.attach_evidence(
                payload, jpeg, topic=topic, path=None if path is None else str(path), size=size
            )
            return jpeg
        except Exception:
            log.exception("station %s: evidence failed; event sent without it", self.station_id)
            return None
