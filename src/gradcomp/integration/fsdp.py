"""Compressed gradient reduce-scatter for FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 reduce-scatters every parameter group's flat gradient: the input on rank r is
``world`` equal chunks (chunk j = rank j's shard of the group's parameters, padded), and rank j
keeps the sum (or mean) of chunk j over the ranks. ``FSDPModule.set_custom_reduce_scatter``
replaces that collective; this module provides compressed replacements, each stating how it
stays correct under summation, and counts the bytes it hands to the collectives:

* ``FP8ReduceScatter``: one all-reduce (MAX) of the local amax agrees a power-of-two scale s
  on every rank (the FP8-LM approach), so that every rank's codes live on the same grid;
  ``quantize_fp(x * s)`` with stochastic rounding (unbiased inside the range: E[Q(x s)] = x s)
  keeps the *sum* unbiased; the codes (one byte each) travel by all-to-all (gloo and NCCL
  cannot add float8 values, so the sum is formed locally in fp32: sum_r code_r / s). The scale
  puts the largest magnitude of any rank at or below the format's largest normal
  (``numerics.scales.amax_to_scale``), so no code overflows.
* ``BlockReduceScatter``: the same idea per block of a block-scaled format (OCP MX, NVFP4, FP8
  blockwise): the ranks agree each block's scale (an all-reduce MAX of the block's E8M0 scale
  byte, or of its fp32 amax for E4M3 / FP32 scales), quantize with those shared scales and
  stochastic rounding, all-to-all the element codes packed at their bit width, and each rank
  decodes and sums the chunks it received in fp32, in rank order.
* ``AllToAllReduceScatter(compressor)``: for codes that cannot be summed (QSGD levels with
  their per-rank norms, pruned tensors, FP codes with per-rank scales: any
  ``Aggregation.ALLGATHER`` compressor without error feedback), rank r compresses chunk j for
  rank j, an all-to-all delivers them, and rank j decodes and sums the chunks it received in
  rank order (ZeRO++'s qgZ scheme). Unbiased compressors (QSGD, stochastic pruning) give an
  unbiased sum.
* ``TopKReduceScatter`` and ``ScaleComReduceScatter``: biased sparsifiers with error feedback
  (next section).

Error feedback in the sharded state. What rank r failed to send is a residual of *its own*
gradient of the whole group (every destination chunk), and no other rank holds that
information; so the memory m_r is per rank and per parameter group, sized like the rank's
*input* of the reduce-scatter (the unsharded group, fp32), kept in the comm object (not in the
parameters' shards). A shard-sized memory could only hold the residual of the *sum*, which the
receiving rank never sees (it receives compressed chunks), so it could not be formed without
the dense reduce-scatter it replaces. Per call, with x = m_r + g_r (``ErrorFeedback``):

* top-k: for each destination chunk j, the k = ceil(ratio * chunk) largest |x[j]| are sent as
  (int32 index, fp32 value) by all-to-all; rank j scatter-adds what it received, in rank order.
  Bytes per rank and call: world * k * 8.
* ScaleCom (Chen et al. 2020, cyclic local top-k): the leader of this group's t-th compressed
  call is rank t mod world; it selects, for every chunk j, the k largest |x_leader[j]| and
  broadcasts the world x k int32 indices; every rank gathers its own x at those indices into a
  world x k matrix (row j for rank j) and an ordinary reduce-scatter *sums* the rows (the
  supports agree across ranks, so the sum of payloads is the payload of the sum); rank j writes
  the k sums at its indices. Bytes per rank and call: world * k * 4 values, plus world * k * 4
  indices on the leader.

In both, the memory keeps exactly what was not sent: ``m <- (1 - beta) m + beta (x - sent)``
with sent = x at the chosen indices and 0 elsewhere; with beta = 1, ``sent + m_new == x ==
g + m_old`` holds exactly (disjoint supports), and the sum over ranks of what they sent for
chunk j is exactly what rank j receives. beta < 1 is ScaleCom's low-pass filter.

Every comm checks what it sends against what it promised (RuntimeError on a difference);
``install(module, comm)`` sets one comm on every FSDP module of a model, each group under its
own key (the module's name: the error-feedback memory and ScaleCom's leader are per group);
``comm.require_compressed()`` raises after training when the collective never ran, left a
group out, or sent more than the ratio asked for, so a run that asked for compression and did
not get it fails loudly.

For a training loop: ``setup_fsdp(model, method, options, seed)`` shards the model, checks that
every rank has the same comm configuration and parameter groups, installs the comm and returns
``(model, comm)``; ``save_sharded`` / ``load_sharded`` write and read a
``torch.distributed.checkpoint`` (DCP) checkpoint of the sharded model, the optimizer, the
comm's state (error-feedback memory, generators, counters) and an ``extra`` dict per rank, for
an exact resume.
"""

from __future__ import annotations

import io
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

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
    payload_bytes,
)
from gradcomp.integration.ddp_hooks import check_same_config
from gradcomp.numerics.block import block_scales, e8m0_decode, e8m0_encode
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.packing import pack_codes, packed_bytes
from gradcomp.numerics.rounding import quantize_fp
from gradcomp.numerics.scales import amax_to_scale

__all__ = [
    "AllToAllReduceScatter",
    "BlockReduceScatter",
    "CompressedReduceScatter",
    "DenseReduceScatter",
    "FP8ReduceScatter",
    "METHODS",
    "ScaleComReduceScatter",
    "TopKReduceScatter",
    "install",
    "load_sharded",
    "make_fsdp_comm",
    "save_sharded",
    "setup_fsdp",
    "validate_fsdp_comm",
]

_FP8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_STATE_VERSION = 1
ROOT_KEY = "<root>"


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class CompressedReduceScatter(ReduceScatter):
    """Base: buffer allocation, warm-up, the reduce op, byte counters, the promise check, state.

    Args:
        seed: base seed; rank r draws from its own stream derived from (seed, r).
        start_iter: reduce-scatter calls of each parameter group run as a dense fp32
            reduce-scatter before compressing (a warm-up, as ScaleCom's); 0 = compress from the
            first step (FSDP's groups never change, so no rebuild has to be waited for).

    Subclasses implement ``_reduce(x, group, world, rank, key) -> (chunk sum fp32, bytes sent,
    bytes promised)`` on the flat fp32 input ``x``.
    """

    method = "base"
    compressing = True

    def __init__(self, seed: int = 0, start_iter: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        _check_int(start_iter, "start_iter", 0)
        self.seed = seed
        self.start_iter = start_iter
        self.calls = 0
        self.bytes_sent = 0
        self.dense_bytes = 0
        self.group_calls: dict = {}  # group key -> reduce-scatter calls so far
        self.groups: list = []  # keys registered by install()
        self.memory: ErrorFeedback | None = None
        self._generators: dict = {}

    # ---- configuration ----

    def options(self) -> dict:
        """The method's own options (plain data)."""
        return {}

    def config(self) -> dict:
        """Plain-data configuration, compared across ranks at setup and stored in checkpoints."""
        return {"method": self.method, **self.options(), "seed": self.seed,
                "start_iter": self.start_iter}

    # ---- the ReduceScatter interface ----

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A plain buffer (FSDP copies the gradients in, and reads the output from it)."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        """Reduce-scatter ``input_tensor`` into ``output_tensor`` (group key ``ROOT_KEY``)."""
        return self.reduce(output_tensor, input_tensor, group, op, key=ROOT_KEY)

    def reduce(self, output_tensor, input_tensor, group, op, key: str = ROOT_KEY):
        """Reduce-scatter one parameter group's gradient, compressed (after the warm-up)."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        div = self._divisor(op, world)
        x = input_tensor.detach().reshape(-1).float()
        if x.numel() % world:
            raise ValueError(f"reduce-scatter input of {x.numel()} elements is not a multiple "
                             f"of the world size {world}")
        n = self.group_calls.get(key, 0)
        if n < self.start_iter or not self.compressing:
            out = torch.empty(x.numel() // world, dtype=torch.float32, device=x.device)
            dist.reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group)
            sent = promised = 4 * x.numel()
        else:
            out, sent, promised = self._reduce(x, group, world, rank, key)
        output_tensor.copy_((out / div).to(output_tensor.dtype))
        self.group_calls[key] = n + 1
        self._count(sent, promised, x.numel())
        return None

    def _reduce(self, x, group, world: int, rank: int, key: str):
        raise TypeError(f"{type(self).__name__} does not implement a compressed reduce")

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

    # ---- accounting ----

    def metrics(self) -> dict:
        """Calls, bytes sent, bytes of an fp32 reduce-scatter of the same inputs, their ratio."""
        ratio = self.dense_bytes / self.bytes_sent if self.bytes_sent else float("nan")
        return {"calls": self.calls, "bytes_sent": self.bytes_sent,
                "dense_bytes": self.dense_bytes, "compression_ratio": ratio}

    def require_compressed(self, min_ratio: float = 1.5) -> None:
        """Raise RuntimeError unless the collective ran, reduced every group ``install``
        registered, and compressed by at least ``min_ratio`` (bytes actually sent)."""
        m = self.metrics()
        name = type(self).__name__
        if not self.compressing:
            raise RuntimeError(f"{name} is the uncompressed reference: no compression asked")
        if m["calls"] == 0:
            raise RuntimeError(f"{name} was never called: FSDP reduced the gradients without "
                               "compression (was install() called on the model before "
                               "training?)")
        missed = [k for k in self.groups if self.group_calls.get(k, 0) == 0]
        if missed:
            raise RuntimeError(f"{name}: parameter groups {missed} were never reduced through "
                               "the compressed collective")
        if not m["compression_ratio"] >= min_ratio:
            raise RuntimeError(f"{name} compressed by {m['compression_ratio']:.2f}x, less than "
                               f"the {min_ratio}x asked for")

    # ---- checkpoint ----

    def state_dict(self) -> dict:
        """This rank's state (CPU tensors, plain data): config, rank, counters, per-group call
        counts (warm-up, ScaleCom's leader), generator states, error-feedback memory."""
        init = dist.is_available() and dist.is_initialized()
        return {
            "kind": "FSDPComm", "version": _STATE_VERSION, "config": self.config(),
            "rank": dist.get_rank() if init else 0,
            "world_size": dist.get_world_size() if init else 1,
            "calls": self.calls, "bytes_sent": self.bytes_sent, "dense_bytes": self.dense_bytes,
            "group_calls": dict(self.group_calls),
            "generators": {k: g.get_state() for k, g in self._generators.items()},
            "memory": self.memory.state_dict() if self.memory is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``. ValueError when it was written by another configuration
        (naming the differing fields), another rank or world size."""
        if not isinstance(state, dict) or state.get("kind") != "FSDPComm":
            raise ValueError("not an FSDP comm state (state_dict() of a CompressedReduceScatter)")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"FSDP comm state version {state.get('version')!r}, expected "
                             f"{_STATE_VERSION}")
        mine = self.config()
        if state["config"] != mine:
            diff = sorted(k for k in {*state["config"], *mine}
                          if state["config"].get(k) != mine.get(k))
            raise ValueError("FSDP comm state was written with another configuration (differs "
                             "in: " + ", ".join(f"{k}: saved {state['config'].get(k)!r}, now "
                                                f"{mine.get(k)!r}" for k in diff) + ")")
        init = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if init else (0, 1)
        if (state["rank"], state["world_size"]) != (rank, world):
            raise ValueError(f"FSDP comm state of rank {state['rank']} of {state['world_size']} "
                             f"loaded on rank {rank} of {world}")
        self.calls, self.bytes_sent = int(state["calls"]), int(state["bytes_sent"])
        self.dense_bytes = int(state["dense_bytes"])
        self.group_calls = {k: int(v) for k, v in state["group_calls"].items()}
        self._generators = {}
        for key, st in state["generators"].items():
            g = torch.Generator(device=key)
            g.set_state(st)
            self._generators[key] = g
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])


class DenseReduceScatter(CompressedReduceScatter):
    """The uncompressed reference: fp32 reduce-scatter, 4 bytes per element, counted (so that a
    run without compression reports its bytes the same way). ``compressing`` is False."""

    method = "allreduce"
    compressing = False


def _all_to_all(t: torch.Tensor, group) -> torch.Tensor:
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
        seed, start_iter: see ``CompressedReduceScatter``.
        compile: passed to ``quantize_fp``.
    """

    method = "fp8"

    def __init__(self, fmt: str = "e4m3fn", rounding: str = "stochastic", seed: int = 0,
                 compile: bool | None = None, start_iter: int = 0):
        super().__init__(seed, start_iter)
        if fmt not in _FP8:
            raise ValueError(f"fmt must be one of {', '.join(_FP8)}; got {fmt!r}")
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be one of stochastic, nearest; got {rounding!r}")
        if compile is not None and not isinstance(compile, bool):
            raise ValueError(f"compile must be None or a bool, got {compile!r}")
        self.fmt, self.rounding, self.compile = fmt, rounding, compile
        self.format = FPFormat.from_name(fmt)
        self.dtype = _FP8[fmt]

    def options(self) -> dict:
        # compile changes no value (the fused and eager kernels agree bit for bit): not compared
        return {"fmt": self.fmt, "rounding": self.rounding}

    def wire_bytes(self, numel: int) -> int:
        """One byte per element plus the 4-byte amax."""
        return int(numel) + 4

    def _reduce(self, x, group, world, rank, key):
        amax = x.abs().amax().reshape(1) if x.numel() else torch.zeros(1, device=x.device)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        s = amax_to_scale(amax[0], self.format, power_of_two=True).float()
        y = quantize_fp(x, self.format, self.rounding, scale=s,
                        generator=self.generator(x.device, rank), compile=self.compile) * s
        codes = y.to(self.dtype).view(torch.uint8)
        got = _all_to_all(codes, group)
        total = got.view(self.dtype).float().view(world, -1).sum(0) / s
        return total, codes.numel() + 4, self.wire_bytes(x.numel())


_F32_MAX = float(torch.finfo(torch.float32).max)


class BlockReduceScatter(CompressedReduceScatter):
    """Block-scaled reduce-scatter (OCP MX, NVFP4, FP8 blockwise) with block scales agreed
    across ranks and stochastic rounding, by all-to-all of packed element codes.

    Layout: the input is ``world`` chunks (chunk j for rank j); each chunk is cut into blocks of
    n consecutive elements (the format's 1-D block), the last one ragged. Per call:

    1. Agree the scales. For an E8M0 scale (the MX formats) every rank encodes its own scale of
       each block (``block_scales``, as ``e8m0_encode`` bytes; 0xFF for a block holding NaN or
       +-inf) and one all-reduce(MAX) of those bytes, 1 byte per block, gives the shared byte:
       the byte is a non-decreasing function of the block's amax under both rules (floor:
       floor(log2 amax) - emax; rceil: ceil(log2(amax / max))), so the MAX of the bytes is the
       byte of the MAX amax, i.e. the scale the format gives the block of the largest
       magnitude of any rank (and 0xFF, NaN, the largest byte, wins). For E4M3 scales (NVFP4)
       and FP32 scales (fp8_block128) the block's fp32 amax itself is all-reduced (4 bytes per
       block; non-negative floats order like their int32 bits, so the MAX runs on those bits and
       the canonical NaN, above +inf, wins): an E4M3 scale is relative to the per-tensor scale t,
       which would itself have to be agreed before any byte could be, and an FP32 scale is 4
       bytes anyway.
    2. Quantize with the shared scales: each block gets one extra element, a magnitude whose
       scale under the format's rule is the shared one (the shared amax; for E8M0 the value
       2^(k + emax) (floor) or max * 2^k (rceil), clamped to float32's max), so that
       ``quantize_block`` on blocks of n + 1 (``BlockCompress`` of that format, for its codes)
       computes exactly the shared scale: no rank's block exceeds that magnitude. Elements are
       rounded with ``rounding`` using this rank's counter-based generator. For NVFP4 the
       per-tensor scale t (one per call: the tensor is the group's whole input, every chunk)
       then comes from the largest finite shared amax, the same on every rank, so it never
       travels.
    3. All-to-all the element codes (the element format's IEEE bit patterns, packed by
       ``numerics.packing.pack_codes``: 4-bit codes two per byte, 6-bit codes four per three
       bytes, 8-bit codes one per byte), ceil(chunk * bits / 8) bytes per destination.
    4. Rank j decodes what each rank sent (code value times the shared dequantization scale,
       the same float32 product ``quantize_block`` forms) and sums in fp32 in rank order.

    Bytes per rank and call (``wire_bytes``): world * (blocks per chunk * (1 for E8M0, else 4) +
    ceil(chunk * bits / 8)); mxfp8 8.25 bits per element (ratio 3.88 against fp32), mxfp6
    6.25 (5.12), mxfp4 4.25 (7.53), nvfp4 6 (5.33), fp8_block128 8.25 (3.88).

    Unbiasedness: stochastic rounding gives E[Q(v)] = v for |v| <= max (the element maximum),
    so the sum of the ranks' dequantized values is unbiased for every element whose value over
    the shared scale lies in [-max, max]. The OCP floor rule maps the block maximum into
    [2^emax, 2^(emax + 1)), which exceeds max for every MX element format: there the block's
    largest elements (of the rank holding the maximum, or close to it) saturate to +-max * s,
    a bias towards zero (as in the format itself). The rceil variants (e.g.
    ``e4m3fn:32:e8m0:rceil``) keep amax / s <= max and give an unbiased sum in every element
    (up to float32's rounding of amax / max); NVFP4's round-to-nearest E4M3 scale can round
    down by up to 1/16, saturating the block maximum likewise. ``rounding="nearest"`` (ties to
    even) is deterministic and biased.

    NaN / inf: a block holding NaN or +-inf on any rank gets the NaN scale on every rank (E8M0
    byte 0xFF, or a NaN amax), so every element of that block is NaN in the result (never
    silently finite; a shared huge scale would turn every other rank's values of the block
    into zeros); the other blocks are unaffected (for NVFP4, t comes from the finite blocks).

    Args:
        fmt: a block format with 1-D blocks: a name of ``compressors.comm.BLOCK_COMM_FORMATS``
            (mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, nvfp4, fp8_block128) or
            ``elem:block:scale:rule[:ts]`` (``BlockFormat.from_name``), block size below 2^20.
            2-D tiles are refused: the reduce-scatter input is flat.
        rounding: "stochastic" (unbiased sum; default) or "nearest" (round half to even).
        seed, start_iter: see ``CompressedReduceScatter``.
        compile: passed to ``quantize_block`` (identical bits either way).
    """

    method = "block"

    def __init__(self, fmt: str = "mxfp8_e4m3", rounding: str = "stochastic", seed: int = 0,
                 compile: bool | None = None, start_iter: int = 0):
        super().__init__(seed, start_iter)
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be one of stochastic, nearest; got {rounding!r}")
        # BlockCompress checks fmt (a block format name, 1-D blocks, element width, codes
        # readable back exactly) and compile, naming the allowed values
        self._decoder = BlockCompress(fmt=fmt, rounding=rounding, compile=compile)
        bf = self._decoder.format
        if bf.block[0] + 1 > 1 << 20:
            raise ValueError(f"fmt {fmt!r}: block of {bf.block[0]} elements; at most 2^20 - 1")
        self.fmt, self.rounding, self.compile = fmt, rounding, compile
        self.format = bf.replace(dims=(-1,))
        # blocks of n + 1: the extra element carries the shared amax (docstring, step 2)
        self._encoder = BlockCompress(fmt=bf.replace(block=(bf.block[0] + 1,), dims=(-1,)).name,
                                      rounding=rounding, compile=compile)
        self._scale_bytes = 1 if bf.scale == "e8m0" else 4  # agreed per block
        self._codes_at = 4 if bf.scale == "e4m3" and bf.tensor_scale else 0  # BlockCompress: t

    def options(self) -> dict:
        # compile changes no value: not compared across ranks
        return {"fmt": self.fmt, "rounding": self.rounding}

    def wire_bytes(self, numel: int, world: int) -> int:
        """world * (blocks per chunk * scale bytes agreed + packed codes of a chunk)."""
        chunk = int(numel) // world
        nb = -(-chunk // self.format.block[0])
        return world * (nb * self._scale_bytes + packed_bytes(chunk, self.format.elem.bits))

    def _shared_amax(self, blocks, group):
        """Per block: (the magnitude whose scale is the agreed one, NaN where the block is
        non-finite on some rank; bytes sent)."""
        bf = self.format
        amax = blocks.abs().amax(1)
        bad = ~torch.isfinite(amax)
        if bf.scale == "e8m0":
            code = torch.where(bad, 255, e8m0_encode(block_scales(blocks, bf), "floor"))
            code = code.to(torch.uint8)
            dist.all_reduce(code, op=dist.ReduceOp.MAX, group=group)
            s = e8m0_decode(code)  # NaN for 0xFF
            lift = 2.0 ** bf.elem.emax if bf.rule == "floor" else bf.elem.max_normal
            rep = torch.clamp(s * lift, max=_F32_MAX)  # NaN stays NaN
            return rep, code.numel()
        a = torch.where(bad, float("nan"), amax).contiguous()  # canonical positive NaN
        bits = a.view(torch.int32)
        dist.all_reduce(bits, op=dist.ReduceOp.MAX, group=group)
        return bits.view(torch.float32), 4 * bits.numel()

    def _reduce(self, x, group, world, rank, key):
        bf = self.format
        n, bits = bf.block[0], bf.elem.bits
        chunk = x.numel() // world
        nb = -(-chunk // n)
        rows = world * nb
        blocks = torch.nn.functional.pad(x.view(world, chunk), (0, nb * n - chunk))
        blocks = blocks.reshape(rows, n)
        rep, sent = self._shared_amax(blocks, group)
        nan_block = torch.isnan(rep)[:, None]
        # zeroed: NaN scale already makes the block NaN; and NVFP4's t must not see them
        blocks = torch.where(nan_block, 0.0, blocks)
        ext = torch.cat([blocks, rep[:, None]], 1).reshape(-1)
        (payload,) = self._encoder.compress(ext, self.generator(x.device, rank))
        codes = self._encoder.parts([payload], ext.numel()).codes
        codes = codes.view(rows, n + 1)[:, :n].reshape(world, nb * n)[:, :chunk]
        packed = torch.stack([pack_codes(codes[j], bits) for j in range(world)])
        got = _all_to_all(packed.reshape(-1), group).view(world, -1)
        sent += packed.numel()
        # this rank's block scales (and t) as BlockCompress stores them: shared by every rank
        sb = 4 if bf.scale == "fp32" else 1
        start = self._codes_at + rank * nb * sb
        head = torch.cat([payload[: self._codes_at], payload[start: start + nb * sb]])
        total = self._decoder.decompress([torch.cat([head, got[0]])], chunk)
        for r in range(1, world):  # rank order: a fixed float sum
            total = total + self._decoder.decompress([torch.cat([head, got[r]])], chunk)
        return total, sent, self.wire_bytes(x.numel(), world)


class AllToAllReduceScatter(CompressedReduceScatter):
    """All-to-all of compressed chunks, then local decode-and-sum (ZeRO++ qgZ).

    Rank r splits its input into ``world`` equal chunks (FSDP pads the input to a multiple of
    the world size), compresses chunk j with ``compressor`` and sends it to rank j; each rank
    decodes the chunks it received and sums them in rank order (the same float sum on every
    rank). Fixed-size payloads travel in one all-to-all per payload tensor; variable-size ones
    exchange their sizes first (an all-to-all of int64, counted). Error-feedback compressors
    (top-k, ScaleCom: use ``TopKReduceScatter`` / ``ScaleComReduceScatter``) and all-reduce
    compressors are refused (ValueError).
    """

    def __init__(self, compressor: CommCompressor, seed: int = 0, start_iter: int = 0):
        super().__init__(seed, start_iter)
        if not isinstance(compressor, CommCompressor):
            raise TypeError(f"compressor must be a CommCompressor, got "
                            f"{type(compressor).__name__}")
        if compressor.needs_memory or compressor.aggregation is not Aggregation.ALLGATHER:
            raise ValueError(f"{type(compressor).__name__} needs error feedback or a shared "
                             "selection: use TopKReduceScatter or ScaleComReduceScatter; the "
                             "all-to-all reduce-scatter supports QSGD, StochasticPrune and "
                             "FPCompress")
        self.compressor = compressor
        self.method = {QSGD: "qsgd", StochasticPrune: "prune", FPCompress: "fp"}.get(
            type(compressor), type(compressor).__name__)

    def options(self) -> dict:
        cfg = self.compressor.config()
        cfg.pop("name")
        cfg.pop("compile", None)  # changes no value
        return cfg

    def _reduce(self, x, group, world, rank, key):
        comp = self.compressor
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
                theirs = _all_to_all(mine, group)
                sent += mine.numel() * 8
                promised += mine.numel() * 8
                recv_sizes = theirs.tolist()  # host sync: the receive buffer depends on it
                out = torch.empty(sum(recv_sizes), dtype=flat.dtype, device=x.device)
                dist.all_to_all_single(out, flat, recv_sizes, sizes, group=group)
            else:
                recv_sizes = sizes
                out = _all_to_all(flat, group)
            sent += payload_bytes([flat])
            received.append(list(out.split(recv_sizes)))
        for p in payloads:
            got = payload_bytes(p)
            bound = comp.wire_bytes(chunk)
            promised += got if comp.variable_size and got <= bound else bound
        total = torch.zeros(chunk, dtype=torch.float32, device=x.device)
        for r in range(world):
            total += comp.decompress([received[k][r] for k in range(len(received))], chunk)
        return total, sent, promised


class _ErrorFeedbackReduceScatter(CompressedReduceScatter):
    """Shared part of the error-feedback comms: memory per group key (input-sized, fp32)."""

    def __init__(self, compressor, beta: float, seed: int, start_iter: int, record_sent: bool):
        super().__init__(seed, start_iter)
        if not isinstance(record_sent, bool):
            raise ValueError(f"record_sent must be a bool, got {record_sent!r}")
        self.compressor = compressor
        self.memory = ErrorFeedback(beta)
        self.record_sent = record_sent
        self.last_sent: dict = {}  # group key -> dense flat tensor this rank sent (record_sent)

    def _remember(self, key, x, sent_dense) -> None:
        self.memory.update(key, x, sent_dense)
        if self.record_sent:
            self.last_sent[key] = sent_dense


class TopKReduceScatter(_ErrorFeedbackReduceScatter):
    """Top-k per destination chunk with error feedback, by all-to-all (scheme and bytes in the
    module docstring).

    Args:
        ratio: fraction kept per chunk, k = ceil(ratio * chunk) (at least 1), in (0, 1).
        beta: error-feedback filter in (0, 1]; 1 = plain error feedback (exact identity).
        seed, start_iter: see ``CompressedReduceScatter`` (top-k itself draws no random numbers).
        record_sent: keep the dense tensor each group sent last in ``last_sent`` (diagnostics
            and tests; costs one input-sized tensor per group).
    """

    method = "topk"

    def __init__(self, ratio: float = 0.01, beta: float = 1.0, seed: int = 0,
                 start_iter: int = 0, record_sent: bool = False):
        super().__init__(TopK(ratio=ratio), beta, seed, start_iter, record_sent)

    def options(self) -> dict:
        return {"ratio": self.compressor.ratio, "beta": self.memory.beta}

    def wire_bytes(self, numel: int, world: int) -> int:
        """world chunks of numel / world elements, each k int32 indices + k fp32 values."""
        return world * self.compressor.wire_bytes(int(numel) // world)

    def _reduce(self, x, group, world, rank, key):
        comp = self.compressor
        chunk = x.numel() // world
        x = self.memory.compensate(key, x)
        rows = x.view(world, chunk)
        payloads = [comp.compress(row) for row in rows]  # [int32 indices, values] per chunk
        idx = torch.stack([p[0] for p in payloads])
        vals = torch.stack([p[1] for p in payloads]).float()
        sent_dense = torch.zeros_like(rows).scatter_(1, idx.long(), vals).reshape(-1)
        self._remember(key, x, sent_dense)
        got_idx = _all_to_all(idx.reshape(-1), group).view(world, -1)
        got_vals = _all_to_all(vals.reshape(-1), group).view(world, -1)
        total = torch.zeros(chunk, dtype=torch.float32, device=x.device)
        for r in range(world):  # rank order: a fixed float sum
            total.index_add_(0, got_idx[r].long(), got_vals[r])
        sent = payload_bytes([idx, vals])
        return total, sent, self.wire_bytes(x.numel(), world)


class ScaleComReduceScatter(_ErrorFeedbackReduceScatter):
    """ScaleCom (cyclic local top-k, low-pass filtered error feedback) as a reduce-scatter:
    the leader's per-chunk indices broadcast, then a reduce-scatter of the selected values
    (scheme and bytes in the module docstring).

    Args:
        ratio: fraction selected per chunk, k = ceil(ratio * chunk) (at least 1), in (0, 1).
        beta: ScaleCom's low-pass filter of the memory, in (0, 1]; 1 = plain error feedback.
        seed, start_iter, record_sent: as ``TopKReduceScatter``.
    """

    method = "scalecom"

    def __init__(self, ratio: float = 0.01, beta: float = 1.0, seed: int = 0,
                 start_iter: int = 0, record_sent: bool = False):
        comp = ScaleCom(ratio=ratio, beta=beta)
        super().__init__(comp, beta, seed, start_iter, record_sent)
        self.last_indices: dict = {}  # group key -> (world, k) indices shared at its last call

    def options(self) -> dict:
        return {"ratio": self.compressor.ratio, "beta": self.compressor.beta}

    def wire_bytes(self, numel: int, world: int, leader: bool = False) -> int:
        """world * k fp32 values; the leader also broadcasts world * k int32 indices."""
        k = self.compressor.num_selected(int(numel) // world)
        return world * k * 4 + (world * k * 4 if leader else 0)

    def _reduce(self, x, group, world, rank, key):
        comp = self.compressor
        chunk = x.numel() // world
        x = self.memory.compensate(key, x)
        rows = x.view(world, chunk)
        k = comp.num_selected(chunk)
        leader = comp.leader(self.group_calls.get(key, 0) - self.start_iter, world)
        sent = 0
        if rank == leader:
            idx = torch.stack([comp.select(row) for row in rows])
            sent += payload_bytes([idx])
        else:
            idx = torch.empty(world, k, dtype=torch.int32, device=x.device)
        dist.broadcast(idx, src=dist.get_global_rank(group, leader), group=group)
        self.last_indices[key] = idx
        vals = torch.stack([comp.compress(rows[j], indices=idx[j])[0] for j in range(world)])
        sent_dense = torch.zeros_like(rows).scatter_(1, idx.long(), vals).reshape(-1)
        self._remember(key, x, sent_dense)
        summed = torch.empty(k, dtype=torch.float32, device=x.device)
        dist.reduce_scatter_single(summed, vals.reshape(-1).contiguous(), op=dist.ReduceOp.SUM,
                                   group=group)
        sent += payload_bytes([vals])
        total = comp.decompress([summed], chunk, indices=idx[rank])
        return total, sent, self.wire_bytes(x.numel(), world, leader=rank == leader)


class _GroupReduceScatter(ReduceScatter):
    """What one FSDP module holds: the shared comm and this parameter group's key."""

    def __init__(self, comm: CompressedReduceScatter, key: str):
        self.comm, self.key = comm, key

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.comm.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        return self.comm.reduce(output_tensor, input_tensor, group, op, key=self.key)


def install(module: torch.nn.Module, comm: CompressedReduceScatter) -> CompressedReduceScatter:
    """Set ``comm`` as the reduce-scatter of every FSDP module in ``module`` (after
    ``fully_shard``), each group under its module name (``ROOT_KEY`` for ``module`` itself);
    returns ``comm``. Raises ValueError when ``module`` holds no FSDP module."""
    if not isinstance(comm, CompressedReduceScatter):
        raise TypeError(f"comm must be a CompressedReduceScatter, got {type(comm).__name__}")
    mods = [(name or ROOT_KEY, m) for name, m in module.named_modules()
            if isinstance(m, FSDPModule)]
    if not mods:
        raise ValueError("install: no FSDP module found; call fully_shard(...) first")
    for name, m in mods:
        m.set_custom_reduce_scatter(_GroupReduceScatter(comm, name))
        # a module without trainable parameters of its own never reduces
        if any(p.requires_grad for p in _own_parameters(m)) and name not in comm.groups:
            comm.groups.append(name)
    return comm


def _own_parameters(m: torch.nn.Module):
    """Parameters that the FSDP module ``m`` manages (not those of nested FSDP modules)."""
    nested = {id(p) for sub in m.modules() if sub is not m and isinstance(sub, FSDPModule)
              for p in sub.parameters()}
    return [p for p in m.parameters() if id(p) not in nested]


# ---- registry, option validation, setup ----

_EF = {"topk": TopKReduceScatter, "scalecom": ScaleComReduceScatter}
_A2A = {"qsgd": QSGD, "prune": StochasticPrune, "fp": FPCompress}
METHODS = ("allreduce", "fp8", "qsgd", "prune", "fp", "topk", "scalecom", "block")
_COMMON = {"seed": (int,), "start_iter": (int,)}
_OPTIONS = {
    "allreduce": {},
    "fp8": {"fmt": (str,), "rounding": (str,), "compile": (bool, type(None))},
    "block": {"fmt": (str,), "rounding": (str,), "compile": (bool, type(None))},
    "topk": {"ratio": (int, float), "beta": (int, float), "record_sent": (bool,)},
    "scalecom": {"ratio": (int, float), "beta": (int, float), "record_sent": (bool,)},
    "qsgd": {"levels": (int,), "bucket_size": (int,), "code": (str,), "bitstream": (bool,)},
    "prune": {"sparsity": (int, float)},
    "fp": {"fmt": (str,), "rounding": (str,), "scale": (str,), "compile": (bool, type(None))},
}


def validate_fsdp_comm(method, options=None) -> None:
    """Check an FSDP ``--comm`` method and its options without a process group (the CLI calls
    it before spawning). ValueError naming the method or option and the allowed values."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"FSDP comm method {method!r} is not available; allowed: "
                         f"{', '.join(METHODS)} (fp16 and powersgd exist for DDP only)")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"comm options must be a dict, got {type(options).__name__}")
    allowed = {**_OPTIONS[method], **_COMMON}
    for name, value in options.items():
        if name not in allowed:
            raise ValueError(f"comm option {name!r} is not accepted by FSDP {method}; allowed: "
                             f"{', '.join(sorted(allowed))}")
        want = allowed[name]
        if (isinstance(value, bool) and bool not in want) or not isinstance(value, want):
            names = "/".join(t.__name__ for t in want)
            raise ValueError(f"comm option {name!r} of FSDP {method} must be {names}; got "
                             f"{type(value).__name__} {value!r}")
    try:
        make_fsdp_comm(method, options, _validate=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"comm option of FSDP {method}: {exc}") from None


def make_fsdp_comm(method: str, options: dict | None = None, seed: int | None = None, *,
                   _validate: bool = True) -> CompressedReduceScatter:
    """Build the comm of ``method`` (one of ``METHODS``) from its options (the compressor's
    fields, plus ``seed`` and ``start_iter``). ``seed`` here, when given, is the default of the
    option ``seed`` (both given and different: ValueError)."""
    if _validate:
        validate_fsdp_comm(method, options)
    opts = dict(options or {})
    if seed is not None:
        if "seed" in opts and opts["seed"] != seed:
            raise ValueError(f"seed given twice: {seed!r} and comm option seed {opts['seed']!r}")
        opts["seed"] = seed
    if method == "allreduce":
        return DenseReduceScatter(**opts)
    if method == "fp8":
        return FP8ReduceScatter(**opts)
    if method == "block":
        return BlockReduceScatter(**opts)
    if method in _EF:
        return _EF[method](**opts)
    common = {k: opts.pop(k) for k in list(opts) if k in _COMMON}
    return AllToAllReduceScatter(_A2A[method](**opts), **common)


def _shard_targets(model: torch.nn.Module) -> list:
    """(name, module) of the children that become their own FSDP group: every child with
    parameters, looking inside ModuleList / ModuleDict (containers that never run forward)."""
    out = []

    def visit(mod, prefix):
        for name, child in mod.named_children():
            fqn = prefix + name
            if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                visit(child, fqn + ".")
            elif any(True for _ in child.parameters()):
                out.append((fqn, child))

    visit(model, "")
    return out


def setup_fsdp(model: torch.nn.Module, comm_method: str = "allreduce",
               comm_options: dict | None = None, seed: int = 0, *, mesh=None,
               groups: list | None = None, extra_config: dict | None = None, **shard_kw):
    """Shard ``model`` with FSDP2, check the configuration on every rank, install the comm.

    Every child with parameters (looking inside ModuleList / ModuleDict) becomes its own FSDP
    group, or, with ``groups``, the submodules of those names (e.g. ``["stages.0",
    "stages.1"]``; nested names are sharded innermost first); then the root takes the remaining
    parameters. ``shard_kw`` goes to ``fully_shard``
    (e.g. ``reshard_after_forward``, ``mp_policy``). Before sharding, every rank all-gathers a
    digest of the comm's configuration, the world size, the groups' parameter shapes and
    ``extra_config`` (e.g. the training config), and all ranks raise ValueError together naming
    the differing fields and each rank's value (``ddp_hooks.check_same_config``; fields
    ``comm_<option>``, ``world_size``, ``fsdp_group <name>``, and those of ``extra_config``).
    A collective: every rank calls it.

    Returns ``(model, comm)``: the sharded model (the same object, now an FSDP module) and the
    comm (``comm.metrics()``, ``comm.require_compressed()``, ``comm.state_dict()``).
    """
    comm = make_fsdp_comm(comm_method, comm_options, seed)
    group = mesh.get_group() if mesh is not None else None
    if groups is None:
        targets = _shard_targets(model)
    else:
        if not isinstance(groups, (list, tuple)) or not all(
                isinstance(g, str) and g for g in groups):
            raise ValueError(f"groups must be a list of submodule names, got {groups!r}")
        try:
            targets = [(g, model.get_submodule(g)) for g in groups]
        except AttributeError as exc:
            raise ValueError(f"groups: {exc}") from None
        targets.sort(key=lambda t: -t[0].count("."))  # inner modules before their parents
    in_groups = {id(p) for _, m in targets for p in m.parameters()}
    shapes = [[name, [list(p.shape) for p in m.parameters()]] for name, m in targets]
    shapes.append([ROOT_KEY, [list(p.shape) for p in model.parameters()
                              if id(p) not in in_groups]])
    config = {**{f"comm_{k}": v for k, v in comm.config().items()},
              "world_size": dist.get_world_size(group),
              **{f"fsdp_group {name}": shape for name, shape in shapes},
              **(extra_config or {})}
    try:
        check_same_config(config, group)
    except ValueError as exc:
        raise ValueError(f"FSDP setup refused: {exc}") from None
    kw = dict(shard_kw)
    if mesh is not None:
        kw["mesh"] = mesh
    for _, m in targets:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    install(model, comm)
    return model, comm


# ---- sharded checkpoints (torch.distributed.checkpoint) ----


def _blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unblob(data: bytes, weights_only: bool):
    return torch.load(io.BytesIO(data), weights_only=weights_only)


def save_sharded(path, model, optimizer, comm: CompressedReduceScatter, extra=None) -> None:
    """Write a DCP checkpoint to the directory ``path`` (a collective: every rank calls it).

    Holds the sharded model and optimizer states (each rank writes its shards,
    ``torch.distributed.checkpoint.state_dict.get_state_dict``), and per rank the comm's
    ``state_dict`` (error-feedback memory, generators, counters) and ``extra`` (any picklable
    value, e.g. step counters and random states; rank r's own).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
    else:
        msd, osd = get_model_state_dict(model), None
    state = {"model": msd, "comm": {f"rank{rank}": _blob(comm.state_dict())},
             "extra": {f"rank{rank}": _blob(extra)}, "world_size": world}
    if osd is not None:
        state["optim"] = osd
    os.makedirs(path, exist_ok=True)
    dcp.save(state, checkpoint_id=os.fspath(path))


def load_sharded(path, model, optimizer, comm: CompressedReduceScatter):
    """Load what ``save_sharded`` wrote into ``model``, ``optimizer`` and ``comm`` (a
    collective); returns this rank's ``extra``. ValueError when the checkpoint was written by
    another number of ranks, without an optimizer state that is asked for, or by another comm
    configuration (``comm.load_state_dict``'s checks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    ranks = sorted(k for k in meta if k.startswith("comm.rank"))
    if len(ranks) != world or f"comm.rank{rank}" not in meta:
        raise ValueError(f"checkpoint {os.fspath(path)!r} was written by {len(ranks)} ranks; "
                         f"this run has {world}")
    has_optim = any(k.startswith("optim.") for k in meta)
    if optimizer is not None and not has_optim:
        raise ValueError(f"checkpoint {os.fspath(path)!r} holds no optimizer state")
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
    else:
        msd, osd = get_model_state_dict(model), None
    state = {"model": msd, "comm": {f"rank{rank}": b""}, "extra": {f"rank{rank}": b""},
             "world_size": 0}
    if osd is not None:
        state["optim"] = osd
    dcp.load(state, checkpoint_id=os.fspath(path))
    # the comm's checks (configuration, rank, world size) run before any module changes
    comm.load_state_dict(_unblob(state["comm"][f"rank{rank}"], weights_only=True))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    return _unblob(state["extra"][f"rank{rank}"], weights_only=False)
