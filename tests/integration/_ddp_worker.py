"""Helpers for the 2-process gloo tests: spawn with a free port, tasks run in each worker.

One spawn runs every distributed check (starting processes costs seconds on a shared CPU);
each worker saves a dict of results that the tests read.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcomp.apps.distributed import finished
from gradcomp.integration import ddp_hooks as H

METHODS = ["allreduce", "fp16", "powersgd", "qsgd", "qsgd_bits", "topk", "scalecom", "prune", "fp",
           "block_mxfp8", "block_nvfp4"]
HOOK_KW = {
    "allreduce": ("allreduce", {}),
    "fp16": ("fp16", {}),
    "powersgd": ("powersgd", {"matrix_approximation_rank": 2}),
    "qsgd": ("qsgd", {"levels": 8, "bucket_size": 256}),
    "qsgd_bits": ("qsgd", {"levels": 8, "bucket_size": 256, "bitstream": True}),
    "topk": ("topk", {"ratio": 0.1}),
    "scalecom": ("scalecom", {"ratio": 0.1}),
    "prune": ("prune", {"sparsity": 0.8}),
    "fp": ("fp", {"fmt": "e4m3fn", "compile": False}),
    # "fp" with a block format name builds the same BlockCompress as "block"
    "block_mxfp8": ("fp", {"fmt": "mxfp8_e4m3", "compile": False}),
    "block_nvfp4": ("block", {"fmt": "nvfp4", "compile": False}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeBucket:
    """The part of ``dist.GradBucket`` gradcomp's hook uses (buffer, index, is_last, parameters)."""

    def __init__(self, buf, index=0, last=True):
        self._buf, self._index, self._last = buf, index, last

    def buffer(self):
        return self._buf

    def index(self):
        return self._index

    def is_last(self):
        return self._last

    def parameters(self):
        return [self._buf]


def digits_split(rank: int, world: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    ntest = 360
    xt, yt, xs, ys = x[:ntest], y[:ntest], x[ntest:], y[ntest:]
    return xs[rank::world], ys[rank::world], xt, yt


def train_digits(name: str, rank: int, world: int, epochs: int = 6, batch: int = 32):
    """Train a 64-64-10 MLP with DDP and the named hook; returns (accuracy, flat params, state)."""
    xs, ys, xt, yt = digits_split(rank, world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    ddp = DDP(model, bucket_cap_mb=0.01)  # several small buckets: exercises bucket indices
    method, kw = HOOK_KW[name]
    state, hook = H.make_comm_hook(method, **kw)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1 + rank)
    for _ in range(epochs):
        perm = torch.randperm(len(ys), generator=g)
        for i in range(0, len(ys) - batch + 1, batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(xs[idx]), ys[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return acc, flat, state


def _run(rank: int, world: int, port: int, outdir: str, fn_name: str):
    torch.set_num_threads(1)
    # eager FP / pruning kernels: buckets are tiny and a torch.compile per size costs seconds
    os.environ["GRADCOMP_COMPILE"] = "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        import importlib

        mod_name, fn = fn_name.rsplit(":", 1)
        result = getattr(importlib.import_module(mod_name), fn)(rank, world)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # done: end without the interpreter's teardown, whose C++ part sometimes aborted a finished
    # rank on a loaded machine ("terminate called without an active exception": CI failed
    # test_fsdp.py's DCP resume test so once), as the package's own ranks end
    finished(0)


def spawn(fn_name: str, outdir: str, world: int = 2) -> list:
    """Run ``module:function(rank, world)`` on ``world`` gloo workers; return their results."""
    mp.spawn(_run, args=(world, free_port(), str(outdir), fn_name), nprocs=world, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]
