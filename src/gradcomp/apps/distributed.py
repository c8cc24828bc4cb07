"""Data-parallel runs: ``torch.multiprocessing`` spawn on one machine, or torchrun anywhere.

No launcher of our own: ``launch_local`` spawns N processes with torch's own
``torch.multiprocessing.spawn`` and a free TCP port on localhost; under ``torchrun`` the
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) is read by ``init_process_group``.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

__all__ = ["launch_local", "worker_main", "running_under_torchrun"]


def running_under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    )


def _backend(cfg, backend: str | None) -> str:
    if backend:
        return backend
    return "nccl" if str(cfg.device).startswith("cuda") and torch.cuda.is_available() else "gloo"


def worker_main(cfg, backend: str | None = None):
    """Run ``train(cfg)`` as one rank of an already configured process group environment."""
    from gradcomp.apps.train import train

    dist.init_process_group(_backend(cfg, backend))
    try:
        if dist.get_rank() != 0:
            cfg.progress = False
        return train(cfg)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, cfg, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    worker_main(cfg, backend)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(cfg, nproc: int, backend: str | None = None) -> None:
    """Spawn ``nproc`` workers on this machine (gloo on CPU, NCCL on GPU) and wait for them."""
    import torch.multiprocessing as mp

    mp.spawn(_spawned, args=(nproc, _free_port(), cfg, backend), nprocs=nproc, join=True)
