"""Helpers of the FSDP tests and benchmark: a small digits MLP trained with ``setup_fsdp`` on
gloo workers, with optional DCP save / load in the middle of a run."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _ddp_worker import digits_split, free_port

from gradcomp.apps.distributed import finished
from gradcomp.integration import fsdp as F


def mlp(seed: int, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10))


def full_weights(model) -> torch.Tensor:
    """The unsharded parameters, flat (a collective)."""
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])


def train(method: str, options: dict, rank: int, world: int, steps: int, *, start: int = 0,
          init_seed: int = 0, ckpt: str | None = None, save_at: int | None = None,
          load: bool = False, lr: float = 0.1, batch: int = 64) -> dict:
    """Train the MLP for steps [start, steps) (step t's batch depends only on (t, rank)).

    load: read ``ckpt`` first (the start step comes from its extra); save_at: write ``ckpt``
    after that many steps and stop there."""
    xs, ys, xt, yt = digits_split(rank, world)
    model, comm = F.setup_fsdp(mlp(init_seed), method, options, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if load:
        extra = F.load_sharded(ckpt, model, opt, comm)
        start = extra["step"]
    losses = []
    stop = steps if save_at is None else save_at
    for t in range(start, stop):
        g = torch.Generator().manual_seed(1000 * t + rank)
        idx = torch.randint(len(ys), (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if save_at is not None:
        F.save_sharded(ckpt, model, opt, comm, extra={"step": save_at})
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return {"losses": losses, "full": full_weights(model), "metrics": comm.metrics(),
            "acc": acc, "required": require(comm)}


def require(comm, min_ratio: float = 1.5) -> str:
    """"ok" or the message of ``comm.require_compressed``."""
    try:
        comm.require_compressed(min_ratio)
        return "ok"
    except RuntimeError as e:
        return str(e)


def _run(rank, world, port, outdir, fn_name, kwargs):
    torch.set_num_threads(1)
    os.environ["GRADCOMP_COMPILE"] = "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        import importlib

        mod_name, fn = fn_name.rsplit(":", 1)
        result = getattr(importlib.import_module(mod_name), fn)(rank, world, **kwargs)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # done: end without the interpreter's teardown, whose C++ part sometimes aborted a finished
    # rank on a loaded machine ("terminate called without an active exception": CI failed
    # test_fsdp.py's DCP resume test so once), as the package's own ranks end
    finished(0)


def spawn(fn_name: str, outdir, world: int = 2, **kwargs) -> list:
    """Run ``module:function(rank, world, **kwargs)`` on ``world`` fresh gloo workers."""
    mp.spawn(_run, args=(world, free_port(), str(outdir), fn_name, kwargs), nprocs=world,
             join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]
