"""Back pressure on the event path: memory holds a bounded window, the outbox holds the backlog.

Against a real mosquitto paused with SIGSTOP (connected, but no PUBACK comes back): the publisher
hands paho at most its window, the rest waits in the outbox, and every event arrives once the
broker runs again. paho's own queue limit refuses a publish rather than growing. The writer
frees each event's frame and map once its JPEG is built, and a group never grows with the
backlog (it used to drain the queue up to 256 events, holding all their frames).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
import weakref
from pathlib import Path

from polling import wait_until
from runtime_fakes import Collector, ScriptedStation, write_site

from lineguard.runtime.config_loader import load_site
from lineguard.runtime.event_writer import EventJob, EventWriter
from lineguard.runtime.mqtt import MqttLink
from lineguard.runtime.service import Service
from lineguard.runtime.site_config import BrokerConfig

FAST = {"reconnect_min_s": 1, "reconnect_max_s": 2}


def _events_in_paho(link: MqttLink) -> int:
    """Event messages (defect JSON, evidence JPEG) paho holds right now: its own queue, read
    directly because that is the memory this test is about."""
    messages = list(link._client._out_messages.values())
    return sum(1 for m in messages if m.topic.endswith("/defect") or "/evidence/" in m.topic)


def test_paused_broker_keeps_the_backlog_in_the_outbox_and_loses_nothing(tmp_path, mosquitto):
    site = write_site(tmp_path, {"host": "127.0.0.1", "port": mosquitto.port, **FAST})
    service = Service(
        load_site(site, check_files=False), station_factory=ScriptedStation, strict_schemas=True
    )
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="bp-collector")
    paused = False
    try:
        assert sub.wait_for(lambda c: c.client.is_connected(), 10)
        service.start()
        assert service.link.wait_connected(10)
        station: ScriptedStation = service.slots["s1"].station
        publisher, link = service.publisher, service.link
        assert publisher.window == link.max_inflight < link.max_queued
        for _ in range(5):
            station.feed(2.0, with_jpeg=True)
        assert sub.wait_for(lambda c: len(c.event_ids()) >= 5, 20)
        assert wait_until(lambda: service.outbox.depth() == 0, 20.0)

        os.kill(mosquitto.proc.pid, signal.SIGSTOP)  # up, connected, silent
        paused = True
        n = 4 * publisher.window  # events, each with its evidence: 2 rows
        most_in_paho = 0
        for _ in range(n):
            station.feed(3.0, with_jpeg=True)
            most_in_paho = max(most_in_paho, _events_in_paho(link))
        # The publisher tops its window up while at most `refill_at` rows are unacknowledged,
        # then waits for PUBACKs that do not come.
        assert wait_until(lambda: publisher.in_flight > publisher.refill_at, 20.0)
        most_in_paho = max(most_in_paho, _events_in_paho(link))
        assert most_in_paho <= publisher.window
        assert publisher.refill_at < publisher.peak_in_flight <= publisher.window
        assert service.outbox.depth() == 2 * n  # the backlog is on disk, nothing acknowledged

        os.kill(mosquitto.proc.pid, signal.SIGCONT)
        paused = False
        expected = 5 + n
        assert sub.wait_for(lambda c: len(set(c.event_ids())) >= expected, 60)
        assert wait_until(lambda: service.outbox.depth() == 0, 30)
        ids = sub.event_ids()
        assert len(set(ids)) == expected
        assert len(ids) - len(set(ids)) <= publisher.window  # re-sends only, bounded
        evidence = [t for t in list(sub.by_topic) if "/evidence/" in t]
        assert len(evidence) == expected
        assert publisher.peak_in_flight <= publisher.window
    finally:
        if paused:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        service.stop()
        sub.close()


def test_paho_queue_limit_refuses_quietly_and_delivers_what_it_took(tmp_path, mosquitto, caplog):
    cfg = BrokerConfig(host="127.0.0.1", port=mosquitto.port, **FAST)
    link = MqttLink(cfg, "cap-test", "lineguard/cap/available")
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/cap/x"], client_id="cap-collector")
    paused = False
    try:
        assert sub.wait_for(lambda c: c.client.is_connected(), 10)
        link.start()
        assert link.wait_connected(10)
        probe = link.publish("lineguard/cap/probe", b"p")
        probe.wait_for_publish(10)  # acknowledged after `online`: paho's queue is empty now
        assert probe.is_published()

        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        paused = True
        with caplog.at_level(logging.WARNING, logger="lineguard.runtime.mqtt"):
            infos = [
                link.publish("lineguard/cap/x", b"%d" % i) for i in range(link.max_queued + 20)
            ]
        taken = [i for i in infos if i is not None]
        assert len(taken) == link.max_queued  # paho's limit, then refusals: no growth
        assert all(i is None for i in infos[link.max_queued :])
        assert not caplog.records  # back pressure, not an error

        os.kill(mosquitto.proc.pid, signal.SIGCONT)
        paused = False
        for info in taken:
            info.wait_for_publish(30)
            assert info.is_published()
        assert sub.wait_for(lambda c: len(c.by_topic["lineguard/cap/x"]) >= len(taken), 20)
        assert sorted(int(p) for p in sub.by_topic["lineguard/cap/x"]) == list(range(len(taken)))
    finally:
        if paused:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        link.stop()
        sub.close()


class _Frame:
    """Stands in for a frame and its map: what a handed-over job keeps alive."""


def test_writer_frees_each_frame_once_built() -> None:
    refs: list[weakref.ref] = []
    alive_at_commit: list[int] = []

    def commit(batch) -> None:
        gc.collect()
        alive_at_commit.extend(p["n"] for _, p, _ in batch if refs[p["n"]]() is not None)

    writer = EventWriter(commit, max_delay_s=0.05).start()
    for n in range(40):
        frame = _Frame()
        refs.append(weakref.ref(frame))
        writer.submit(EventJob("s1", lambda n=n, f=frame: ({"n": n}, b"jpeg")))
        del frame
    writer.stop()
    assert writer.committed == 40
    assert alive_at_commit == []  # a group holds payloads and JPEGs, not frames


def test_writer_group_does_not_grow_with_the_backlog() -> None:
    """A writer slower than its stations: each group takes what waited when the previous commit
    ended (max_delay_s = 0), at most the queue plus the one blocked hand-over, never the
    backlog up to max_batch; every event is committed once, in order."""
    groups: list[list[int]] = []
    capacity = 4

    def build(n: int):
        time.sleep(0.005)  # the evidence encode
        return {"n": n}, None

    writer = EventWriter(
        lambda batch: groups.append([p["n"] for _, p, _ in batch]),
        max_delay_s=0.0,
        capacity=capacity,
    ).start()

    def station() -> None:
        for n in range(120):
            writer.submit(EventJob("s1", lambda n=n: build(n)))

    t = threading.Thread(target=station)
    t.start()
    t.join(60)
    writer.stop()
    assert [n for g in groups for n in g] == list(range(120))
    assert max(len(g) for g in groups) <= capacity + 1
    assert writer.waits > 0  # the writer really was behind


def test_default_publisher_window_is_paho_in_flight_limit(tmp_path: Path) -> None:
    from lineguard.runtime.outbox import Outbox
    from lineguard.runtime.publisher import OutboxPublisher

    link = MqttLink(BrokerConfig(host="127.0.0.1", port=1), "w", "lineguard/w/available")
    box = Outbox(tmp_path / "o.sqlite")
    try:
        pub = OutboxPublisher(box, link)
        assert pub.window == link.max_inflight and 0 < pub.refill_at < pub.window
        assert link.max_queued > link.max_inflight
    finally:
        box.close()
