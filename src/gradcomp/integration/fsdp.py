"""Compressed gradient reduce-scatter for FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 reduce-scatters every parameter group's flat gradient: rank r keeps the sum (or mean)
of chunk r over the ranks. ``FSDPModule.set_custom_reduce_scatter`` replaces that collective;
this module provides two compressed replacements, each stating how it stays correct under
summation, and counts the bytes it hands to the collectives:

* ``FP8ReduceScatter``: one all-reduce (MAX) of the local amax agrees a power-of-two scale s
  on every rank (the FP8-LM approach), so that every rank's codes live on the same grid;
  ``quantize_fp(x * s)`` with stochastic rounding (unbiased inside the range: E[Q(x s)] = x s)
  keeps the *sum* unbiased; the codes (one byte each) travel by all-to-all (gloo and NCCL
  cannot add float8 values, so the sum is formed locally in fp32: sum_r code_r / s). The scale
  puts the largest magnitude of any rank at or below the format's largest normal
  (``numerics.scales.amax_to_scale``), so no code overflows.
* ``AllToAllReduceScatter(compressor)``: for codes that cannot be summed (QSGD levels with
  their per-rank norms, pruned tensors: any ``Aggregation.ALLGATHER`` compressor without
  error feedback), rank r compresses chunk j for rank j, an all-to-all delivers them, and rank
  j decodes and sums the chunks it received in rank order (ZeRO++'s qgZ scheme). Unbiased
  compressors (QSGD, stochastic pruning) give an unbiased sum.

Both check what they send against what they promised (RuntimeError on a difference), and
``install(module, comm)`` sets one comm on every FSDP module of a model and returns it;
``comm.require_compressed()`` raises after training when the custom collective never ran or
sent more than it promised, so a run that asked for compression and did not get it fails
loudly. Error-feedback compressors (top-k, ScaleCom) are refused: their memory would have to
live in the sharded state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from gradcomp.compressors.comm import Aggregation, CommCompressor, payload_bytes
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import quantize_fp
from gradcomp.numerics.scales import amax_to_scale

__all__ = ["AllToAllReduceScatter", "CompressedReduceScatter", "FP8ReduceScatter", "install"]

_FP8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


class CompressedReduceScatter(ReduceScatter):
    """Base: buffer allocation, the reduce op, byte counters and the promise check."""

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.calls = 0
        self.bytes_sent = 0
        self.dense_bytes = 0
        self._generators: dict = {}

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A plain buffer (FSDP copies the gradients in, and reads the output from it)."""
        return torch.empty(*size, dtype=dtype, device=device)

    def generator(self, device, rank: int) -> torch.Generator:
        """This rank's generator on ``device`` (seeded from (seed, rank): ranks never share)."""
        key = str(torch.device(device))
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed * 1_000_003 + 7919 * rank + 1)
            self._generators[key] = g
        return self._generators[key]

    @staticmethod
    def _divisor(op, world: int) -> int:
        if op == dist.ReduceOp.SUM:
            return 1
        if op == dist.ReduceOp.AVG:
            return world
        raise ValueError(f"compressed reduce-scatter supports ReduceOp.SUM and AVG, got {op!r} "
                         "(a custom gradient_divide_factor is not supported)")

    def _count(self, sent: int, promised: int, numel: int) -> None:
        if sent != promised:
            raise RuntimeError(f"{type(self).__name__} promised {promised} bytes for {numel} "
                               f"elements and sent {sent}")
        self.calls += 1
        self.bytes_sent += sent
        self.dense_bytes += 4 * numel

    def metrics(self) -> dict:
        """Calls, bytes sent, bytes of an fp32 reduce-scatter of the same inputs, their ratio."""
        ratio = self.dense_bytes / self.bytes_sent if self.bytes_sent else float("nan")
        return {"calls": self.calls, "bytes_sent": self.bytes_sent,
                "dense_bytes": self.dense_bytes, "compression_ratio": ratio}

    def require_compressed(self, min_ratio: float = 1.5) -> None:
        """Raise RuntimeError unless the collective ran and compressed by ``min_ratio``."""
        m = self.metrics()
        if m["calls"] == 0:
            raise RuntimeError(f"{type(self).__name__} was never called: FSDP reduced the "
                               "gradients without compression (was install() called on the "
                               "model before training?)")
        if not m["compression_ratio"] >= min_ratio:
            raise RuntimeError(f"{type(self).__name__} compressed by "
                               f"{m['compression_ratio']:.2f}x, less than the {min_ratio}x "
                               "asked for")

    def state_dict(self) -> dict:
        """Counters and generator states (checkpointable)."""
        return {"calls": self.calls, "bytes_sent": self.bytes_sent,
                "dense_bytes": self.dense_bytes,
                "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``."""
        self.calls, self.bytes_sent = int(state["calls"]), int(state["bytes_sent"])
        self.dense_bytes = int(state["dense_bytes"])
        self._generators = {}
        for key, st in state["generators"].items():
            g = torch.Generator(device=key)
            g.set_state(st)
            self._generators[key] = g


def _all_to_all(t: torch.Tensor, group, world: int) -> torch.Tensor:
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t.contiguous(), group=group)
    return out


class FP8ReduceScatter(CompressedReduceScatter):
    """FP8 reduce-scatter with a scale agreed across ranks and stochastic rounding.

    Per call: amax of the local input -> all-reduce(MAX) (4 bytes) -> s = 2^floor(log2(
    max_normal / amax)) (1 when amax is 0 or not finite) -> codes = Q(x s) in ``fmt`` (float8
    container, sent as uint8) -> all-to-all (1 byte per element) -> output = sum_r codes_r / s
    in fp32 (divided by the world size for AVG). NaN / inf in any rank's input make amax
    non-finite: s = 1, and the non-finite values propagate (never silently finite).

    Args:
        fmt: "e4m3fn" or "e5m2" (the float8 containers torch can hold).
        rounding: "stochastic" (unbiased sum; default) or "nearest" (round half to even).
        seed: base seed; rank r draws from its own stream.
        compile: passed to ``quantize_fp``.
    """

    def __init__(self, fmt: str = "e4m3fn", rounding: str = "stochastic", seed: int = 0,
                 compile: bool | None = None):
        super().__init__(seed)
        if fmt not in _FP8:
            raise ValueError(f"fmt must be one of {', '.join(_FP8)}; got {fmt!r}")
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be one of stochastic, nearest; got {rounding!r}")
        self.fmt, self.rounding, self.compile = fmt, rounding, compile
        self.format = FPFormat.from_name(fmt)
        self.dtype = _FP8[fmt]

    def wire_bytes(self, numel: int) -> int:
        """One byte per element plus the 4-byte amax."""
        return int(numel) + 4

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        div = self._divisor(op, world)
        x = input_tensor.detach().reshape(-1).float()
        amax = x.abs().amax().reshape(1) if x.numel() else torch.zeros(1, device=x.device)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        s = amax_to_scale(amax[0], self.format, power_of_two=True).float()
        y = quantize_fp(x, self.format, self.rounding, scale=s,
                        generator=self.generator(x.device, rank), compile=self.compile) * s
        codes = y.to(self.dtype).view(torch.uint8)
        got = _all_to_all(codes, group, world)
        total = got.view(self.dtype).float().view(world, -1).sum(0) / s
        output_tensor.copy_((total / div).to(output_tensor.dtype))
        self._count(codes.numel() + 4, self.wire_bytes(x.numel()), x.numel())
        return None


class AllToAllReduceScatter(CompressedReduceScatter):
    """All-to-all of compressed chunks, then local decode-and-sum (ZeRO++ qgZ).

    Rank r splits its input into ``world`` equal chunks (FSDP pads the input to a multiple of
    the world size), compresses chunk j with ``compressor`` and sends it to rank j; each rank
    decodes the chunks it received and sums them in rank order (the same float sum on every
    rank). Fixed-size payloads travel in one all-to-all per payload tensor; variable-size ones
    exchange their sizes first (an all-to-all of int64, counted). Error-feedback compressors
    (top-k, ScaleCom) and all-reduce compressors are refused (ValueError).
    """

    def __init__(self, compressor: CommCompressor, seed: int = 0):
        super().__init__(seed)
        if not isinstance(compressor, CommCompressor):
            raise TypeError(f"compressor must be a CommCompressor, got "
                            f"{type(compressor).__name__}")
        if compressor.needs_memory or compressor.aggregation is not Aggregation.ALLGATHER:
            raise ValueError(f"{type(compressor).__name__} needs error feedback or a shared "
                             "selection; the sharded reduce-scatter supports QSGD, "
                             "StochasticPrune and FPCompress")
        self.compressor = compressor

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        div = self._divisor(op, world)
        comp = self.compressor
        x = input_tensor.detach().reshape(-1).float()
        chunk = x.numel() // world
        gen = self.generator(x.device, rank)
        payloads = [comp.compress(c, gen) for c in x.view(world, chunk)]
        promised = sent = 0
        received = []  # received[k][r]: payload tensor k from rank r
        for k in range(len(payloads[0])):
            parts = [p[k].reshape(-1) for p in payloads]
            sizes = [t.numel() for t in parts]
            flat = torch.cat(parts)
            if comp.variable_size:
                mine = torch.tensor(sizes, dtype=torch.int64, device=x.device)
                theirs = _all_to_all(mine, group, world)
                sent += mine.numel() * 8
                promised += mine.numel() * 8
                recv_sizes = theirs.tolist()  # host sync: the receive buffer depends on it
                out = torch.empty(sum(recv_sizes), dtype=flat.dtype, device=x.device)
                dist.all_to_all_single(out, flat, recv_sizes, sizes, group=group)
            else:
                recv_sizes = sizes
                out = _all_to_all(flat, group, world)
            sent += payload_bytes([flat])
            received.append(list(out.split(recv_sizes)))
        for p in payloads:
            got = payload_bytes(p)
            bound = comp.wire_bytes(chunk)
            promised += got if comp.variable_size and got <= bound else bound
        total = torch.zeros(chunk, dtype=torch.float32, device=x.device)
        for r in range(world):
            total += comp.decompress([received[k][r] for k in range(len(received))], chunk)
        output_tensor.copy_((total / div).to(output_tensor.dtype))
        self._count(sent, promised, x.numel())
        return None


def install(module: torch.nn.Module, comm: CompressedReduceScatter) -> CompressedReduceScatter:
    """Set ``comm`` as the reduce-scatter of every FSDP module in ``module`` (after
    ``fully_shard``); returns it. Raises ValueError when ``module`` holds no FSDP module."""
    if not isinstance(comm, CompressedReduceScatter):
        raise TypeError(f"comm must be a CompressedReduceScatter, got {type(comm).__name__}")
    mods = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not mods:
        raise ValueError("install: no FSDP module found; call fully_shard(...) first")
    for m in mods:
        m.set_custom_reduce_scatter(comm)
    return comm
