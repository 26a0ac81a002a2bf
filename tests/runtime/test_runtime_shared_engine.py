"""Issue 13 parts 1-3: one compiled model shared by the stations of a process (thread rule,
per-station requests giving the same maps as the engine alone) and the event writer's group
commit (many events per transaction, nothing lost, order kept, drained at stop)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from calibration_fixtures import defect_image, make_artifact, normal_image

from lineguard.runtime.engine import load_engine
from lineguard.runtime.engine_pool import EnginePool, plan_threads
from lineguard.runtime.event_writer import EventJob, EventWriter
from lineguard.runtime.pipeline import Pipeline, Thresholds
from lineguard.runtime.tiling import TilingConfig


@pytest.mark.parametrize(
    ("cores", "stations", "total", "expect"),
    [
        (2, 1, 1, (1, 2)),  # one station: one stream using both cores (latency)
        (2, 2, 2, (2, 1)),  # two frames in flight, one thread each
        (2, 4, 4, (2, 1)),  # never more streams than cores
        (2, 2, 4, (1, 1)),  # two models of two stations each: a core per model
        (8, 3, 3, (3, 2)),
    ],
)
def test_thread_rule(cores, stations, total, expect) -> None:
    plan = plan_threads(cores, stations, total)
    assert (plan.streams, plan.threads_per_stream) == expect
    assert plan_threads(cores, stations, total, streams=1, threads_per_stream=3).threads == 3


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_pool_shares_one_engine_and_matches_it(tmp_path, backend) -> None:
    art = make_artifact(tmp_path / "art")
    cfgs = [
        SimpleNamespace(model=art, engine=backend, precision="fp32", station_id=f"s{i}")
        for i in range(3)
    ]
    pool = EnginePool(cfgs, cores=2)
    handles = [pool.station_engine(c) for c in cfgs]
    assert len(pool) == 1 and len({id(h.shared) for h in handles}) == 1
    plan = next(iter(pool.plans.values()))
    assert (plan.streams, plan.threads_per_stream) == (2, 1)
    alone = load_engine(art, backend=backend, precision="fp32", threads=1)
    rng = np.random.default_rng(0)
    prompts = [normal_image(rng, size=32) for _ in handles]
    frames = [defect_image(rng, size=32) for _ in range(4)]
    tokens = [h.encode_prompt(p) for h, p in zip(handles, prompts, strict=True)]
    results: dict[int, list] = {}

    def run(i: int) -> None:  # every station on its own thread, concurrently
        out = []
        for f in frames:
            m, s = handles[i].detect(f, tokens[i])
            out.append((m.copy(), s))
        results[i] = out

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, tok in enumerate(tokens):  # per-station prompt tokens, never mixed
        for f, (m, s) in zip(frames, results[i], strict=True):
            ref_m, ref_s = alone.detect(f, tok)
            np.testing.assert_allclose(m, ref_m, rtol=1e-5, atol=1e-5)
            assert s == pytest.approx(ref_s, rel=1e-5, abs=1e-5)
    pool.close()
    alone.close()


class CountingRequest:
    """A station's OpenVINO infer request that counts its `infer` calls."""

    def __init__(self, request) -> None:
        self.request, self.calls = request, 0

    def infer(self, *args, **kwargs):
        self.calls += 1
        return self.request.infer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.request, name)


@pytest.mark.parametrize(
    ("backend", "dynamic"), [("openvino", True), ("openvino", False), ("onnxruntime", True)]
)
def test_tiled_station_on_the_shared_engine_batches_its_tiles(tmp_path, backend, dynamic) -> None:
    """Tiling (main) on a pooled engine (issue 13): a dynamic-batch artifact runs all tiles of a
    frame in ONE call on the station's own request (per-tile tokens bound once), a batch-1
    artifact one call per tile; maps, scores and regions equal the engine alone's."""
    art = make_artifact(tmp_path / "art", dynamic_batch=dynamic)
    cfg = SimpleNamespace(model=art, engine=backend, precision="fp32", station_id="s1")
    pool = EnginePool([cfg], cores=1)
    handle = pool.station_engine(cfg)
    assert handle.shared.runner.batch_images is dynamic
    spy = None
    if backend == "openvino":
        spy = handle._request = CountingRequest(handle._request)
    alone = load_engine(art, backend=backend, precision="fp32", threads=1)
    rng = np.random.default_rng(1)
    prompt = normal_image(rng, size=80)
    tiling = TilingConfig(scale=1.0, overlap=0.25)  # 80x80 frames, 32 px tiles: a 3x3 grid
    t = Thresholds(image=1.0, pixel=1.0, min_area_px=4)
    tiled = Pipeline(handle, prompt, thresholds=t, tiling=tiling)
    ref = Pipeline(alone, prompt, thresholds=t, tiling=tiling)
    assert tiled.tokens.shape[0] == 9
    for frame in [defect_image(rng, size=80) for _ in range(3)]:
        if spy is not None:
            spy.calls = 0
        d, r = tiled.process(frame), ref.process(frame)
        if spy is not None:
            assert spy.calls == (1 if dynamic else 9)
        np.testing.assert_allclose(d.score_map, r.score_map, rtol=1e-5, atol=1e-4)
        assert d.image_score == pytest.approx(r.image_score, rel=1e-5, abs=1e-5)
        assert [g.bbox for g in d.regions] == [g.bbox for g in r.regions]
        assert d.defective == r.defective and d.infer_s > 0
    assert any(tiled.process(defect_image(rng, size=80)).regions for _ in range(3))
    pool.close()
    alone.close()


def test_writer_groups_commits_keeps_order_and_drains() -> None:
    commits: list[list[str]] = []
    done: list[bool] = []

    def commit(batch):
        time.sleep(0.01)  # an fsync
        commits.append([p["n"] for _, p, _ in batch])

    writer = EventWriter(commit, max_delay_s=0.05).start()
    for n in range(40):
        writer.submit(EventJob("s1", lambda n=n: ({"n": n}, None), done.append))
        time.sleep(0.002)
    writer.stop()
    flat = [n for c in commits for n in c]
    assert flat == list(range(40))  # every event, in order, once
    assert len(commits) < 10  # many events per commit
    assert done == [True] * 40 and writer.committed == 40 and writer.pending == 0


def test_writer_commits_promptly_and_reports_failures() -> None:
    seen: list[float] = []
    writer = EventWriter(lambda batch: seen.append(time.monotonic()), max_delay_s=0.05).start()
    t0 = time.monotonic()
    writer.submit(EventJob("s1", lambda: ({}, None)))
    deadline = time.monotonic() + 2
    while not seen and time.monotonic() < deadline:
        time.sleep(0.005)
    assert seen and seen[0] - t0 < 0.5  # committed about max_delay_s after the hand-over
    results: list[bool] = []

    def broken():
        raise ValueError("bad payload")

    writer.submit(EventJob("s1", broken, results.append))
    writer.stop()
    assert results == [False] and writer.failed == 1
