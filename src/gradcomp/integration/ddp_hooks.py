"""The compressed DDP communication hook for ``gradcomp.compressors.comm``, its state, registry.

Usage (torch conventions)::

    state, hook = make_comm_hook("qsgd", levels=16, bucket_size=512)
    ddp_model.register_comm_hook(state, hook)
    ...
    state.metrics()        # bytes sent, compression ratio against an fp32 all-reduce
    ckpt["comm"] = state.gather_state_dict()   # collective: every rank calls it
    state.load_state_dict(ckpt["comm"])        # exact resume (memory, generators, counters)

One hook, ``comm_hook(state, bucket) -> torch.futures.Future[torch.Tensor]``, serves every
compressor: it reads the compressor's declared ``aggregation`` (all-reduce of payloads whose
sum decodes to the sum of gradients, or all-gather and decode one by one),
``shared_selection`` (the leader's indices are broadcast first: ScaleCom), ``variable_size``
(sizes are exchanged before the all-gather) and ``needs_memory`` (error feedback). The future's
value is the bucket's *average* gradient over the ranks, identical on every rank (each rank
decodes the same gathered payloads in rank order, or receives the same all-reduce result).
``qsgd_hook``, ``topk_hook``, ``scalecom_hook``, ``prune_hook``, ``fp_hook`` and ``block_hook``
are names of the same function.

Why the first iterations are plain all-reduce (``start_iter``, default 2, as in torch's
PowerSGD): DDP rebuilds its buckets after the first iteration, so a bucket index may name a
different set of parameters afterwards; error-feedback memory is keyed by bucket index and must
only be created after the rebuild. A memory whose bucket layout (parameter shapes) no longer
matches raises ValueError instead of adding one tensor's residual to another.

Bytes are counted from the tensors actually handed to the collectives (each rank's own
contribution: payload bytes, plus the 8-byte size exchanged before a variable-size all-gather
and the padding to the largest rank's size, plus the leader's broadcast indices);
``dense_bytes`` is what an fp32 all-reduce of the same buckets would contribute (4 per
element). Before sending, the payload's bytes are compared with the compressor's
``wire_bytes`` promise (equal for fixed-size payloads, at most for variable ones); a
difference raises RuntimeError.

The file deliberately has no ``from __future__ import annotations``: DDP checks the ``bucket``
annotation of a hook by identity.
"""

import copy
import dataclasses
import difflib
import hashlib
import json

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as _psgd

from gradcomp.compressors.comm import (
    QSGD,
    Aggregation,
    BlockCompress,
    CommCompressor,
    ErrorFeedback,
    FPCompress,
    ScaleCom,
    StochasticPrune,
    TopK,
    is_block_format_name,
    payload_bytes,
)

__all__ = [
    "CommHookState",
    "TorchHookState",
    "allreduce_hook",
    "available_methods",
    "block_hook",
    "check_same_config",
    "comm_hook",
    "fp16_hook",
    "fp_hook",
    "make_comm_hook",
    "powersgd_hook",
    "prime_buckets",
    "prune_hook",
    "qsgd_hook",
    "scalecom_hook",
    "topk_hook",
    "validate_comm",
]

_STATE_VERSION = 1


def _completed(t: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(t)
    return fut


def _config_hash(config: dict) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_config(config: dict, process_group=None) -> str:
    """All-gather a hash of ``config`` and raise ValueError if any rank's differs.

    Every rank must call it (it is a collective). Returns the hash. The error names the
    differing fields and each rank's value of them, on every rank.
    """
    digest = _config_hash(config)
    world = dist.get_world_size(process_group)
    gathered = [None] * world
    dist.all_gather_object(gathered, (digest, config), group=process_group)
    if len({h for h, _ in gathered}) > 1:
        keys = sorted({k for _, c in gathered for k in c})
        diff = [k for k in keys if len({json.dumps(c.get(k), default=str)
                                        for _, c in gathered}) > 1]
        lines = "; ".join(
            f"{k}: " + ", ".join(f"rank {r} {c.get(k, '(unset)')!r}"
                                 for r, (_, c) in enumerate(gathered))
            for k in diff
        )
        raise ValueError(f"ranks registered different comm-hook configurations (differing "
                         f"fields: {', '.join(diff)}): {lines}")
    return digest


class _Counters:
    """Bytes per step, per period (since the last ``metrics(reset=True)``) and in total; a step
    ends on the last bucket of an iteration."""

    _COUNTERS = ("iter", "bytes_sent", "dense_bytes", "step_bytes", "step_dense",
                 "period_bytes", "period_dense", "last_step")

    def __init__(self):
        self.suspended = False  # set by prime_buckets: plain all-reduce, nothing counted
        self.iter = 0
        self.bytes_sent = 0
        self.dense_bytes = 0
        self.step_bytes = 0
        self.step_dense = 0
        self.period_bytes = 0
        self.period_dense = 0
        self.last_step = (0, 0)  # (bytes sent, dense bytes) of the last finished iteration

    def count(self, bucket, sent: int) -> None:
        dense = 4 * bucket.buffer().numel()
        self.bytes_sent += sent
        self.dense_bytes += dense
        self.period_bytes += sent
        self.period_dense += dense
        self.step_bytes += sent
        self.step_dense += dense
        if bucket.is_last():
            self.last_step = (self.step_bytes, self.step_dense)
            self.step_bytes = self.step_dense = 0
            self.iter += 1

    def metrics(self, reset: bool = False) -> dict:
        """Plain numbers: iterations; bytes sent, dense bytes and their ratio (dense / sent) in
        total, since the last reset ("period_", e.g. one epoch) and for the last step.

        reset: start a new period after reading (totals are never reset; they are part of
        ``state_dict``, so they continue across a resume).
        """
        def ratio(dense, sent):
            return dense / sent if sent else float("nan")

        out = {
            "iterations": self.iter,
            "bytes_sent": self.bytes_sent,
            "dense_bytes": self.dense_bytes,
            "compression_ratio": ratio(self.dense_bytes, self.bytes_sent),
            "period_bytes_sent": self.period_bytes,
            "period_dense_bytes": self.period_dense,
            "period_compression_ratio": ratio(self.period_dense, self.period_bytes),
            "last_step_bytes": self.last_step[0],
            "last_step_ratio": ratio(self.last_step[1], self.last_step[0]),
        }
        if reset:
            self.period_bytes = self.period_dense = 0
        return out

    def _counter_state(self) -> dict:
        return {k: getattr(self, k) for k in self._COUNTERS}

    def _load_counters(self, state: dict) -> None:
        for k in self._COUNTERS:
            v = state[k]
            setattr(self, k, tuple(int(x) for x in v) if k == "last_step" else int(v))

    def _check_state(self, state, kind: str) -> dict:
        """Pick this rank's entry of a gathered state and check it was written by this config."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        if "ranks" in state:
            if len(state["ranks"]) != world:
                raise ValueError(f"comm-hook state holds {len(state['ranks'])} ranks; this run "
                                 f"has world size {world}")
            state = state["ranks"][rank]
        if state.get("kind") != kind or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a {kind} state (version {_STATE_VERSION}): kind "
                             f"{state.get('kind')!r}, version {state.get('version')!r}")
        if state["rank"] != rank or state["world_size"] != world:
            raise ValueError(f"comm-hook state of rank {state['rank']} of {state['world_size']} "
                             f"loaded on rank {rank} of {world}")
        if state["config"] != self.config:
            diff = sorted(k for k in {*state["config"], *self.config}
                          if state["config"].get(k) != self.config.get(k))
            raise ValueError(f"comm-hook state was written with another configuration "
                             f"(differs in: {', '.join(diff)})")
        return state

    def gather_state_dict(self) -> dict:
        """Every rank's ``state_dict`` (a collective: every rank must call it), as
        ``{"world_size": n, "ranks": [rank 0's, rank 1's, ...]}`` on every rank; what a
        checkpoint written by one rank stores. ``load_state_dict`` takes it on every rank."""
        world = dist.get_world_size(self.process_group)
        states = [None] * world
        dist.all_gather_object(states, self.state_dict(), group=self.process_group)
        return {"world_size": world, "ranks": states}


class CommHookState(_Counters):
    """State of the compressed hook: compressor, error feedback, generator, counters.

    Args:
        compressor: a ``gradcomp.compressors.comm`` compressor (QSGD, TopK, ScaleCom, ...).
        process_group: the DDP process group (None: the default group).
        start_iter: iterations run as a plain fp32 all-reduce before compressing (>= 1; 2 by
            default so that error-feedback memory is created after DDP's bucket rebuild, as
            torch's PowerSGD requires; 1 only where buckets are never rebuilt).
        seed: base seed of the compressor's random numbers; rank r uses an independent stream
            derived from (seed, r), so ranks never share noise.
        beta: error-feedback filter of compressors that need memory (ScaleCom's beta is taken
            from the compressor; passing another one raises); 1 = plain error feedback.
        check_config: all-gather a config hash now and raise if ranks differ (a collective:
            every rank must construct its state).
    Tuning: raise ``start_iter`` when early training is sensitive (PowerSGD's advice: ~10% of
    steps); error feedback exists because top-k and ScaleCom are biased.

    ``state_dict`` holds everything that shapes the trajectory: the error-feedback memory (per
    bucket index, with the bucket's layout), the generators' states, the iteration counter
    (warm-up and ScaleCom's leader ``iter mod world``) and the byte counters.
    """

    def __init__(self, compressor: CommCompressor, process_group=None, start_iter: int = 2,
                 seed: int = 0, beta: float = 1.0, check_config: bool = True):
        super().__init__()
        if not isinstance(compressor, CommCompressor):
            raise TypeError(f"compressor must be a CommCompressor, got {type(compressor).__name__}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 1:
            raise ValueError(f"start_iter must be an int >= 1, got {start_iter!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(compressor, ScaleCom):
            if beta != 1.0 and beta != compressor.beta:
                raise ValueError(f"beta={beta!r} given to the state of a ScaleCom with "
                                 f"beta={compressor.beta!r}: set it on ScaleCom(beta=...)")
            beta = compressor.beta
        elif beta != 1.0 and not compressor.needs_memory:
            raise ValueError(f"beta={beta!r}: {type(compressor).__name__} uses no error "
                             "feedback, so beta has no effect")
        self.compressor = compressor
        self.process_group = process_group
        self.start_iter = start_iter
        self.seed = seed
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.memory = ErrorFeedback(beta) if compressor.needs_memory else None
        self.layouts: dict = {}  # bucket index -> parameter shapes its memory belongs to
        self._generators: dict = {}
        self.last_indices = None  # ScaleCom: the indices shared at the last step
        self.config = {**compressor.config(), "start_iter": start_iter, "seed": seed,
                       "beta": float(beta)}
        self.config_hash = check_same_config(self.config, process_group) if check_config else None

    def generator(self, device) -> torch.Generator:
        """This rank's generator on ``device`` (created on first use from (seed, rank))."""
        key = str(torch.device(device))
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed * 1_000_003 + 7919 * self.rank + 1)
            self._generators[key] = g
        return self._generators[key]

    def state_dict(self) -> dict:
        """This rank's state (CPU tensors, ``torch.save``-able): config, counters, memory with
        its bucket layouts, generator states. See ``gather_state_dict`` for all ranks."""
        return {
            "kind": "CommHookState", "version": _STATE_VERSION,
            "rank": self.rank, "world_size": self.world_size, "config": dict(self.config),
            **self._counter_state(),
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "layouts": dict(self.layouts),
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict`` (this rank's) or ``gather_state_dict`` (every rank's).

        Raises ValueError when the state was written by another configuration (naming the
        differing fields), another rank or world size.
        """
        state = self._check_state(state, "CommHookState")
        self._load_counters(state)
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        self.layouts = dict(state["layouts"])
        self._generators = {}
        for key, st in state["generators"].items():
            g = torch.Generator(device=key)
            g.set_state(st)
            self._generators[key] = g


def _plain_allreduce(state, bucket):
    """fp32 all-reduce (average) that changes no state and counts nothing."""
    buf = bucket.buffer()
    buf.div_(dist.get_world_size(state.process_group))
    work = dist.all_reduce(buf, group=state.process_group, async_op=True)
    return work.get_future().then(lambda f: f.value()[0])


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


def _check_promise(comp, payload, numel: int) -> None:
    """The payload's bytes against the compressor's ``wire_bytes`` (host metadata only)."""
    got, promised = payload_bytes(payload), comp.wire_bytes(numel)
    if got > promised or (not comp.variable_size and got != promised):
        rel = "at most" if comp.variable_size else "exactly"
        raise RuntimeError(f"{type(comp).__name__} promised {rel} {promised} bytes for "
                           f"{numel} elements and produced a payload of {got} bytes")


def _layout(bucket) -> tuple:
    return tuple(tuple(p.shape) for p in bucket.parameters())


def _compensate(state, bucket, buf):
    """m + g for this bucket (error feedback), checking the memory belongs to this layout."""
    key = bucket.index()
    layout = _layout(bucket)
    known = state.layouts.setdefault(key, layout)
    if known != layout:
        raise ValueError(
            f"error-feedback memory of bucket {key} belongs to parameters of shapes {known}, "
            f"the bucket now holds {layout} (DDP's bucket layout changed: keep start_iter >= 2 "
            "so that memory is created after DDP's bucket rebuild; after a resume, call "
            "prime_buckets before the first step)"
        )
    return state.memory.compensate(key, buf)


def comm_hook(state: CommHookState, bucket):
    """The compressed DDP hook: compress, exchange as the compressor declares, decode, average.

    Steps after the warm-up: (error feedback) x = m + g; (shared selection) the leader
    ``iter mod world`` selects indices and broadcasts them; payload = compress(x); the memory
    keeps x - decompress(own payload); ALLREDUCE payloads are summed and decoded once,
    ALLGATHER payloads are gathered (sizes first when variable) and decoded rank by rank in
    rank order. An empty bucket is a no-op (nothing sent).
    """
    if not isinstance(state, CommHookState):
        raise TypeError(f"comm_hook needs a CommHookState, got {type(state).__name__}")
    if state.suspended:
        return _plain_allreduce(state, bucket)
    comp = state.compressor
    buf = bucket.buffer()
    n = buf.numel()
    if n == 0:
        state.count(bucket, 0)
        return _completed(buf)
    if state.iter < state.start_iter:
        return _warmup(state, bucket)
    key, pg = bucket.index(), state.process_group
    x = _compensate(state, bucket, buf) if state.memory is not None else buf
    gen = state.generator(buf.device)
    sent, kw = 0, {}
    if comp.shared_selection:
        leader = state.iter % state.world_size
        if state.rank == leader:
            idx = comp.select(x)
            sent += idx.numel() * idx.element_size()
        else:
            idx = torch.empty(comp.num_selected(n), dtype=torch.int32, device=buf.device)
        src = dist.get_global_rank(pg, leader) if pg is not None else leader
        dist.broadcast(idx, src=src, group=pg)
        kw = {"indices": idx}
        state.last_indices = idx  # exposed for tests and diagnostics
    payload = comp.compress(x, gen, **kw)
    _check_promise(comp, payload, n)
    if state.memory is not None:
        state.memory.update(key, x, comp.decompress(payload, n, **kw))
    if comp.aggregation is Aggregation.ALLREDUCE:
        summed = [t.clone() for t in payload]
        for t in summed:
            dist.all_reduce(t, group=pg)
        sent += payload_bytes(payload)
        out = comp.decompress([t / state.world_size for t in summed], n, dtype=buf.dtype, **kw)
        buf.copy_(out)
    else:
        per_tensor = []
        for t in payload:
            parts, b = (_gather_variable if comp.variable_size else _gather_fixed)(t, state)
            per_tensor.append(parts)
            sent += b
        total = torch.zeros(n, dtype=torch.float32, device=buf.device)
        for p in zip(*per_tensor):  # rank order: the same float sum on every rank
            total += comp.decompress(list(p), n, **kw)
        buf.copy_(total / state.world_size)
    state.count(bucket, sent)
    return _completed(buf)


def _tensors(obj) -> list:
    """Tensors inside a model output (tensor, or lists / tuples / dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def prime_buckets(ddp_model, state, *inputs, **kwargs) -> None:
    """Make a fresh DDP model rebuild its buckets without changing anything else (for resume).

    DDP puts every parameter in one bucket for its first iteration and rebuilds its buckets
    (in the order gradients became ready) at the start of the second. A run resumed from a
    checkpoint would therefore compress its first step with another bucket layout than the
    uninterrupted run did (QSGD's norms, top-k's k and the memory are per bucket), and not
    continue bit for bit. Call this once after ``state.load_state_dict`` and before the first
    training step, on every rank, with one batch of inputs: it runs a forward and a backward of
    ``0 * sum(outputs)`` with the hook suspended (a plain all-reduce: no counter, generator or
    memory changes), then restores the module's parameters and buffers (e.g. BatchNorm running
    statistics), the CPU and CUDA random states, and clears the gradients it made
    (``param.grad = None``). The next forward rebuilds the buckets.
    """
    module = ddp_model.module
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    devices = sorted({p.device.index for p in module.parameters() if p.device.type == "cuda"})
    state.suspended = True
    try:
        with torch.random.fork_rng(devices=devices):
            out = ddp_model(*inputs, **kwargs)
            leaves = [t for t in _tensors(out) if t.requires_grad]
            if not leaves:
                raise ValueError("prime_buckets: the model's outputs need gradients")
            (0 * sum(t.float().sum() for t in leaves)).backward()
    finally:
        state.suspended = False
    with torch.no_grad():
        module.load_state_dict(saved)
    for p in module.parameters():
        p.grad = None


# Named aliases of the one hook (kept for ``gradcomp.dist.qsgd_hook`` and the README).
qsgd_hook = topk_hook = scalecom_hook = prune_hook = fp_hook = block_hook = comm_hook


# ---- torch's own hooks, wrapped so that their bytes are counted the same way ----


class TorchHookState(_Counters):
    """Wraps the state of one of torch's built-in hooks and counts its bytes."""

    def __init__(self, inner, process_group=None, config=None, check_config=True):
        super().__init__()
        self.inner = inner
        self.process_group = process_group
        self.config = dict(config or {})
        self.config_hash = check_same_config(self.config, process_group) if check_config else None

    def state_dict(self) -> dict:
        """This rank's counters, and PowerSGD's own state (its error feedback, P/Q memory,
        random generator; everything but the process group) when it wraps PowerSGD."""
        inner = None
        if isinstance(self.inner, _psgd.PowerSGDState):
            inner = {slot: copy.deepcopy(getattr(self.inner, slot))
                     for slot in self.inner.__slots__ if slot != "process_group"}
        return {"kind": "TorchHookState", "version": _STATE_VERSION,
                "rank": dist.get_rank(self.process_group),
                "world_size": dist.get_world_size(self.process_group),
                "config": dict(self.config), **self._counter_state(), "inner": inner}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict`` (this rank's) or ``gather_state_dict`` (every rank's)."""
        state = self._check_state(state, "TorchHookState")
        self._load_counters(state)
        if state["inner"] is not None:
            for slot, value in state["inner"].items():
                setattr(self.inner, slot, copy.deepcopy(value))


def allreduce_hook(state: TorchHookState, bucket):
    """torch's fp32 all-reduce (the uncompressed reference); 4 bytes per element."""
    if state.suspended:
        return _plain_allreduce(state, bucket)
    buf = bucket.buffer()
    state.count(bucket, buf.numel() * buf.element_size())
    return default_hooks.allreduce_hook(state.inner, bucket)


def fp16_hook(state: TorchHookState, bucket):
    """torch's fp16 compression hook; 2 bytes per element."""
    if state.suspended:
        return _plain_allreduce(state, bucket)
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
    if state.suspended:
        return _plain_allreduce(state, bucket)
    state.count(bucket, _powersgd_bytes(state.inner, bucket))
    return _psgd.powerSGD_hook(state.inner, bucket)


# ---- registry and option validation ----

_COMPRESSORS = {"qsgd": QSGD, "topk": TopK, "scalecom": ScaleCom, "prune": StochasticPrune,
                "fp": FPCompress, "block": BlockCompress}
_TORCH_METHODS = ("allreduce", "fp16", "powersgd")
_POWERSGD_DEFAULTS = {"matrix_approximation_rank": 1, "start_powerSGD_iter": 2,
                      "min_compression_rate": 2, "use_error_feedback": True, "warm_start": True}
# accepted Python types of every option, by the annotation of the compressor's field
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
          "bool | None": (bool, type(None))}
_STATE_TYPES = {"start_iter": "int", "seed": "int", "check_config": "bool", "beta": "float"}
_POWERSGD_TYPES = {"matrix_approximation_rank": "int", "start_powerSGD_iter": "int",
                   "min_compression_rate": "float", "use_error_feedback": "bool",
                   "warm_start": "bool", "seed": "int", "check_config": "bool"}


def available_methods() -> tuple:
    """Names accepted by ``make_comm_hook``."""
    return (*_TORCH_METHODS, *_COMPRESSORS)


def _compressor_class(method: str, options: dict):
    """The compressor class of ``method``; "fp" with a block format name (``mxfp4``,
    ``nvfp4``, ...) is BlockCompress, so ``--comm fp`` takes every format gradcomp has."""
    cls = _COMPRESSORS[method]
    if cls is FPCompress and is_block_format_name(options.get("fmt")):
        return BlockCompress
    return cls


def _method_label(method: str, options: dict) -> str:
    """How errors name the method ("fp with block format 'mxfp4'" when routed)."""
    if method in _COMPRESSORS and _compressor_class(method, options) is not _COMPRESSORS[method]:
        return (f"{method} with block format {options['fmt']!r} (its scales are the format's "
                "own, one per block)")
    return method


def _option_types(method: str, options: dict) -> dict:
    """{option: annotation} accepted by ``method`` with these ``options``."""
    if method == "powersgd":
        return dict(_POWERSGD_TYPES)
    if method in ("allreduce", "fp16"):
        return {"check_config": "bool"}
    cls = _compressor_class(method, options)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    state = dict(_STATE_TYPES)
    if not cls.needs_memory or "beta" in types:  # no error feedback, or the compressor's own
        state.pop("beta")
    return {**types, **state}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=2, cutoff=0.6)
    if not close and len(word) >= 3:  # "rank" -> "matrix_approximation_rank"
        close = [c for c in choices if word.lower() in c.lower()][:2]
    return f"did you mean {' or '.join(map(repr, close))}? " if close else ""


def validate_comm(method, options=None) -> None:
    """Check a ``--comm`` method and its options without a process group (cheap; the CLI calls
    it in the parent before spawning workers). Returns None or raises ValueError naming the
    method or option and the allowed values: an unknown method (with the closest names), an
    option the method does not accept, a value of the wrong type, or a value the compressor
    refuses (its own check, e.g. levels out of range).
    """
    methods = available_methods()
    if not isinstance(method, str) or method not in methods:
        hint = _did_you_mean(method, methods) if isinstance(method, str) else ""
        raise ValueError(f"--comm {method!r} is not a method; {hint}allowed: "
                         f"{', '.join(methods)}")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"comm options must be a dict (a JSON object), got "
                         f"{type(options).__name__}")
    types = _option_types(method, options)
    for name, value in options.items():
        if name not in types:
            hint = _did_you_mean(str(name), types)
            allowed = ", ".join(sorted(types)) if types else "(no options)"
            raise ValueError(f"comm option {name!r} is not accepted by "
                             f"{_method_label(method, options)}; {hint}allowed: {allowed}")
        want = _TYPES[types[name]]
        if (isinstance(value, bool) and bool not in want) or not isinstance(value, want):
            raise ValueError(f"comm option {name!r} of {method} must be {types[name]}; got "
                             f"{type(value).__name__} {value!r}")
    if "start_iter" in options and options["start_iter"] < 1:
        raise ValueError(f"comm option 'start_iter' must be >= 1; got {options['start_iter']}")
    if "beta" in options and not 0.0 < float(options["beta"]) <= 1.0:
        raise ValueError(f"comm option 'beta' must lie in (0, 1]; got {options['beta']!r}")
    if method in _COMPRESSORS:
        cls = _compressor_class(method, options)
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            cls(**{k: v for k, v in options.items() if k in fields})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"comm option of {method}: {exc}") from None
    elif method == "powersgd":
        for name in ("matrix_approximation_rank", "start_powerSGD_iter"):
            if name in options and options[name] < 1:
                raise ValueError(f"comm option {name!r} must be >= 1; got {options[name]}")


def make_comm_hook(method: str, process_group=None, **kw):
    """Build ``(state, hook)`` for ``ddp_model.register_comm_hook(state, hook)``.

    Args:
        method: one of ``available_methods()``: "allreduce" (fp32 reference), "fp16", "powersgd"
            (torch's; kw: matrix_approximation_rank=1, start_powerSGD_iter=2,
            min_compression_rate=2, use_error_feedback=True, warm_start=True, seed), "qsgd",
            "topk", "scalecom", "prune", "fp", "block" (kw: the compressor's fields plus
            start_iter, seed, and beta for top-k's error feedback). "fp" with a block format
            name as ``fmt`` (``mxfp8_e4m3``, ``nvfp4``, ...) builds the same BlockCompress as
            "block"; its options are BlockCompress's (fmt, rounding, compile).
        process_group: DDP's process group (None: default group).
    ``validate_comm(method, kw)`` runs first (ValueError naming the bad method or option).
    Every rank must call it with the same configuration: a config hash is all-gathered and a
    mismatch raises ValueError on every rank, naming the differing fields.
    """
    validate_comm(method, kw)
    check = kw.pop("check_config", True)
    if method in ("allreduce", "fp16"):
        hook = allreduce_hook if method == "allreduce" else fp16_hook
        return TorchHookState(process_group, process_group, {"method": method}, check), hook
    if method == "powersgd":
        seed = kw.pop("seed", 0)
        opts = {**_POWERSGD_DEFAULTS, **kw}
        inner = _psgd.PowerSGDState(process_group=process_group, random_seed=seed, **opts)
        cfg = {"method": method, "seed": seed, **opts}
        return TorchHookState(inner, process_group, cfg, check), powersgd_hook
    cls = _compressor_class(method, kw)
    fields = {f.name for f in dataclasses.fields(cls)}
    comp = cls(**{k: v for k, v in kw.items() if k in fields})
    skw = {k: v for k, v in kw.items() if k not in fields}
    return CommHookState(comp, process_group, check_config=check, **skw), comm_hook
