"""Data-parallel training on the cores of ONE CPU machine: ``processes`` ranks over gloo.

Why: the CPU recipe's matrices are small (64 tokens of width 128, batch 8), so a second torch
thread in one process gains nothing (0.299 vs 0.312 s per step, lite0 128 px fp32, 2-core AVX2),
while two processes of one thread each run side by side at full speed (0.27-0.28 s each for
batch 8; 0.154 s for batch 4). Splitting the batch of 8 over two ranks of 4 therefore buys
1.3-1.5x the optimizer steps in the same wall-clock budget (synthesis and the evaluations take
the rest), with the same recipe (``benchmarks/results/train_processes_mtd.json``).

``lineguard train`` calls :func:`launch` when ``processes > 1`` and it is not already inside
``torchrun``; each rank joins the gloo group through the usual environment variables, so the
trainer takes the same path as under ``torchrun`` (rank 0's clock decides; rank 0 evaluates and
writes the checkpoints).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lineguard.train.train_config import TrainConfig


def world_size() -> int:
    """Ranks of the process group this process belongs to (1 outside torchrun / :func:`launch`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def inside_launcher() -> bool:
    """True in a rank started by torchrun or by :func:`launch` (do not launch again)."""
    return world_size() > 1


def wants_processes(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` asks for several CPU ranks that do not exist yet."""
    if cfg.processes <= 1 or inside_launcher():
        return False
    if cfg.device == "cuda":
        return False
    if cfg.device == "auto":
        import torch

        return not torch.cuda.is_available()
    return True


def free_port() -> int:
    """A free TCP port on the loopback interface for the gloo rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Ask Linux to end this rank when the launching process dies.

    Why: Ctrl-C reaches every rank through the terminal's process group, but a ``kill`` of
    ``lineguard train`` alone (a service manager, a script's timeout) left both ranks training
    on as orphans, holding the cores for the rest of their budget (seen in session 14).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _rank_main(
    rank: int,
    world: int,
    port: int,
    threads: int,
    body: Callable[..., None],
    cfg: TrainConfig,
    progress: bool,
    extra: tuple,
) -> None:
    """Entry point of one spawned rank: join the group through the environment, then train."""
    _die_with_parent()
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads),
        }
    )
    body(cfg, progress and rank == 0, *extra)


def launch(cfg: TrainConfig, body: Callable[..., None], progress: bool, *extra) -> None:
    """Run ``body(cfg, progress, *extra)`` in ``cfg.processes`` spawned ranks; raise if one fails.

    ``body`` must be a module-level function (spawn pickles it). A rank's exception ends every
    rank and comes back as a :class:`LineGuardError` with the failing rank's last line.
    """
    import torch.multiprocessing as mp

    from lineguard.runtime.errors import LineGuardError

    threads = cfg.threads or 1
    try:
        mp.start_processes(
            _rank_main,
            args=(cfg.processes, free_port(), threads, body, cfg, progress, extra),
            nprocs=cfg.processes,
            start_method="spawn",
            join=True,
        )
    except mp.ProcessRaisedException as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "no message"
        raise LineGuardError(f"a training process failed: {last}") from None
    except mp.ProcessExitedException as exc:
        raise LineGuardError(f"a training process died: {exc}") from None
