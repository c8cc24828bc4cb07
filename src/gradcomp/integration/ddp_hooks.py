"""DDP communication hooks for the gradient compressors of ``gradcomp.compressors.comm``.

Usage (torch conventions)::

    state, hook = make_comm_hook("qsgd", levels=16, bucket_size=512)
    ddp_model.register_comm_hook(state, hook)
    ...
    state.metrics()  # bytes sent, compression ratio against an fp32 all-reduce

Every hook is ``hook(state, bucket) -> torch.futures.Future[torch.Tensor]`` whose value is the
bucket's *average* gradient over the ranks, identical on every rank (each rank decodes the same
gathered payloads in rank order, or receives the same all-reduce result).

Why the first iterations are plain all-reduce (``start_iter``, default 2, as in torch's PowerSGD):
DDP rebuilds its buckets after the first iteration, so a bucket index may name a different set
of parameters afterwards; error-feedback memory is keyed by bucket index and must only be
created after the rebuild. A memory whose size no longer matches its bucket raises.

Bytes are counted from the tensors actually handed to the collectives (each rank's own
contribution: payload bytes, plus the 8-byte size exchanged before a variable-size all-gather);
``dense_bytes`` is what an fp32 all-reduce of the same buckets would contribute (4 per element).
The file deliberately has no ``from __future__ import annotations``: DDP checks the ``bucket``
annotation of a hook by identity.
"""

import hashlib
import inspect
import json

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as _psgd

from gradcomp.compressors.comm import (
    QSGD,
    Aggregation,
    CommCompressor,
    ErrorFeedback,
    FPQuantize,
    ScaleCom,
    StochasticPrune,
    TopK,
    require_aggregation,
)

__all__ = [
    "CommHookState",
    "TorchHookState",
    "allgather_hook",
    "allreduce_hook",
    "available_methods",
    "check_same_config",
    "fp16_hook",
    "fp_hook",
    "make_comm_hook",
    "powersgd_hook",
    "prune_hook",
    "qsgd_hook",
    "scalecom_hook",
    "topk_hook",
]


def _completed(t: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(t)
    return fut


def check_same_config(config: dict, process_group=None) -> str:
    """All-gather a hash of ``config`` and raise ValueError if any rank's differs.

    Every rank must call it (it is a collective). Returns the hash. The error names each rank's
    configuration so the mismatch is visible on every rank.
    """
    text = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    world = dist.get_world_size(process_group)
    gathered = [None] * world
    dist.all_gather_object(gathered, (digest, config), group=process_group)
    if len({h for h, _ in gathered}) > 1:
        lines = "; ".join(f"rank {r}: {c}" for r, (_, c) in enumerate(gathered))
        raise ValueError(f"ranks registered different comm-hook configurations: {lines}")
    return digest


class _Counters:
    """Bytes per step and in total; a step ends on the last bucket of an iteration."""

    def __init__(self):
        self.iter = 0
        self.bytes_sent = 0
        self.dense_bytes = 0
        self.step_bytes = 0
        self.step_dense = 0
        self.last_step = (0, 0)  # (bytes sent, dense bytes) of the last finished iteration

    def count(self, bucket, sent: int) -> None:
        dense = 4 * bucket.buffer().numel()
        self.bytes_sent += sent
        self.dense_bytes += dense
        self.step_bytes += sent
        self.step_dense += dense
        if bucket.is_last():
            self.last_step = (self.step_bytes, self.step_dense)
            self.step_bytes = self.step_dense = 0
            self.iter += 1

    def metrics(self) -> dict:
        """Plain numbers: iterations, bytes sent and dense bytes (total and last step), ratio."""
        ratio = self.dense_bytes / self.bytes_sent if self.bytes_sent else float("nan")
        last = self.last_step[1] / self.last_step[0] if self.last_step[0] else float("nan")
        return {
            "iterations": self.iter,
            "bytes_sent": self.bytes_sent,
            "dense_bytes": self.dense_bytes,
            "compression_ratio": ratio,
            "last_step_bytes": self.last_step[0],
            "last_step_ratio": last,
        }


class CommHookState(_Counters):
    """State of a gradcomp compression hook: compressor, error feedback, generator, counters.

    Args:
        compressor: a ``gradcomp.compressors.comm`` compressor (QSGD, TopK, ScaleCom, ...).
        process_group: the DDP process group (None: the default group).
        start_iter: iterations run as a plain fp32 all-reduce before compressing (>= 1; 2 by
            default so that error-feedback memory is created after DDP's bucket rebuild, as
            torch's PowerSGD requires; 1 only where buckets are never rebuilt).
        seed: base seed of the compressor's random numbers; rank r uses an independent stream
            derived from (seed, r), so ranks never share noise.
        beta: error-feedback filter (ScaleCom's beta is taken from the compressor); 1 = plain EF.
        check_config: all-gather a config hash now and raise if ranks differ (a collective:
            every rank must construct its state).
    Tuning: raise ``start_iter`` when early training is sensitive (PowerSGD's advice: ~10% of
    steps); error feedback exists because top-k and ScaleCom are biased.
    """

    def __init__(self, compressor: CommCompressor, process_group=None, start_iter: int = 2,
                 seed: int = 0, beta: float = 1.0, check_config: bool = True):
        super().__init__()
        if not isinstance(compressor, CommCompressor):
            raise TypeError(f"compressor must be a CommCompressor, got {type(compressor).__name__}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 1:
            raise ValueError(f"start_iter must be an int >= 1, got {start_iter!r}")
        self.compressor = compressor
        self.process_group = process_group
        self.start_iter = start_iter
        self.seed = int(seed)
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        ef_beta = compressor.beta if isinstance(compressor, ScaleCom) else beta
        self.memory = ErrorFeedback(ef_beta) if compressor.needs_memory else None
        self._generators: dict = {}
        self.last_indices = None  # ScaleCom: the indices shared at the last step
        self.config = {**compressor.config(), "start_iter": start_iter, "seed": self.seed,
                       "beta": ef_beta}
        self.config_hash = check_same_config(self.config, process_group) if check_config else None

    def generator(self, device) -> torch.Generator:
        """This rank's generator on ``device`` (created on first use from (seed, rank))."""
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed * 1_000_003 + 7919 * self.rank + 1)
            self._generators[key] = g
        return self._generators[key]

    def state_dict(self) -> dict:
        """Iteration counter and error-feedback memory (for checkpoints)."""
        return {"iter": self.iter, "memory": self.memory.state_dict() if self.memory else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.iter = int(state["iter"])
        if self.memory is not None and state["memory"] is not None:
            self.memory.load_state_dict(state["memory"])


def _warmup(state, bucket):
    """Plain fp32 all-reduce (average); counted as dense."""
    buf = bucket.buffer()
    state.count(bucket, buf.numel() * buf.element_size())
    buf.div_(state.world_size)
    work = dist.all_reduce(buf, group=state.process_group, async_op=True)
    return work.get_future().then(lambda f: f.value()[0])


def _gather_variable(t: torch.Tensor, state) -> tuple[list, int]:
    """All-gather 1-D tensors of different lengths: sizes first, then padded payloads."""
    pg, world = state.process_group, state.world_size
    size = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=pg)
    sizes = [int(s) for s in sizes]  # host sync: the buffers' shapes depend on it
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=pg)
    return [o[:s] for o, s in zip(out, sizes)], 8 + padded.numel() * padded.element_size()


def _gather_fixed(t: torch.Tensor, state) -> tuple[list, int]:
    out = [torch.empty_like(t) for _ in range(state.world_size)]
    dist.all_gather(out, t.contiguous(), group=state.process_group)
    return out, t.numel() * t.element_size()


def allgather_hook(state: CommHookState, bucket):
    """Hook for any ALLGATHER compressor: compress, all-gather, decode every rank, average.

    Error feedback (when the compressor needs it) is applied before compressing and updated
    with this rank's own decoded payload. Variable-size payloads (QSGD bit stream, pruning)
    exchange their sizes first (a host sync).
    """
    comp = state.compressor
    require_aggregation(comp, Aggregation.ALLGATHER)
    if state.iter < state.start_iter:
        return _warmup(state, bucket)
    buf = bucket.buffer()
    n, key = buf.numel(), bucket.index()
    x = state.memory.compensate(key, buf) if state.memory is not None else buf
    gen = state.generator(buf.device)
    payload = comp.compress(x, gen)
    if state.memory is not None:
        state.memory.update(key, x, comp.decompress(payload, n))
    sent = 0
    if isinstance(comp, QSGD) and comp.bitstream:
        stream = torch.from_numpy(comp.encode(payload[0], payload[1], n)).to(buf.device)
        streams, sent = _gather_variable(stream, state)
        gathered = []
        for s in streams:
            norms, q, numel = comp.decode(s.cpu().numpy(), device=buf.device)
            if numel != n:
                raise ValueError(f"rank sent a stream of {numel} coordinates for a bucket of {n}")
            gathered.append([norms, q])
    else:
        per_tensor = []
        for t in payload:
            if getattr(comp, "variable_size", False):
                parts, b = _gather_variable(t, state)
            else:
                parts, b = _gather_fixed(t, state)
            per_tensor.append(parts)
            sent += b
        gathered = [list(p) for p in zip(*per_tensor)]
    total = torch.zeros(n, dtype=torch.float32, device=buf.device)
    for p in gathered:  # rank order: the same float sum on every rank
        total += comp.decompress(p, n)
    buf.copy_(total / state.world_size)
    state.count(bucket, sent)
    return _completed(buf)


def _require(state, cls, name):
    if not isinstance(state, CommHookState) or not isinstance(state.compressor, cls):
        got = type(state.compressor).__name__ if isinstance(state, CommHookState) else type(state)
        raise TypeError(f"{name} needs a CommHookState holding a {cls.__name__}; got {got}")


def qsgd_hook(state: CommHookState, bucket):
    """QSGD: stochastic levels per bucket, all-gathered and decoded (never summed as codes)."""
    _require(state, QSGD, "qsgd_hook")
    return allgather_hook(state, bucket)


def topk_hook(state: CommHookState, bucket):
    """Top-k with error feedback: (index, value) pairs all-gathered and scatter-added."""
    _require(state, TopK, "topk_hook")
    return allgather_hook(state, bucket)


def scalecom_hook(state: CommHookState, bucket):
    """ScaleCom: leader ``iter mod world`` broadcasts its top-k indices; values all-reduced.

    Memory update with the low-pass filter of ``ScaleCom.beta`` uses this rank's own values at
    the shared indices, ``m <- (1 - beta) m + beta (m + g - C(m + g))``.
    """
    _require(state, ScaleCom, "scalecom_hook")
    comp = state.compressor
    require_aggregation(comp, Aggregation.ALLREDUCE)
    if state.iter < state.start_iter:
        return _warmup(state, bucket)
    buf = bucket.buffer()
    n, key, pg = buf.numel(), bucket.index(), state.process_group
    corrected = state.memory.compensate(key, buf)
    leader = comp.leader(state.iter, state.world_size)
    if state.rank == leader:
        idx = comp.select(corrected)
    else:
        idx = torch.empty(comp.num_selected(n), dtype=torch.int32, device=buf.device)
    src = dist.get_global_rank(pg, leader) if pg is not None else leader
    dist.broadcast(idx, src=src, group=pg)
    (vals,) = comp.compress(corrected, idx)
    state.memory.update(key, corrected, comp.decompress([vals], idx, n))
    summed = vals.clone()
    dist.all_reduce(summed, group=pg)
    out = comp.decompress([summed / state.world_size], idx, n, dtype=buf.dtype)
    buf.copy_(out)
    sent = vals.numel() * vals.element_size()
    if state.rank == leader:
        sent += idx.numel() * idx.element_size()
    state.count(bucket, sent)
    state.last_indices = idx  # exposed for tests and diagnostics
    return _completed(buf)


def prune_hook(state: CommHookState, bucket):
    """Stochastic pruning with the lognormal threshold: sparse (index, value) all-gather."""
    _require(state, StochasticPrune, "prune_hook")
    return allgather_hook(state, bucket)


def fp_hook(state: CommHookState, bucket):
    """FP quantization of the gradient (scaled, stochastic rounding): all-gathered, decoded."""
    _require(state, FPQuantize, "fp_hook")
    return allgather_hook(state, bucket)


# ---- torch's own hooks, wrapped so that their bytes are counted the same way ----


class TorchHookState(_Counters):
    """Wraps the state of one of torch's built-in hooks and counts its bytes."""

    def __init__(self, inner, process_group=None, config=None, check_config=True):
        super().__init__()
        self.inner = inner
        self.process_group = process_group
        self.config = dict(config or {})
        self.config_hash = check_same_config(self.config, process_group) if check_config else None


def allreduce_hook(state: TorchHookState, bucket):
    """torch's fp32 all-reduce (the uncompressed reference); 4 bytes per element."""
    buf = bucket.buffer()
    state.count(bucket, buf.numel() * buf.element_size())
    return default_hooks.allreduce_hook(state.inner, bucket)


def fp16_hook(state: TorchHookState, bucket):
    """torch's fp16 compression hook; 2 bytes per element."""
    state.count(bucket, 2 * bucket.buffer().numel())
    return default_hooks.fp16_compress_hook(state.inner, bucket)


def _powersgd_bytes(ps, bucket) -> int:
    """Bytes torch's PowerSGD hook all-reduces for ``bucket`` (its own split, see torch)."""
    if ps.iter < ps.start_powerSGD_iter:
        return 4 * bucket.buffer().numel()
    elems = 0
    for t in bucket.gradients():
        rows = t.shape[0]
        cols = t.numel() // rows
        r = min(rows, cols, ps.matrix_approximation_rank)
        compress, full, small = _psgd._should_compress(rows, cols, r, ps.min_compression_rate)
        elems += small if compress else full
    return 4 * elems


def powersgd_hook(state: TorchHookState, bucket):
    """torch's PowerSGD hook (low-rank P, Q all-reduced; its own error feedback)."""
    state.count(bucket, _powersgd_bytes(state.inner, bucket))
    return _psgd.powerSGD_hook(state.inner, bucket)


# ---- registry ----

_STATE_KW = ("start_iter", "seed", "beta", "check_config")


def _compressor_factories() -> dict:
    facs = {"qsgd": (QSGD, qsgd_hook), "topk": (TopK, topk_hook),
            "scalecom": (ScaleCom, scalecom_hook), "fp": (FPQuantize, fp_hook)}
    if StochasticPrune.available():
        facs["prune"] = (StochasticPrune, prune_hook)
    return facs


def available_methods() -> tuple:
    """Names accepted by ``make_comm_hook``."""
    return ("allreduce", "fp16", "powersgd", *_compressor_factories())


def _split_kw(cls, kw: dict, method: str):
    allowed = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(kw) - set(allowed) - set(_STATE_KW))
    if unknown:
        raise TypeError(
            f"make_comm_hook({method!r}) got unknown options {unknown}; allowed: "
            f"{sorted(allowed) + list(_STATE_KW)}"
        )
    return ({k: v for k, v in kw.items() if k in allowed},
            {k: v for k, v in kw.items() if k in _STATE_KW})


def make_comm_hook(method: str, process_group=None, **kw):
    """Build ``(state, hook)`` for ``ddp_model.register_comm_hook(state, hook)``.

    Args:
        method: one of ``available_methods()``: "allreduce" (fp32 reference), "fp16", "powersgd"
            (torch's; kw: matrix_approximation_rank=1, start_powerSGD_iter=2,
            min_compression_rate=2, use_error_feedback=True, warm_start=True), "qsgd", "topk",
            "scalecom", "prune", "fp" (kw: the compressor's fields plus start_iter, seed, beta).
        process_group: DDP's process group (None: default group).
    Every rank must call it with the same configuration: a config hash is all-gathered and a
    mismatch raises ValueError on every rank. An unknown method or option raises and lists the
    valid ones.
    """
    methods = available_methods()
    if method not in methods:
        raise ValueError(f"method must be one of {', '.join(map(repr, methods))}; got {method!r}")
    check = kw.pop("check_config", True)
    if method in ("allreduce", "fp16"):
        if kw:
            raise TypeError(f"make_comm_hook({method!r}) takes no options; got {sorted(kw)}")
        hook = allreduce_hook if method == "allreduce" else fp16_hook
        return TorchHookState(process_group, process_group, {"method": method}, check), hook
    if method == "powersgd":
        opts = {"matrix_approximation_rank": 1, "start_powerSGD_iter": 2,
                "min_compression_rate": 2, "use_error_feedback": True, "warm_start": True}
        unknown = sorted(set(kw) - set(opts) - {"seed"})
        if unknown:
            raise TypeError(f"make_comm_hook('powersgd') got unknown options {unknown}; "
                            f"allowed: {sorted(opts)} and seed")
        seed = kw.pop("seed", 0)
        opts.update(kw)
        inner = _psgd.PowerSGDState(process_group=process_group, random_seed=seed, **opts)
        cfg = {"method": method, "seed": seed, **opts}
        return TorchHookState(inner, process_group, cfg, check), powersgd_hook
    cls, hook = _compressor_factories()[method]
    ckw, skw = _split_kw(cls, kw, method)
    state = CommHookState(cls(**ckw), process_group, check_config=check, **skw)
    return state, hook

