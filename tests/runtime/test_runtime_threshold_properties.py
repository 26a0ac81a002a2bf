"""Issue 14: property-based tests (Hypothesis) for threshold commands and station files.

Any command is either refused with a message on `threshold/error` (nothing changed, audited or
echoed) or applied exactly (state, audit and echo all equal the requested values); any station
file threshold is either refused by the loader naming the key or loaded exactly; whatever was
accepted, the station keeps alerting on a defective frame."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from runtime_fakes import linked_service, write_site

from lineguard.runtime import events as ev
from lineguard.runtime.config_loader import ConfigError, load_station
from lineguard.runtime.pipeline import Pipeline, Thresholds
from lineguard.runtime.threshold_limits import AREA_MAX, SCORE_MAX

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
START = {"image": 1.0, "pixel": 0.8, "min_area_px": 10}

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2, max_value=SCORE_MAX + 2),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-3, max_value=AREA_MAX + 3),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)
commands = st.fixed_dictionaries(
    {},
    optional={
        "image": numbers,
        "pixel": numbers,
        "min_area_px": numbers,
        "shadow": st.one_of(st.booleans(), numbers),
        "clear_shadow": st.booleans(),
        "by": st.one_of(st.text(max_size=3), numbers),
        "reason": st.text(max_size=3),
        "request_id": st.text(max_size=3),
        "schema_version": st.sampled_from([1, 2]),
        "extra": st.integers(),
    },
)

valid = st.fixed_dictionaries(
    {
        "image": st.floats(min_value=1e-9, max_value=SCORE_MAX),
        "by": st.text(min_size=1, max_size=3),
        "reason": st.text(min_size=1, max_size=3),
    },
    optional={
        "pixel": st.one_of(st.floats(min_value=1e-9, max_value=SCORE_MAX), numbers),
        "min_area_px": st.integers(min_value=1, max_value=AREA_MAX),
        "shadow": st.booleans(),
    },
)
commands = st.one_of(commands, valid)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with linked_service(tmp_path_factory.mktemp("site")) as svc:
        yield svc


def _not_json(literal: str):
    raise AssertionError(f"{literal} was published")


def _encode(cmd: dict) -> bytes:
    # Python's json writes NaN/Infinity literals; big ints as digits: what a client may send.
    return json.dumps(cmd).encode()


def _expected(before: dict, cmd: dict) -> dict:
    values = {k: cmd[k] for k in ("image", "pixel", "min_area_px") if k in cmd}
    return {k: (int(v) if k == "min_area_px" else float(v)) for k, v in values.items()}


@SETTINGS
@given(cmd=commands)
def test_any_command_is_refused_with_a_message_or_applied_exactly(service, cmd):
    station = service.slots["s1"].station
    station.set_thresholds(**START)
    station.set_shadow(None)
    link = service.link
    link.sent.clear()
    audited = len(service.audit.entries())
    applied = service.handle_threshold_command("s1", _encode(cmd))
    event("applied" if applied else "refused")
    if applied:
        assert link.json("/threshold/error") == []
        (state,) = link.json("/threshold/state")
        want = _expected(START, cmd)
        target = state["shadow"] if cmd.get("shadow") else state["active"]
        for k, v in want.items():
            assert target[k] == v and type(target[k]) is type(v)
        if not cmd.get("shadow"):
            assert station.thresholds() == {**START, **want}
        assert len(service.audit.entries()) == audited + 1
        assert ev.schema_errors("threshold_state", state) == []
    else:
        (error,) = link.json("/threshold/error")
        assert error["error"] and ev.schema_errors("threshold_error", error) == []
        assert station.thresholds() == START and station.shadow() is None
        assert link.json("/threshold/state") == [] and len(service.audit.entries()) == audited
    for _topic, payload, _ in link.sent:  # strict JSON only: no NaN/Infinity literal ever sent
        json.loads(payload, parse_constant=_not_json)
    # Whatever happened, a frame scoring above every allowed threshold still alerts.
    assert station.feed(SCORE_MAX + 1.0) is True


@SETTINGS
@given(raw=st.binary(max_size=64))
def test_any_bytes_get_an_answer(service, raw):
    service.link.sent.clear()
    applied = service.handle_threshold_command("s1", raw)
    assert applied or not raw or len(service.link.json("/threshold/error")) == 1


yaml_values = st.one_of(
    st.sampled_from([".nan", ".inf", "-.inf", "0", "-1", "1e308", "'1.0'", "true", "null", "[]"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(min_value=-5, max_value=2 * AREA_MAX).map(str),
)


@SETTINGS
@given(image=yaml_values, pixel=yaml_values, area=yaml_values)
def test_station_file_thresholds_refused_with_key_or_loaded_exactly(
    tmp_path_factory, image, pixel, area
):
    folder = tmp_path_factory.mktemp("st")
    write_site(folder, None)
    path = folder / "stations" / "s1.yaml"
    text = path.read_text().replace(
        "thresholds: {image: 1.0, pixel: 0.8, min_area_px: 10}",
        f"thresholds: {{image: {image}, pixel: {pixel}, min_area_px: {area}}}",
    )
    path.write_text(text)
    try:
        cfg = load_station(path, check_files=False)
    except ConfigError as exc:
        assert "thresholds." in str(exc)
        return
    t = cfg.thresholds
    for value in (t.image, t.pixel):
        assert value is None or (math.isfinite(value) and 0 < value <= SCORE_MAX)
    assert isinstance(t.min_area_px, int) and 1 <= t.min_area_px <= AREA_MAX


class _Engine:
    """A model whose map and score are `value` everywhere: a defect covering the frame."""

    def __init__(self, value: float, size: int = 16) -> None:
        norm = SimpleNamespace(center=0.0, scale=1.0)
        self.card = SimpleNamespace(
            input_size=[size, size],
            score_normalization=SimpleNamespace(image=norm, pixel=norm),
            resize="cv2-area",
        )
        self.value, self.size = value, size

    def encode_prompt(self, rgb):
        return np.zeros((1, 4, 3), np.float32)

    def detect(self, rgb, tokens):
        return np.full((self.size, self.size), self.value, np.float32), self.value


@SETTINGS
@given(
    image=st.floats(min_value=1e-9, max_value=SCORE_MAX),
    pixel=st.floats(min_value=1e-9, max_value=SCORE_MAX),
    area=st.integers(min_value=1, max_value=AREA_MAX),
)
def test_pipeline_alerts_on_a_defect_for_every_accepted_threshold(image, pixel, area):
    frame = np.zeros((32, 32, 3), np.uint8)
    try:
        pipe = Pipeline(_Engine(SCORE_MAX + 1.0), frame, thresholds=Thresholds(1.0, 1.0, 1))
        pipe.set_thresholds(image=image, pixel=pixel, min_area_px=area)
    except ValueError as exc:
        assert area > 16 * 16 and "min_area_px" in str(exc)
        return
    assert pipe.process(frame).defective
