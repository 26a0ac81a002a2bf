"""The SQLite outbox: durable, ordered, bounded with warnings; and end to end across a broker
outage plus a SIGKILL of the publishing process (a real mosquitto, a real child process)."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from runtime_fakes import Collector, write_site

from lineguard.runtime.outbox import Outbox, Pending

HERE = Path(__file__).resolve().parent


def test_put_pending_ack_in_order_and_survives_reopen(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    ids = [box.put(f"t/{i}", f"p{i}".encode(), event_id=f"e{i}") for i in range(5)]
    assert ids == sorted(ids) and box.depth() == 5
    box.ack([ids[1], ids[3]])
    assert [m.topic for m in box.pending()] == ["t/0", "t/2", "t/4"]
    assert [m.id for m in box.pending(after_id=ids[2])] == [ids[4]]
    box.mark_attempt([ids[0]])
    box.close()

    again = Outbox(tmp_path / "o.sqlite")  # a restart finds what was not acknowledged
    rows = again.pending()
    assert [(m.topic, m.payload, m.event_id) for m in rows] == [
        ("t/0", b"p0", "e0"),
        ("t/2", b"p2", "e2"),
        ("t/4", b"p4", "e4"),
    ]
    assert rows[0].attempts == 1 and again.depth() == 3
    again.close()


def test_wal_and_full_sync(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    box.close()


def test_event_and_evidence_commit_together(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    box.put_many([Pending("a/defect", b"{}", event_id="e"), Pending("a/evidence/e", b"\xff")])
    rows = box.pending()
    assert [r.topic for r in rows] == ["a/defect", "a/evidence/e"]
    assert rows[1].payload == b"\xff"
    box.close()


def test_count_bound_drops_oldest_with_a_warning(tmp_path, caplog):
    box = Outbox(tmp_path / "o.sqlite", max_events=10)
    with caplog.at_level(logging.WARNING, logger="lineguard.runtime.outbox"):
        for i in range(13):
            box.put("t", str(i).encode())
    assert box.depth() == 10 and box.dropped == 3
    assert [m.payload for m in box.pending()][:2] == [b"3", b"4"]  # oldest went first
    warnings = [r for r in caplog.records if "dropped the 1 oldest" in r.getMessage()]
    assert len(warnings) == 3
    box.close()


def test_age_bound_drops_expired_with_a_warning(tmp_path, caplog):
    box = Outbox(tmp_path / "o2.sqlite", max_age_h=1.0)
    box.put("old", b"1")
    with sqlite3.connect(tmp_path / "o2.sqlite") as db:  # age one row by two hours
        db.execute("UPDATE outbox SET created = created - 7200")
    box.put("new", b"2")
    with caplog.at_level(logging.WARNING, logger="lineguard.runtime.outbox"):
        assert box.prune_expired() == 1
    assert [m.topic for m in box.pending()] == ["new"] and box.depth() == 1
    assert any("older than 1.0 h" in r.getMessage() for r in caplog.records)
    box.close()


def test_concurrent_writers(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")

    def write(n: int) -> None:
        for i in range(50):
            box.put(f"s{n}", f"{n}-{i}".encode())

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = box.pending(limit=1000)
    assert len(rows) == 200 == box.depth()
    for n in range(4):  # each writer's messages keep their order
        mine = [r.payload for r in rows if r.topic == f"s{n}"]
        assert mine == [f"{n}-{i}".encode() for i in range(50)]
    box.close()


def _spawn(site: Path, prefix: str, count: int, interval: float, log: Path, drain: bool = False):
    args = [sys.executable, str(HERE / "runtime_fakes.py"), str(site), prefix, str(count)]
    args += [str(interval), str(log)] + (["--drain"] if drain else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_sigkill_of_publisher_during_outage_loses_nothing(tmp_path, mosquitto):
    """Child 1 publishes; the broker goes away; child 1 is SIGKILLed while events wait in its
    outbox; the broker returns; child 2 (same outbox) delivers them and its own."""
    site = write_site(
        tmp_path,
        {"host": "127.0.0.1", "port": mosquitto.port, "reconnect_min_s": 1, "reconnect_max_s": 1},
    )
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="kill-collector")
    committed = tmp_path / "committed.log"
    try:
        assert sub.wait_for(lambda c: c.client.is_connected(), 10)
        child = _spawn(site, "0190aaaa-bbbb-7ccc-8ddd-", 400, 0.05, committed)
        deadline = time.monotonic() + 20
        while len(_lines(committed)) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        mosquitto.stop()  # outage: the child keeps committing to its outbox
        while len(_lines(committed)) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        first = _lines(committed)
        assert 60 <= len(first) < 400
        mosquitto.start()
        child2 = _spawn(site, "0190aaaa-bbbb-7ccc-8eee-", 10, 0.01, committed, drain=True)
        _, err = child2.communicate(timeout=60)
        assert child2.returncode == 0, err.decode()[-3000:]
        expected = set(_lines(committed))
        assert len(expected) == len(first) + 10
        assert sub.wait_for(lambda c: expected <= set(c.event_ids()), 20), (
            f"missing {len(expected - set(sub.event_ids()))} of {len(expected)}"
        )
        received = sub.event_ids()
        # Nothing unexpected: at most the one event committed but not yet logged at the kill.
        assert len(set(received) - expected) <= 1
        # Clean stop of child 2 leaves every station offline and the edge offline.
        assert sub.wait_for(lambda c: c.last("lineguard/edge1/available") == b"offline", 5)
        status = sub.last("lineguard/line1/s1/status")
        assert status is not None and b'"state":"offline"' in status
    finally:
        sub.close()


def test_sigkill_with_broker_up_sets_last_will_and_restart_delivers(tmp_path, mosquitto):
    """SIGKILL mid-stream with the broker up: the broker publishes the last will (edge offline,
    retained); the restarted process delivers whatever the first one had not got acknowledged."""
    site = write_site(tmp_path, {"host": "127.0.0.1", "port": mosquitto.port})
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="will-collector")
    committed = tmp_path / "committed.log"
    try:
        assert sub.wait_for(lambda c: c.client.is_connected(), 10)
        child = _spawn(site, "0190aaaa-bbbb-7ccc-9aaa-", 1000, 0.002, committed)
        assert sub.wait_for(lambda c: len(c.event_ids()) >= 30, 20)
        assert sub.last("lineguard/edge1/available") == b"online"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        assert sub.wait_for(lambda c: c.last("lineguard/edge1/available") == b"offline", 10)
        first = set(_lines(committed))
        child2 = _spawn(site, "0190aaaa-bbbb-7ccc-9bbb-", 5, 0.01, committed, drain=True)
        _, err = child2.communicate(timeout=60)
        assert child2.returncode == 0, err.decode()[-3000:]
        expected = set(_lines(committed))
        assert len(expected) == len(first) + 5
        assert sub.wait_for(lambda c: expected <= set(c.event_ids()), 20), (
            f"missing {len(expected - set(sub.event_ids()))} of {len(expected)}"
        )
        assert len(set(sub.event_ids()) - expected) <= 1
    finally:
        sub.close()


def test_sigterm_stops_cleanly(tmp_path, mosquitto):
    """`run_forever` (what `lineguard run` calls) on SIGTERM: exit 0, every event delivered,
    stations and edge marked offline (retained)."""
    site = write_site(tmp_path, {"host": "127.0.0.1", "port": mosquitto.port})
    sub = Collector("127.0.0.1", mosquitto.port, ["lineguard/#"], client_id="term-collector")
    fed = tmp_path / "fed.log"
    try:
        args = [
            sys.executable,
            str(HERE / "runtime_fakes.py"),
            str(site),
            "0190aaaa-bbbb-7ccc-aaaa-",
            "50",
            "0.002",
            str(fed),
            "--run",
        ]
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not fed.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sub.wait_for(lambda c: c.last("lineguard/edge1/available") == b"online", 10)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
        assert child.returncode == 0, err.decode()[-3000:]
        assert b"signal SIGTERM: stopping" in err
        assert sub.wait_for(lambda c: len(set(c.event_ids())) == 50, 10)
        assert sub.wait_for(lambda c: c.last("lineguard/edge1/available") == b"offline", 10)
        assert b'"state":"offline"' in sub.last("lineguard/line1/s1/status")
    finally:
        sub.close()
