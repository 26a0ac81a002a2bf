"""Data-parallel CPU training: the default rule, a real two-process run, and a failing rank.

The two-process test spawns real ranks (gloo over loopback) on generated images: they must
split each epoch between them, stop within the budget together and ship a model that
separates synthetic defects from normal validation images.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic_parts import tiny_config
from test_train_budget import _folders

from lineguard.runtime.errors import LineGuardError
from lineguard.train.auto_recipe import cpu_hardware
from lineguard.train.checkpoint import read_checkpoint
from lineguard.train.cli import train_and_report
from lineguard.train.cpu_parallel import launch, wants_processes


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_rule_keeps_a_step_batch_of_eight_and_never_oversubscribes(cores) -> None:
    hw = cpu_hardware(cores)
    assert hw["processes"] * hw["batch_size"] == 8
    assert hw["processes"] * (hw["threads"] + hw["num_workers"]) <= max(cores, 1)
    assert hw["threads"] >= 1
    if cores >= 2:
        assert hw["processes"] == 2


def test_only_a_cpu_run_outside_a_launcher_spawns(tmp_path, monkeypatch) -> None:
    data = _folders(tmp_path / "data", 2)
    assert wants_processes(tiny_config(data, tmp_path / "o", processes=2))
    assert not wants_processes(tiny_config(data, tmp_path / "o", processes=1))
    assert not wants_processes(tiny_config(data, tmp_path / "o", processes=2, device="cuda"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a rank (torchrun, or launch itself)
    assert not wants_processes(tiny_config(data, tmp_path / "o", processes=2))


@pytest.mark.slow
def test_two_processes_share_each_epoch_and_finish_within_the_budget(tmp_path, capfd) -> None:
    per_class = 24
    cfg = tiny_config(
        _folders(tmp_path / "data", per_class),
        tmp_path / "out",
        budget="25s",
        proxy_evals=4,
        val_min=4,
        processes=2,
        batch_size=4,
        threads=1,
    )
    launch(cfg, train_and_report, False)
    ckpt = read_checkpoint(tmp_path / "out" / "final.pt")
    m = ckpt["metrics"]
    assert m["processes"] == 2
    assert m["budget_s"] == 25 and m["wall_time_s"] <= 25.0
    # rank 0 saw half of each epoch: (2 classes x (24 - 4 val)) / 2 ranks / batch 4
    train_images = len(ckpt["split"]["train"])
    assert train_images == 2 * (per_class - 4)
    full_epochs = m["history"][:-1]  # the last one was cut by the budget
    assert full_epochs, "the budget should hold more than one epoch"
    assert all(row["steps"] == math.ceil(train_images / 2 / 4) for row in full_epochs)
    # the ranks stopped together (a rank left behind would hang the final barrier) and the
    # shipped model learned to separate synthetic defects on validation images
    assert max(p["val_proxy"] for p in m["curve"]) > 0.6
    # DDP's layout warning about the refiner head (bf16 CPUs) is not shown to users
    assert "Grad strides" not in capfd.readouterr().err


def _fail_on_rank_one(cfg, progress: bool) -> None:
    import os

    if os.environ["RANK"] == "1":
        raise LineGuardError("rank one cannot read its images")


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_its_message(tmp_path) -> None:
    cfg = tiny_config(_folders(tmp_path / "data", 2), tmp_path / "out", processes=2)
    with pytest.raises(LineGuardError, match="rank one cannot read its images"):
        launch(cfg, _fail_on_rank_one, False)


def _sleep_as_a_rank(cfg, progress: bool) -> None:
    """A rank that records its pid and then waits (as a long training would)."""
    import os
    import time
    from pathlib import Path

    Path(cfg.out_dir, f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(300)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # an unreaped zombie no longer runs


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_ranks_end_when_the_launcher_is_killed(tmp_path) -> None:
    """`kill` of `lineguard train` alone (not its process group) must not leave the ranks
    training on as orphans that hold the cores."""
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import sys; sys.path[:0] = [{tests!r}, {here!r}]\n"
        "from synthetic_parts import tiny_config\n"
        "from test_train_budget import _folders\n"
        "from test_train_cpu_parallel import _sleep_as_a_rank\n"
        "from lineguard.train.cpu_parallel import launch\n"
        "from pathlib import Path\n"
        "cfg = tiny_config(_folders(Path({data!r}), 2), Path({out!r}), processes=2)\n"
        "launch(cfg, _sleep_as_a_rank, False)\n"
    ).format(
        tests=str(Path(__file__).parents[1]),
        here=str(Path(__file__).parent),
        data=str(tmp_path / "data"),
        out=str(out),
    )
    launcher = subprocess.Popen([sys.executable, "-c", script])
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
            pids = [int(p.read_text()) for p in out.glob("rank*.pid") if p.read_text()]
        assert len(pids) == 2, "both ranks should have started"
        launcher.send_signal(signal.SIGKILL)  # no handler of the launcher's can run
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "a rank outlived its launcher"
    finally:
        launcher.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
