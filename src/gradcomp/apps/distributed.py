"""Data-parallel runs: ``torch.multiprocessing`` spawn on one machine, or torchrun anywhere.

No launcher of our own: ``launch_local`` spawns N processes with torch's own
``torch.multiprocessing`` and a free TCP port on localhost; under ``torchrun`` (e.g.
``torchrun --nnodes 2 --nproc_per_node 4 --rdzv_endpoint HOST:PORT -m gradcomp.apps.cli train
--fsdp ...``) each process is one rank: ``running_under_torchrun`` detects it and the
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) is read by ``init_process_group``. Both paths
run the same ``worker_main``, so with equal seeds and thread counts they train bit for bit alike.

Failures end in one line per rank: a rank whose run raises prints
``gradcomp train: rank R: error: ...`` and exits with code 2 (bad input, ranks that disagree)
or 1 (a peer that stopped answering, or an FSDP run that asked for compression and did not
get it); the launcher then ends the other workers (a stopped one
included) and returns that code. Ctrl-C reaches every worker, which stops after its current step
(see ``train``); the launcher returns 130.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

__all__ = ["finished", "launch_local", "worker_main", "running_under_torchrun",
           "validate_comm_args",
           "EXIT_INTERRUPTED"]

EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT stop
_GRACE = 5.0  # seconds the other workers get to end on their own after one failed


_RANK_VARS = ("RANK", "WORLD_SIZE")
_GROUP_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def running_under_torchrun() -> bool:
    """True when a launcher started this process as one rank of a group: torchrun (its
    ``TORCHELASTIC_RUN_ID``), or any launcher that sets torch's ``env://`` variables (RANK and
    WORLD_SIZE). Such a process joins that group (``worker_main``) and spawns nothing; the
    device of a CUDA run is ``cuda:LOCAL_RANK``.

    Raises ValueError when RANK or WORLD_SIZE is set but not all of RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT (a half-set environment would otherwise train alone, silently).
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    if not any(v in os.environ for v in _RANK_VARS):
        return False
    missing = [v for v in _GROUP_VARS if v not in os.environ]
    if missing:
        present = [v for v in _GROUP_VARS if v in os.environ]
        raise ValueError(f"the environment sets {', '.join(present)} but not "
                         f"{', '.join(missing)}: a launched rank needs all of "
                         f"{', '.join(_GROUP_VARS)} (torchrun sets them); unset "
                         f"{', '.join(present)} to train in one process or with --nproc N")
    return True


def _backend(cfg, backend: str | None) -> str:
    if backend:
        return backend
    return "nccl" if str(cfg.device).startswith("cuda") and torch.cuda.is_available() else "gloo"


def validate_comm_args(method: str, options: dict, fsdp: bool = False) -> None:
    """Raise ValueError now (in the launching process, before any worker starts) for a
    communication method or options that every worker would refuse: a DDP communication hook,
    or with ``fsdp`` an FSDP reduce-scatter (``integration.fsdp.validate_fsdp_comm``)."""
    if fsdp:
        from gradcomp.integration.fsdp import validate_fsdp_comm

        validate_fsdp_comm(method, dict(options))
        return
    from gradcomp.integration.ddp_hooks import validate_comm

    validate_comm(method, dict(options))


def worker_main(cfg, backend: str | None = None, hook=None):
    """Run ``train(cfg)`` as one rank of an already configured process group environment.

    Collectives give up after ``cfg.timeout`` seconds without an answer from a peer."""
    from gradcomp.apps.train import train

    dist.init_process_group(_backend(cfg, backend),
                            timeout=datetime.timedelta(seconds=float(cfg.timeout)))
    try:
        if dist.get_rank() != 0:
            cfg.progress = False
        return train(cfg, hook)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, cfgs, backend, hooks):
    from gradcomp.apps.train import CompressionNotAppliedError, PeerTimeoutError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        worker_main(cfgs[rank], backend, hooks[rank] if hooks else None)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        _say(f"gradcomp train: rank {rank}: error: {exc}")
        os._exit(2)
    except (PeerTimeoutError, CompressionNotAppliedError) as exc:  # the message names the rank
        _say(f"gradcomp train: error: {exc}")
        os._exit(1)
    finished(0)


def finished(code: int) -> None:
    """End a rank's process that has done its work (process group destroyed, files closed)
    without the interpreter's teardown: torch's C++ teardown of such a process sometimes
    aborted ("terminate called without an active exception", a thread still joinable) on a
    loaded machine, turning a finished run into a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say(line: str) -> None:
    """One line to stderr in one write: the ranks share the stream, and print's separate write
    of the newline lets another rank's line land in between."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(cfg, nproc: int, backend: str | None = None, hooks=None) -> int:
    """Spawn ``nproc`` workers on this machine (gloo on CPU, NCCL on GPU) and wait for them.

    ``cfg``: one TrainConfig for every rank, or a list of ``nproc`` (one per rank, as torchrun
    with per-rank arguments would give; the ranks then refuse together unless they agree).
    ``hooks``: optional per-rank ``StepHook`` list (must be picklable). Returns the exit code:
    0, 2 (a rank refused its input), 1 (a rank failed or a peer stopped answering) or 130
    (interrupted by Ctrl-C; the last checkpoint is kept)."""
    import torch.multiprocessing as mp

    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg] * nproc
    if len(cfgs) != nproc:
        raise ValueError(f"launch_local: {len(cfgs)} configs for nproc={nproc}")
    import signal
    import threading

    # The launcher records a Ctrl-C with its own handler instead of a KeyboardInterrupt: an
    # exception can land anywhere in the wait loop (or inside torch's join) and be lost, and
    # the workers, which got the SIGINT too and stop after their step, exit 0 like a finished
    # run; the flag is what makes the exit code 130.
    got = {"sigint": False}
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGINT, lambda *_: got.__setitem__("sigint", True))
    try:
        ctx = mp.start_processes(_spawned, args=(nproc, _free_port(), cfgs, backend, hooks),
                                 nprocs=nproc, join=False, start_method="spawn")
        while True:
            try:
                # True when all ended; raises when one failed, after ending the others
                # (SIGTERM after the grace period, then SIGKILL: a stopped worker ignores
                # SIGTERM)
                if ctx.join(timeout=1.0, grace_period=_GRACE):
                    break
            except mp.ProcessExitedException as exc:
                return exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1
            except Exception as exc:  # noqa: BLE001 - a worker raised: show its traceback
                _say(f"gradcomp train: a worker failed:\n{exc}")
                return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    return EXIT_INTERRUPTED if got["sigint"] else 0
