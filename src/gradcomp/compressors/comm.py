"""Compressors of weight gradients for data-parallel communication (notes section 6).

GRACE's split: a *compressor* (this module: ``compress`` / ``decompress``, pure tensor work, no
``torch.distributed``), a *memory* (``ErrorFeedback``) and a *communicator* (the DDP hooks in
``gradcomp.integration.ddp_hooks``). Every compressor declares the collective that can carry its
payload:

* ``Aggregation.ALLREDUCE``: payloads of different ranks can be summed element-wise and the sum
  decodes to the sum of the gradients (ScaleCom: every rank sends values at the *same* indices).
* ``Aggregation.ALLGATHER``: payloads must be gathered and decoded one by one (QSGD's levels
  share no scale across ranks; top-k / pruning supports differ across ranks). Summing them is
  wrong, so ``require_aggregation`` refuses the pairing in code (GRACE's default all-reduce
  silently sums QSGD codes).

Payloads are lists of 1-D tensors; their dtypes are the ones actually put on the wire, so
``payload_bytes`` is the honest size. Randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from gradcomp.compressors import elias
from gradcomp.numerics._checks import (
    require_choice,
    require_float_tensor,
    require_int_range,
    require_open_unit,
)
from gradcomp.numerics.fit import fit_lognormal
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import quantize_fp

__all__ = [
    "Aggregation",
    "CommCompressor",
    "ErrorFeedback",
    "FPQuantize",
    "IncompatibleAggregationError",
    "QSGD",
    "ScaleCom",
    "StochasticPrune",
    "TopK",
    "payload_bytes",
    "qsgd_bits_bound",
    "require_aggregation",
]


class Aggregation(enum.Enum):
    """The collective that can carry a compressor's payload."""

    ALLREDUCE = "allreduce"
    ALLGATHER = "allgather"


class IncompatibleAggregationError(TypeError):
    """A communicator was paired with a compressor whose payloads it cannot combine."""


def require_aggregation(compressor, aggregation: Aggregation) -> None:
    """Raise IncompatibleAggregationError unless ``compressor`` declares ``aggregation``."""
    if compressor.aggregation is not aggregation:
        raise IncompatibleAggregationError(
            f"{type(compressor).__name__} declares {compressor.aggregation.value}; a "
            f"{aggregation.value} communicator cannot carry it (e.g. summing QSGD levels of "
            "different ranks does not decode to the sum of their gradients)"
        )


def payload_bytes(payload) -> int:
    """Bytes on the wire of a payload (list of tensors): sum of numel * element size."""
    return sum(t.numel() * t.element_size() for t in payload)


def _k_of(ratio: float, numel: int) -> int:
    return max(1, min(numel, math.ceil(ratio * numel)))


class CommCompressor:
    """Base class: subclasses set ``aggregation`` and implement compress / decompress."""

    aggregation: Aggregation
    needs_memory: bool = False

    def config(self) -> dict:
        """Plain-data configuration (compared across ranks when a hook is registered)."""
        return {"name": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class QSGD(CommCompressor):
    """QSGD (seed 004; notes section 6): unbiased stochastic levels per bucket of ``d`` coordinates.

    Per bucket v (d consecutive coordinates of the flattened gradient, the last one zero padded):
    ``Q_i(v) = ||v||_2 sgn(v_i) xi_i / s`` with ``xi_i = l`` or ``l + 1``, ``l = floor(s |v_i| /
    ||v||)``, the upper level with probability ``s |v_i| / ||v|| - l``. So ``E[Q(v)] = v`` and
    ``E||Q(v)||^2 <= (1 + min(d / s^2, sqrt(d) / s)) ||v||^2``.

    Wire format (``compress``): fp32 norms (one per bucket) and signed integer levels in the
    smallest integer dtype that holds +-s (int8 for s <= 127). ``encode`` / ``decode`` turn that
    into a real bit stream with Elias codes (see ``encode``).

    Semantics: a zero bucket gives norm 0 and all levels 0. A bucket holding NaN or +-inf sends a
    non-finite norm and decodes to NaN in every coordinate of that bucket (never silently finite).

    Args:
        levels: s, number of positive levels, in [1, 32767].
        bucket_size: d, coordinates per bucket (and per norm), >= 1.
        code: Elias code of the bit stream, "omega" (recursive, the seed's choice) or "gamma".
        bitstream: when True the DDP hook sends ``encode``'s bytes instead of the fixed arrays.
    """

    levels: int = 16
    bucket_size: int = 512
    code: str = "omega"
    bitstream: bool = False

    aggregation = Aggregation.ALLGATHER

    def __post_init__(self):
        require_int_range(self.levels, "levels (s)", 1, 32767)
        require_int_range(self.bucket_size, "bucket_size (d)", 1, 1 << 40)
        require_choice(self.code, "code", elias.CODES)
        if not isinstance(self.bitstream, bool):
            raise TypeError(f"bitstream must be a bool, got {self.bitstream!r}")

    @property
    def level_dtype(self) -> torch.dtype:
        """Wire dtype of the signed levels: int8 when s <= 127, else int16."""
        return torch.int8 if self.levels <= 127 else torch.int16

    def quantize(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Return (norms float32 [nb], signed levels [nb * d]) of the flattened ``x``."""
        require_float_tensor(x, "x")
        s, d = self.levels, self.bucket_size
        v = x.detach().reshape(-1).float()
        n = v.numel()
        nb = -(-n // d)
        v = torch.nn.functional.pad(v, (0, nb * d - n)).view(nb, d)
        norms = torch.linalg.vector_norm(v, dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        r = torch.nan_to_num(s * v.abs() / safe[:, None], nan=0.0, posinf=0.0)
        low = torch.floor(r)
        u = torch.rand(r.shape, generator=generator, device=r.device, dtype=r.dtype)
        xi = low + (u < (r - low)).to(r.dtype)  # P(upper) = r - l: unbiased
        q = (torch.sign(v) * xi).to(self.level_dtype)
        return norms, q.reshape(-1)

    def dequantize(self, norms: torch.Tensor, q: torch.Tensor, numel: int, dtype=torch.float32):
        """Inverse map of ``quantize``: ``norm * level / s`` per coordinate, first ``numel``."""
        d = self.bucket_size
        scaled = norms.float()[:, None] * q.view(-1, d).float() / self.levels
        # a non-finite norm must poison its bucket even where the level is 0 (inf * 0 = NaN)
        bad = ~torch.isfinite(norms)[:, None]
        scaled = torch.where(bad, torch.full_like(scaled, float("nan")), scaled)
        return scaled.reshape(-1)[:numel].to(dtype)

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Payload [norms fp32, levels int8/int16] of ``x`` (flattened)."""
        norms, q = self.quantize(x, generator)
        return [norms, q]

    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Dense flat tensor of ``numel`` elements from one rank's payload."""
        norms, q = payload
        return self.dequantize(norms, q, numel, dtype)

    # ---- bit stream (seed 004: Elias codes of gaps between non-zeros and of levels) ----
    _MAGIC = 0x5153  # "QS"

    def encode(self, norms: torch.Tensor, q: torch.Tensor, numel: int) -> np.ndarray:
        """Serialise one quantized gradient into bytes (numpy uint8), exactly decodable.

        Layout (bits, MSB first): 16 magic, 16 s, 48 d, 64 numel, 64 nnz | fp32 norms (32 each)
        | Elias codes of the gaps between non-zero positions (first gap = index + 1) | one sign
        bit per non-zero (1 = negative) | Elias codes of the non-zero level magnitudes | zero
        padding to a byte. Host work: the tensors are copied to the CPU.
        """
        n = int(numel)
        qn = q.detach().reshape(-1)[:n].to("cpu", torch.int64).numpy()
        idx = np.flatnonzero(qn)
        gaps = np.diff(idx, prepend=-1)
        mags = np.abs(qn[idx])
        header = elias.emit_fields(
            np.array([self._MAGIC, self.levels, self.bucket_size, n, idx.size]),
            np.array([16, 16, 48, 64, 64]),
        )
        nb = norms.detach().to("cpu", torch.float32).numpy()
        norm_bits = np.unpackbits(nb.astype(">f4").view(np.uint8))
        parts = [
            header,
            norm_bits,
            elias.elias_encode(gaps, self.code),
            (qn[idx] < 0).astype(np.uint8),
            elias.elias_encode(mags, self.code),
        ]
        return elias.pack_bits(np.concatenate(parts))[0]

    def decode(self, data, device=None):
        """Inverse of ``encode``: returns (norms, levels, numel) as tensors on ``device``.

        Raises ValueError when the stream is truncated, corrupted (bad magic, positions past the
        end, levels above s, non-zero padding, trailing bits) or was written with another s/d.
        """
        bits = np.unpackbits(np.asarray(data, dtype=np.uint8).reshape(-1))
        rd = elias.read_uint
        if rd(bits, 0, 16) != self._MAGIC:
            raise ValueError("corrupted QSGD stream: bad magic number")
        s, d, n, nnz = rd(bits, 16, 16), rd(bits, 32, 48), rd(bits, 80, 64), rd(bits, 144, 64)
        if (s, d) != (self.levels, self.bucket_size):
            raise ValueError(
                f"QSGD stream written with levels={s}, bucket_size={d}; this decoder has "
                f"levels={self.levels}, bucket_size={self.bucket_size}"
            )
        if nnz > n:
            raise ValueError(f"corrupted QSGD stream: {nnz} non-zeros in {n} coordinates")
        nb = -(-n // d)
        pos = 208
        if pos + 32 * nb > bits.size:
            raise ValueError("truncated QSGD stream: norms missing")
        norms = np.packbits(bits[pos : pos + 32 * nb]).view(">f4").astype(np.float32)
        pos += 32 * nb
        gaps, pos = elias.elias_decode(bits, nnz, self.code, pos)
        if pos + nnz > bits.size:
            raise ValueError("truncated QSGD stream: signs missing")
        neg = bits[pos : pos + nnz].astype(bool)
        pos += nnz
        mags, pos = elias.elias_decode(bits, nnz, self.code, pos)
        if bits.size - pos >= 8 or bits[pos:].any():
            raise ValueError("corrupted QSGD stream: trailing bits after the last code")
        idx = np.cumsum(gaps) - 1
        if nnz and idx[-1] >= n:
            raise ValueError("corrupted QSGD stream: a position lies past the tensor end")
        if nnz and mags.max() > s:
            raise ValueError(f"corrupted QSGD stream: a level exceeds s={s}")
        q = np.zeros(nb * d, dtype=np.int64)
        q[idx] = np.where(neg, -mags, mags)
        qt = torch.from_numpy(q).to(device=device, dtype=self.level_dtype)
        return torch.from_numpy(norms).to(device), qt, n

    def encoded_bits(self, norms, q, numel) -> int:
        """Bits of ``encode``'s stream before byte padding (for bits-per-coordinate figures)."""
        qn = q.detach().reshape(-1)[: int(numel)].to("cpu", torch.int64).numpy()
        idx = np.flatnonzero(qn)
        if idx.size == 0:
            return 208 + 32 * norms.numel()
        g = elias.code_lengths(np.diff(idx, prepend=-1), self.code).sum()
        m = elias.code_lengths(np.abs(qn[idx]), self.code).sum()
        return int(208 + 32 * norms.numel() + g + idx.size + m)


def qsgd_bits_bound(levels: int, bucket_size: int, float_bits: int = 32) -> float:
    """Seed 004's expected bits per coordinate for one bucket, the smaller of its two theorems.

    Sparse ("sublinear") regime: ``F + (3 + 1.5 log2(2 (s^2 + d) / (s^2 + sqrt d))) (s^2 + sqrt
    d)``; dense ("linear") regime: ``F + (0.5 (log2(1 + (s^2 + min(d, s sqrt d)) / d) + 1) + 2) d``;
    both with their (1 + o(1)) factors dropped, so the bound is asymptotic, divided by d.
    """
    s, d, f = levels, bucket_size, float_bits
    sparse = f + (3 + 1.5 * math.log2(2 * (s * s + d) / (s * s + math.sqrt(d)))) * (
        s * s + math.sqrt(d)
    )
    dense = f + (0.5 * (math.log2(1 + (s * s + min(d, s * math.sqrt(d))) / d) + 1) + 2) * d
    return min(sparse, dense) / d


@dataclass(frozen=True)
class TopK(CommCompressor):
    """Top-k sparsification (keep the k = ceil(ratio * n) largest |x|), used with error feedback.

    Payload: int32 indices and the values at them (in the input dtype). Supports differ across
    ranks, so the payload is all-gathered and scattered-added (ALLGATHER). Ties at the k-th
    magnitude are broken by ``torch.topk`` (unspecified order); NaN counts as largest.
    """

    ratio: float = 0.01

    aggregation = Aggregation.ALLGATHER
    needs_memory = True

    def __post_init__(self):
        require_open_unit(self.ratio, "ratio")

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Payload [int32 indices, values] of the k largest |x| (``generator`` unused)."""
        require_float_tensor(x, "x")
        flat = x.reshape(-1)
        idx = torch.topk(flat.abs(), _k_of(self.ratio, flat.numel()), sorted=False).indices
        return [idx.to(torch.int32), flat[idx]]

    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Dense flat tensor: the values at their indices, zeros elsewhere."""
        idx, vals = payload
        out = torch.zeros(numel, dtype=dtype, device=vals.device)
        return out.index_put_((idx.long(),), vals.to(dtype), accumulate=True)


@dataclass(frozen=True)
class ScaleCom(CommCompressor):
    """ScaleCom (seed 003; notes section 6): cyclic local top-k and low-pass error feedback.

    At step t the leader rank ``t mod n`` picks the top-k indices (k = ceil(ratio * numel)) of its
    own ``m + g`` (``select``); the indices are broadcast; every rank sends its own ``m + g`` at
    those indices (``compress``) and an ordinary all-reduce sums them (ALLREDUCE). Memory:
    ``m <- (1 - beta) m + beta (m + g - C(m + g))`` (``ErrorFeedback(beta)``); beta = 1 is plain
    error feedback, smaller beta low-pass filters the residual.
    """

    ratio: float = 0.01
    beta: float = 1.0

    aggregation = Aggregation.ALLREDUCE
    needs_memory = True

    def __post_init__(self):
        require_open_unit(self.ratio, "ratio")
        if not (isinstance(self.beta, (int, float)) and 0.0 < float(self.beta) <= 1.0):
            raise ValueError(f"beta must lie in (0, 1], got {self.beta!r}")

    @staticmethod
    def leader(step: int, world_size: int) -> int:
        """Rank that selects the indices at ``step``: ``step mod world_size`` (cyclic)."""
        return step % world_size

    def num_selected(self, numel: int) -> int:
        """k for a bucket of ``numel`` elements: ceil(ratio * numel), at least 1."""
        return _k_of(self.ratio, numel)

    def select(self, corrected: torch.Tensor) -> torch.Tensor:
        """Leader only: int32 indices of the k largest |m + g| (ascending order)."""
        flat = corrected.reshape(-1)
        idx = torch.topk(flat.abs(), self.num_selected(flat.numel()), sorted=False).indices
        return torch.sort(idx).values.to(torch.int32)

    def compress(self, x: torch.Tensor, indices: torch.Tensor):
        """This rank's values at the shared ``indices`` (the all-reduce payload)."""
        require_float_tensor(x, "x")
        return [x.reshape(-1)[indices.long()]]

    def decompress(self, payload, indices: torch.Tensor, numel: int, dtype=torch.float32):
        """Dense flat tensor with the (summed or own) values at the shared indices."""
        (vals,) = payload
        out = torch.zeros(numel, dtype=dtype, device=vals.device)
        out[indices.long()] = vals.to(dtype)
        return out


# (exp_bits, man_bits, special) -> exact container dtype and the same-width integer wire view
_CONTAINERS = (
    (lambda f: (f.semantics, f.exp_bits, f.man_bits, f.special) == ("ieee", 4, 3, "fn"),
     torch.float8_e4m3fn, torch.uint8),
    (lambda f: f.fits(5, 2), torch.float8_e5m2, torch.uint8),
    (lambda f: f.fits(8, 7), torch.bfloat16, torch.int16),
    (lambda f: f.fits(5, 10), torch.float16, torch.int16),
)


@dataclass(frozen=True)
class FPQuantize(CommCompressor):
    """FP quantization of the communicated gradient (notes section 2) with a per-bucket scale.

    ``y = Q(x * s)`` with ``quantize_fp`` (``rounding`` "stochastic": unbiased inside the range;
    "nearest": round half to even), ``s`` a power of two (exact scaling):

    * ``scale="lognormal"``: ``s = 2^floor(-mean(log2|x|) - 3)`` (the authors' per-layer scale,
      notes section 2, from ``fit_lognormal``); 1 when x has no finite non-zero value.
    * ``scale="amax"``: ``s = 2^floor(log2(max_normal / amax))``; 1 when amax is 0 or not finite.
    * ``scale="none"``: s = 1.

    Payload: y in the narrowest IEEE dtype holding every value of the format exactly
    (float8_e4m3fn, float8_e5m2, bfloat16, float16, else float32), sent as a same-width integer
    view, plus s as one fp32. ``compile`` is passed to ``quantize_fp`` (None: its module switch;
    False avoids a torch.compile per new bucket size). Decoding divides by s. Overflow / NaN
    follow ``quantize_fp`` (the format's overflow policy; NaN stays NaN). Sums of quantized
    values are not on the grid, so the payload is all-gathered and decoded (ALLGATHER).
    """

    fmt: str = "e4m3fn"
    rounding: str = "stochastic"
    scale: str = "lognormal"
    compile: bool | None = None

    aggregation = Aggregation.ALLGATHER

    def __post_init__(self):
        require_choice(self.rounding, "rounding", ("stochastic", "nearest"))
        require_choice(self.scale, "scale", ("lognormal", "amax", "none"))
        self.format  # noqa: B018  (validates the name now, not in the hot path)

    @property
    def format(self) -> FPFormat:
        return FPFormat.from_name(self.fmt)

    @property
    def wire(self) -> tuple[torch.dtype, torch.dtype]:
        f = self.format
        for test, dtype, view in _CONTAINERS:
            if test(f):
                return dtype, view
        return torch.float32, torch.int32

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        one = torch.ones((), dtype=torch.float32, device=x.device)
        if self.scale == "none":
            return one
        if self.scale == "lognormal":
            e = torch.floor(-fit_lognormal(x).mean_log2 - 3).float()
        else:
            amax = x.detach().abs().amax().float()
            e = torch.floor(torch.log2(self.format.max_normal / amax))
        e = torch.clamp(torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0), -126, 126)
        return torch.exp2(e)

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Payload [quantized codes (integer view), scale s (1 fp32)] of the flattened x."""
        require_float_tensor(x, "x")
        flat = x.detach().reshape(-1).float()
        s = self._scale(flat)
        y = quantize_fp(flat, self.format, self.rounding, scale=s, generator=generator,
                        compile=self.compile) * s
        dtype, view = self.wire
        return [y.to(dtype).view(view), s.reshape(1)]

    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Codes viewed back as the container dtype, divided by s."""
        codes, s = payload
        return (codes.view(self.wire[0]).float() / s).to(dtype)


@dataclass(frozen=True)
class StochasticPrune(CommCompressor):
    """Unbiased stochastic pruning (Eq. 5) with the lognormal threshold (Eq. 8; notes section 3).

    Per bucket: ``fit_lognormal`` gives mu, sigma and the zero fraction z of the gradient;
    ``lognormal_threshold(sparsity, mu, sigma, z)`` the threshold a (0 when z >= sparsity: no
    pruning; also 0 when fewer than two finite non-zeros are left to fit);
    ``stochastic_prune(x, a)`` keeps |x| > a, maps a*eps <= |x| <= a to sign(x) a and
    the rest to 0, so E[T(x)] = x and no error feedback is needed. Payload: int32 indices and
    fp32 values of the survivors; their number varies, so it costs one host sync (size exchange
    before the all-gather). NaN / inf handling is ``stochastic_prune``'s.
    """

    sparsity: float = 0.9

    aggregation = Aggregation.ALLGATHER
    variable_size = True

    def __post_init__(self):
        require_open_unit(self.sparsity, "sparsity")

    @staticmethod
    def available() -> bool:
        """True when the pruning and sparsity modules this compressor reuses are importable."""
        try:
            import gradcomp.compressors.pruning  # noqa: F401
            import gradcomp.numerics.sparsity  # noqa: F401
        except ImportError:
            return False
        return True

    def threshold(self, x: torch.Tensor) -> torch.Tensor:
        """Lognormal threshold a of ``x`` for the target sparsity (0-d tensor; the solver's
        argument checks read a few scalars on the host)."""
        from gradcomp.numerics.sparsity import lognormal_threshold

        fit = fit_lognormal(x)
        ok = fit.ok  # fewer than 2 finite non-zeros: nothing to fit, threshold 0 (no pruning)
        mu = torch.where(ok, fit.mu, torch.zeros_like(fit.mu))
        sigma = torch.where(ok, fit.sigma, torch.ones_like(fit.sigma))
        a = lognormal_threshold(self.sparsity, mu, sigma, fit.zero_fraction.clamp(0.0, 1.0))
        return torch.where(ok, a, torch.zeros_like(a))

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Payload [int32 indices, fp32 values] of the non-zeros of the pruned flat x."""
        from gradcomp.compressors.pruning import stochastic_prune

        require_float_tensor(x, "x")
        flat = x.detach().reshape(-1).float()
        y = stochastic_prune(flat, self.threshold(flat), generator=generator)
        idx = torch.nonzero(y).reshape(-1)  # host sync: the survivor count sizes the payload
        return [idx.to(torch.int32), y[idx]]

    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Dense flat tensor: survivors at their indices, zeros elsewhere."""
        idx, vals = payload
        out = torch.zeros(numel, dtype=dtype, device=vals.device)
        out[idx.long()] = vals.to(dtype)
        return out


class ErrorFeedback:
    """Per-key error-feedback memory: ``m <- (1 - beta) m + beta (m + g - sent)``.

    Keys are stable identifiers (DDP bucket indices, parameter names); memory is float32 of the
    key's numel, created as zeros on first use. A key whose size changes raises ValueError
    (memory of another tensor must never be added to this one). beta = 1 conserves the
    residual exactly: sum of sent + m equals the sum of gradients. Non-finite gradients
    propagate into the memory (and so are visible); reset with ``clear``.
    """

    def __init__(self, beta: float = 1.0):
        if not (isinstance(beta, (int, float)) and 0.0 < float(beta) <= 1.0):
            raise ValueError(f"beta must lie in (0, 1], got {beta!r}")
        self.beta = float(beta)
        self.memory: dict = {}

    def compensate(self, key, grad: torch.Tensor) -> torch.Tensor:
        """Return ``m + g`` (float32, flat) for ``key``."""
        g = grad.detach().reshape(-1).float()
        m = self.memory.get(key)
        if m is None:
            return g.clone()
        if m.numel() != g.numel():
            raise ValueError(
                f"error-feedback memory for key {key!r} holds {m.numel()} elements, the gradient "
                f"has {g.numel()}: keys must identify one tensor layout"
            )
        return m + g

    def update(self, key, corrected: torch.Tensor, sent: torch.Tensor) -> None:
        """Store the filtered residual of ``corrected`` (m + g) after sending ``sent``."""
        residual = corrected - sent.reshape(-1).float()
        m = self.memory.get(key)
        if m is None or self.beta == 1.0:  # a missing memory is 0: (1 - beta) * 0 drops out
            self.memory[key] = residual if self.beta == 1.0 else self.beta * residual
        else:
            self.memory[key] = (1.0 - self.beta) * m + self.beta * residual

    def clear(self) -> None:
        """Forget every key's memory."""
        self.memory.clear()

    def state_dict(self) -> dict:
        """Checkpointable copy: beta and a clone of every key's memory."""
        return {"beta": self.beta, "memory": {k: v.clone() for k, v in self.memory.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.beta = float(state["beta"])
        self.memory = {k: v.clone() for k, v in state["memory"].items()}

