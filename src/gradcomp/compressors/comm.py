"""Compressors of weight gradients for data-parallel communication.

GRACE's split: a *compressor* (this module: ``compress`` / ``decompress``, pure tensor work, no
``torch.distributed``), a *memory* (``ErrorFeedback``) and a *communicator* (the one DDP hook in
``gradcomp.integration.ddp_hooks``).

The contract every compressor states (``CommCompressor``):

* ``compress(x, generator=None) -> payload``: a list of 1-D tensors whose dtypes are the ones
  put on the wire, so ``payload_bytes(payload)`` is the honest size.
* ``decompress(payload, numel, dtype=torch.float32) -> Tensor``: the dense flat tensor.
* ``aggregation``: the collective that can carry the payload.

  - ``Aggregation.ALLREDUCE``: payloads of different ranks can be summed element-wise and the
    sum decodes to the sum of the gradients (ScaleCom: every rank sends values at the *same*
    indices, chosen by ``select`` on one rank and broadcast; such compressors set
    ``shared_selection = True`` and take ``indices=`` in compress / decompress).
  - ``Aggregation.ALLGATHER``: payloads are gathered and decoded one by one (QSGD's levels share
    no scale across ranks; top-k / pruning supports differ across ranks). Summing them is wrong,
    so ``require_aggregation`` refuses that pairing in code.
* ``variable_size``: False when ``payload_bytes`` is the same for every input of ``numel``
  elements (then equal to ``wire_bytes(numel)``); True when it depends on the values (pruning,
  QSGD's Elias bit stream; then ``wire_bytes(numel)`` is an upper bound and the communicator
  exchanges sizes before gathering).
* ``wire_bytes(numel)``: bytes of one rank's payload for a tensor of ``numel`` elements (exact,
  or the upper bound above), so that the communicator can compare the bytes it was promised
  with the bytes it sends.
* ``needs_memory``: biased compressors (top-k, ScaleCom) are used with error feedback.

Randomness comes only from the explicit ``torch.Generator`` argument.
"""

from __future__ import annotations

import abc
import enum
import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

from gradcomp.compressors import elias
from gradcomp.compressors.pruning import stochastic_prune
from gradcomp.numerics._checks import (
    require_choice,
    require_float_tensor,
    require_int_range,
    require_open_unit,
)
from gradcomp.numerics.fit import fit_lognormal
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.rounding import quantize_fp
from gradcomp.numerics.scales import amax_to_scale, mean_log2_to_scale
from gradcomp.numerics.sparsity import lognormal_threshold

__all__ = [
    "Aggregation",
    "CommCompressor",
    "ErrorFeedback",
    "FPCompress",
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
    """ceil(ratio * numel), at least 1 for a non-empty tensor; 0 for an empty one."""
    if numel == 0:
        return 0
    return max(1, min(numel, math.ceil(ratio * numel)))


def _sparse_payload(idx: torch.Tensor, vals: torch.Tensor, numel: int, dtype) -> torch.Tensor:
    out = torch.zeros(numel, dtype=dtype, device=vals.device)
    return out.index_put_((idx.long(),), vals.to(dtype), accumulate=True)


class CommCompressor(abc.ABC):
    """Base class of the communication compressors: the contract in the module docstring.

    Subclasses are frozen dataclasses (their fields are the configuration compared across ranks
    by ``config``) and set the class attributes ``aggregation``, ``needs_memory``,
    ``variable_size`` and ``shared_selection``.
    """

    aggregation: Aggregation
    needs_memory: bool = False
    variable_size: bool = False
    shared_selection: bool = False

    @abc.abstractmethod
    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list:
        """Payload (list of 1-D tensors, wire dtypes) of the flattened ``x``."""

    @abc.abstractmethod
    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Dense flat tensor of ``numel`` elements from one payload (or a sum of payloads)."""

    @abc.abstractmethod
    def wire_bytes(self, numel: int) -> int:
        """Bytes of one rank's payload for ``numel`` elements (upper bound if variable_size)."""

    def config(self) -> dict:
        """Plain-data configuration (compared across ranks when a hook is registered)."""
        return {"name": type(self).__name__, **asdict(self)}


_QSGD_MAGIC = 0x5153  # "QS"
_QSGD_HEADER = 26  # bytes: 16-bit magic, 16-bit s, 48-bit d, 64-bit numel, 64-bit nnz
_CRC_BYTES = 4


def _as_stream(data) -> np.ndarray:
    """The bytes of a stream as a 1-D numpy uint8 array (no copy where possible)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise TypeError(f"data must hold uint8 bytes, got a {data.dtype} tensor")
        return data.detach().to("cpu").reshape(-1).numpy()
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"data must hold uint8 bytes, got a numpy {data.dtype} array")
        return data.reshape(-1)
    raise TypeError(f"data must be bytes, a uint8 numpy array or tensor; got {type(data).__name__}")


@dataclass(frozen=True)
class QSGD(CommCompressor):
    """QSGD (Alistarh et al. 2017): unbiased stochastic levels per bucket of ``d`` coordinates.

    Per bucket v (d consecutive coordinates of the flattened gradient, the last one zero padded):
    ``Q_i(v) = ||v||_2 sgn(v_i) xi_i / s`` with ``xi_i = l`` or ``l + 1``, ``l = floor(s |v_i| /
    ||v||)``, the upper level with probability ``s |v_i| / ||v|| - l``. So ``E[Q(v)] = v`` and
    ``E||Q(v)||^2 <= (1 + min(d / s^2, sqrt(d) / s)) ||v||^2`` (QSGD, Lemma 3.1).

    Payload (``compress``), ``bitstream=False``: [fp32 norms (one per bucket), signed levels of
    every padded coordinate in the smallest integer dtype that holds +-s (int8 for s <= 127)];
    fixed size. ``bitstream=True``: [one uint8 tensor holding ``encode``'s stream]; variable size
    (the communicator exchanges sizes first).

    Semantics: a zero bucket gives norm 0 and all levels 0. A bucket holding NaN or +-inf sends a
    non-finite norm and decodes to NaN in every coordinate of that bucket (never silently finite).

    Args:
        levels: s, number of positive levels, in [1, 32767].
        bucket_size: d, coordinates per bucket (and per norm), >= 1.
        code: Elias code of the bit stream, "omega" (recursive, QSGD section 3.2's choice) or
            "gamma".
        bitstream: when True the payload is ``encode``'s bytes instead of the fixed arrays.
    """

    levels: int = 16
    bucket_size: int = 512
    code: str = "omega"
    bitstream: bool = False

    aggregation = Aggregation.ALLGATHER

    def __post_init__(self):
        require_int_range(self.levels, "levels (s)", 1, 32767)
        require_int_range(self.bucket_size, "bucket_size (d)", 1, (1 << 48) - 1)
        require_choice(self.code, "code", elias.CODES)
        if not isinstance(self.bitstream, bool):
            raise TypeError(f"bitstream must be a bool, got {self.bitstream!r}")

    @property
    def variable_size(self) -> bool:  # the Elias stream's length depends on the values
        return self.bitstream

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

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list:
        """Payload of ``x`` (flattened): [norms fp32, levels] or [uint8 bit stream]."""
        norms, q = self.quantize(x, generator)
        if not self.bitstream:
            return [norms, q]
        stream = self.encode(norms, q, x.numel())  # host work: Elias codes are built on the CPU
        return [torch.from_numpy(stream).to(x.device)]

    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Dense flat tensor of ``numel`` elements from one rank's payload.

        A bit stream is decoded with ``decode`` (ValueError when malformed, or when it holds
        another number of coordinates than ``numel``).
        """
        if self.bitstream:
            (stream,) = payload
            norms, q, n = self.decode(stream, device=stream.device)
            if n != numel:
                raise ValueError(f"QSGD stream holds {n} coordinates, expected {numel}")
        else:
            norms, q = payload
        return self.dequantize(norms, q, numel, dtype)

    def wire_bytes(self, numel: int) -> int:
        """Fixed payload: 4 nb + nb d (element size of the levels). Bit stream: an upper
        bound (every coordinate non-zero, each gap and level coded at its largest length)."""
        nb = -(-int(numel) // self.bucket_size)
        if not self.bitstream:
            return 4 * nb + nb * self.bucket_size * torch.empty(0, dtype=self.level_dtype
                                                                ).element_size()
        if numel == 0:
            return _QSGD_HEADER + _CRC_BYTES
        lg, ls = (int(elias.code_lengths(np.array([v]), self.code)[0])
                  for v in (numel, self.levels))
        return _QSGD_HEADER + 4 * nb + -(-numel * (lg + 1 + ls) // 8) + _CRC_BYTES

    # ---- bit stream (QSGD section 3.2: Elias codes of the gaps between non-zeros and levels) ----

    def encode(self, norms: torch.Tensor, q: torch.Tensor, numel: int) -> np.ndarray:
        """Serialise one quantized gradient into bytes (numpy uint8), exactly decodable.

        Stream format (bits MSB first; integers big-endian):

        1. header, 26 bytes: 16-bit magic 0x5153 ("QS"), 16-bit s, 48-bit d, 64-bit numel n,
           64-bit number of non-zero levels nnz (nnz <= n);
        2. nb = ceil(n / d) norms as big-endian IEEE fp32 (>= 0, or NaN / +inf for a bucket
           that held a non-finite value);
        3. nnz Elias codes of the gaps between non-zero positions (the first gap is index + 1);
        4. nnz sign bits (1 = negative);
        5. nnz Elias codes of the level magnitudes (each in [1, s]);
        6. zero bits up to a byte boundary;
        7. CRC-32 (zlib's polynomial) of every byte before it, 4 bytes big-endian.

        Host work: the tensors are copied to the CPU.
        """
        n = int(numel)
        qn = q.detach().reshape(-1)[:n].to("cpu", torch.int64).numpy()
        idx = np.flatnonzero(qn)
        gaps = np.diff(idx, prepend=-1)
        mags = np.abs(qn[idx])
        header = elias.emit_fields(
            np.array([_QSGD_MAGIC, self.levels, self.bucket_size, n, idx.size]),
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
        body = elias.pack_bits(np.concatenate(parts))[0]
        crc = np.frombuffer(zlib.crc32(body.tobytes()).to_bytes(_CRC_BYTES, "big"), np.uint8)
        return np.concatenate([body, crc])

    def decode(self, data, device=None):
        """Inverse of ``encode``: returns (norms, levels, numel) as tensors on ``device``.

        ``data``: bytes, or a uint8 numpy array / tensor (anything else: TypeError). Every
        malformed stream raises ValueError, checked in this order: shorter than header + CRC;
        CRC-32 mismatch; bad magic; s or d other than this decoder's; more non-zeros than
        coordinates; fewer bytes than the announced norms and codes need (so the decoder never
        allocates more than the input justifies: at most d coordinates per 4 bytes of norms);
        a negative norm; truncated or malformed Elias codes; non-zero padding or trailing
        bytes; a position past the end; a level outside [1, s]; a non-zero level in a bucket of
        norm 0 (values the encoder never writes).
        """
        buf = _as_stream(data)
        if buf.size < _QSGD_HEADER + _CRC_BYTES:
            raise ValueError(f"truncated QSGD stream: {buf.size} bytes, a stream has at least "
                             f"{_QSGD_HEADER + _CRC_BYTES}")
        body = buf[:-_CRC_BYTES]
        if zlib.crc32(body.tobytes()) != int.from_bytes(buf[-_CRC_BYTES:].tobytes(), "big"):
            raise ValueError("corrupted QSGD stream: CRC-32 mismatch")
        hdr = body[:_QSGD_HEADER].tobytes()
        field = [int.from_bytes(hdr[a:b], "big") for a, b in ((0, 2), (2, 4), (4, 10),
                                                              (10, 18), (18, 26))]
        magic, s, d, n, nnz = field
        if magic != _QSGD_MAGIC:
            raise ValueError("corrupted QSGD stream: bad magic number")
        if (s, d) != (self.levels, self.bucket_size):
            raise ValueError(
                f"QSGD stream written with levels={s}, bucket_size={d}; this decoder has "
                f"levels={self.levels}, bucket_size={self.bucket_size}"
            )
        if nnz > n:
            raise ValueError(f"corrupted QSGD stream: {nnz} non-zeros in {n} coordinates")
        nb = -(-n // d)
        rest = body.size - _QSGD_HEADER
        if 4 * nb > rest:
            raise ValueError(f"truncated QSGD stream: {nb} norms announced, {rest} bytes left")
        if 3 * nnz > 8 * (rest - 4 * nb):  # each non-zero takes >= 1 gap, 1 sign, 1 level bit
            raise ValueError(f"truncated QSGD stream: {nnz} non-zeros announced, "
                             f"{rest - 4 * nb} bytes of codes")
        norms = body[_QSGD_HEADER : _QSGD_HEADER + 4 * nb].view(">f4").astype(np.float32)
        if (norms < 0).any():  # NaN compares False: a bucket with NaN / +inf is legitimate
            raise ValueError("corrupted QSGD stream: a negative norm")
        bits = np.unpackbits(body[_QSGD_HEADER + 4 * nb :])
        gaps, pos = elias.elias_decode(bits, nnz, self.code, 0)
        if pos + nnz > bits.size:
            raise ValueError("truncated QSGD stream: signs missing")
        neg = bits[pos : pos + nnz].astype(bool)
        pos += nnz
        mags, pos = elias.elias_decode(bits, nnz, self.code, pos)
        if bits.size - pos >= 8 or bits[pos:].any():
            raise ValueError("corrupted QSGD stream: trailing bits after the last code")
        if nnz:
            if int(gaps.max()) > n:
                raise ValueError("corrupted QSGD stream: a position lies past the tensor end")
            idx = np.cumsum(gaps) - 1  # gaps >= 1, so strictly increasing unless it overflowed
            if idx[0] < 0 or idx[-1] >= n or (nnz > 1 and not (np.diff(idx) > 0).all()):
                raise ValueError("corrupted QSGD stream: a position lies past the tensor end")
            if int(mags.max()) > s:
                raise ValueError(f"corrupted QSGD stream: a level exceeds s={s}")
            if (norms[idx // d] == 0).any():
                raise ValueError("corrupted QSGD stream: a non-zero level in a bucket of norm 0")
        q = np.zeros(nb * d, dtype=np.int64)
        if nnz:
            q[idx] = np.where(neg, -mags, mags)
        qt = torch.from_numpy(q).to(device=device, dtype=self.level_dtype)
        return torch.from_numpy(norms).to(device), qt, n

    def encoded_bits(self, norms, q, numel) -> int:
        """Bits of ``encode``'s stream without the byte padding (CRC included)."""
        qn = q.detach().reshape(-1)[: int(numel)].to("cpu", torch.int64).numpy()
        idx = np.flatnonzero(qn)
        fixed = 8 * (_QSGD_HEADER + _CRC_BYTES) + 32 * norms.numel()
        if idx.size == 0:
            return fixed
        g = elias.code_lengths(np.diff(idx, prepend=-1), self.code).sum()
        m = elias.code_lengths(np.abs(qn[idx]), self.code).sum()
        return int(fixed + g + idx.size + m)


def qsgd_bits_bound(levels: int, bucket_size: int, float_bits: int = 32) -> float:
    """QSGD's expected bits per coordinate for one bucket, the smaller of its two bounds.

    QSGD (Alistarh et al. 2017, section 3.2) bounds the expected code length of one bucket twice.
    Sparse regime (small s; the non-zeros, at most s^2 + sqrt d in expectation by Lemma 3.1,
    coded by position gaps): ``F + (3 + 1.5 log2(2 (s^2 + d) / (s^2 + sqrt d))) (s^2 + sqrt
    d)``; dense regime (large s; no positions): ``F + (0.5 (log2(1 + (s^2 + min(d, s sqrt d)) /
    d) + 1) + 2) d``; both with their (1 + o(1)) factors dropped, so the bound is asymptotic;
    returned divided by d.
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

    Payload: [int32 indices, values at them (in the input dtype)], k of each: fixed size. Supports
    differ across ranks, so the payload is all-gathered and scatter-added (ALLGATHER). Ties at the
    k-th magnitude are broken by ``torch.topk`` (unspecified order); NaN counts as largest. An
    empty tensor gives an empty payload (k = 0).
    """

    ratio: float = 0.01

    aggregation = Aggregation.ALLGATHER
    needs_memory = True

    def __post_init__(self):
        require_open_unit(self.ratio, "ratio")

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list:
        """Payload [int32 indices, values] of the k largest |x| (``generator`` unused)."""
        require_float_tensor(x, "x")
        flat = x.reshape(-1)
        idx = torch.topk(flat.abs(), _k_of(self.ratio, flat.numel()), sorted=False).indices
        return [idx.to(torch.int32), flat[idx]]

    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Dense flat tensor: the values at their indices, zeros elsewhere."""
        idx, vals = payload
        return _sparse_payload(idx, vals, numel, dtype)

    def wire_bytes(self, numel: int, value_bytes: int = 4) -> int:
        """k (4 + value_bytes): int32 indices and the values (fp32 gradients: 4 bytes)."""
        return _k_of(self.ratio, int(numel)) * (4 + value_bytes)


@dataclass(frozen=True)
class ScaleCom(CommCompressor):
    """ScaleCom (Chen et al. 2020): cyclic local top-k and low-pass filtered error feedback.

    At step t the leader rank ``t mod n`` picks the top-k indices (k = ceil(ratio * numel)) of its
    own ``m + g`` (``select``); the indices are broadcast; every rank sends its own ``m + g`` at
    those indices (``compress``) and an ordinary all-reduce sums them (ALLREDUCE: the supports
    agree, so sums of payloads decode to sums of gradients). Because gradients of different
    ranks are similar, the leader's top-k is close to the top-k of the sum (ScaleCom's premise).
    Memory: ``m <- (1 - beta) m + beta (m + g - C(m + g))`` (``ErrorFeedback(beta)``); beta = 1 is
    plain error feedback, smaller beta low-pass filters the residual. An empty tensor selects
    nothing and sends nothing.
    """

    ratio: float = 0.01
    beta: float = 1.0

    aggregation = Aggregation.ALLREDUCE
    needs_memory = True
    shared_selection = True

    def __post_init__(self):
        require_open_unit(self.ratio, "ratio")
        if isinstance(self.beta, bool) or not (isinstance(self.beta, (int, float))
                                               and 0.0 < float(self.beta) <= 1.0):
            raise ValueError(f"beta must lie in (0, 1], got {self.beta!r}")

    @staticmethod
    def leader(step: int, world_size: int) -> int:
        """Rank that selects the indices at ``step``: ``step mod world_size`` (cyclic)."""
        return step % world_size

    def num_selected(self, numel: int) -> int:
        """k for a bucket of ``numel`` elements: ceil(ratio * numel), at least 1 (0 if empty)."""
        return _k_of(self.ratio, int(numel))

    def select(self, corrected: torch.Tensor) -> torch.Tensor:
        """Leader only: int32 indices of the k largest |m + g| (ascending order)."""
        flat = corrected.reshape(-1)
        idx = torch.topk(flat.abs(), self.num_selected(flat.numel()), sorted=False).indices
        return torch.sort(idx).values.to(torch.int32)

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                 indices: torch.Tensor | None = None) -> list:
        """This rank's values at the shared ``indices`` (the all-reduce payload)."""
        require_float_tensor(x, "x")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("ScaleCom.compress: pass the shared indices as indices=, not as "
                            "the generator argument")
        if indices is None:
            raise ValueError("ScaleCom.compress needs indices= (from the leader's select)")
        return [x.reshape(-1)[indices.long()]]

    def decompress(self, payload, numel: int, dtype=torch.float32, *,
                   indices: torch.Tensor | None = None) -> torch.Tensor:
        """Dense flat tensor with the (summed or own) values at the shared ``indices``."""
        if indices is None:
            raise ValueError("ScaleCom.decompress needs indices= (the ones compress used)")
        (vals,) = payload
        out = torch.zeros(numel, dtype=dtype, device=vals.device)
        out[indices.long()] = vals.to(dtype)
        return out

    def wire_bytes(self, numel: int, value_bytes: int = 4) -> int:
        """k values per rank (the leader also broadcasts k int32 indices, counted apart)."""
        return self.num_selected(numel) * value_bytes


# IEEE containers that hold every value of a format exactly, and the same-width integer view
# that travels on the wire: first match wins, float32 / int32 otherwise.
_CONTAINERS = (
    (lambda f: (f.semantics, f.exp_bits, f.man_bits, f.special) == ("ieee", 4, 3, "fn"),
     torch.float8_e4m3fn, torch.uint8),
    (lambda f: f.fits(5, 2), torch.float8_e5m2, torch.uint8),
    (lambda f: f.fits(8, 7), torch.bfloat16, torch.int16),
    (lambda f: f.fits(5, 10), torch.float16, torch.int16),
)


@dataclass(frozen=True)
class FPCompress(CommCompressor):
    """FP quantization of the communicated gradient with one power-of-two scale per bucket.

    ``y = Q(x * s)`` with ``quantize_fp`` (``rounding`` "stochastic": unbiased inside the range;
    "nearest": round half to even); s is a power of two, so scaling and unscaling are exact:

    * ``scale="lognormal"``: the authors' per-layer rule (section 4.4), ``s = 2^floor(-mean(log2
      |x|) - 3)`` from ``fit_lognormal`` (``numerics.scales.mean_log2_to_scale``, margin 3).
    * ``scale="amax"``: ``s = 2^floor(log2(max_normal / amax))`` (``numerics.scales.
      amax_to_scale``): the largest magnitude lands at or below the largest normal value.
    * ``scale="none"``: s = 1.

    Unusable statistics (no finite non-zero value; amax 0 or non-finite) give s = 1. Payload:
    [y in the narrowest IEEE dtype holding every value of the format exactly (float8_e4m3fn,
    float8_e5m2, bfloat16, float16, else float32) as a same-width integer view, s as one fp32];
    fixed size. ``compile`` is passed to ``quantize_fp`` (None: its module switch; False avoids a
    torch.compile per new bucket size). Decoding divides by s. Overflow / NaN follow
    ``quantize_fp`` (the format's overflow policy; NaN stays NaN). Sums of quantized values are
    not on the grid, so the payload is all-gathered and decoded (ALLGATHER). The format name is
    parsed once, at construction.
    """

    fmt: str = "e4m3fn"
    rounding: str = "stochastic"
    scale: str = "lognormal"
    compile: bool | None = None

    aggregation = Aggregation.ALLGATHER

    def __post_init__(self):
        if not isinstance(self.fmt, str):
            raise TypeError(f"fmt must be a format name (str), got {type(self.fmt).__name__}")
        require_choice(self.rounding, "rounding", ("stochastic", "nearest"))
        require_choice(self.scale, "scale", ("lognormal", "amax", "none"))
        if self.compile is not None and not isinstance(self.compile, bool):
            raise TypeError(f"compile must be None or a bool, got {self.compile!r}")
        f = FPFormat.from_name(self.fmt)
        dtype, view = next(((d, v) for test, d, v in _CONTAINERS if test(f)),
                           (torch.float32, torch.int32))
        object.__setattr__(self, "_format", f)  # frozen: derived, not part of the config
        object.__setattr__(self, "_wire", (dtype, view))

    @property
    def format(self) -> FPFormat:
        """The parsed format of ``fmt``."""
        return self._format

    @property
    def wire(self) -> tuple[torch.dtype, torch.dtype]:
        """(container dtype, integer view dtype sent on the wire)."""
        return self._wire

    def scale_of(self, x: torch.Tensor) -> torch.Tensor:
        """The power-of-two scale s of ``x`` (0-d float32 on x's device)."""
        if self.scale == "none":
            return torch.ones((), dtype=torch.float32, device=x.device)
        if self.scale == "lognormal":
            s = mean_log2_to_scale(fit_lognormal(x).mean_log2, margin=3.0, power_of_two=True)
        else:
            s = amax_to_scale(x.detach().abs().amax(), self.format, power_of_two=True)
        return s.float()

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list:
        """Payload [quantized codes (integer view), scale s (1 fp32)] of the flattened x."""
        require_float_tensor(x, "x")
        flat = x.detach().reshape(-1).float()
        s = self.scale_of(flat)
        y = quantize_fp(flat, self.format, self.rounding, scale=s, generator=generator,
                        compile=self.compile) * s
        dtype, view = self.wire
        return [y.to(dtype).view(view), s.reshape(1)]

    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Codes viewed back as the container dtype, divided by s."""
        codes, s = payload
        return (codes.view(self.wire[0]).float() / s).to(dtype)

    def wire_bytes(self, numel: int) -> int:
        """numel codes of the container's width plus the fp32 scale."""
        return int(numel) * torch.empty(0, dtype=self.wire[1]).element_size() + 4


@dataclass(frozen=True)
class StochasticPrune(CommCompressor):
    """Unbiased stochastic pruning (Eq. 5) with the lognormal threshold (Eq. 8).

    Per bucket: ``fit_lognormal`` gives mu, sigma and the zero fraction z of the gradient;
    ``numerics.sparsity.lognormal_threshold(sparsity, mu, sigma, z)`` (the neural-gradient
    pruner's Eq. 8) gives the threshold a (0 when z >= sparsity: no pruning; also 0 when fewer
    than two finite non-zeros are left to fit); ``stochastic_prune(x, a)`` keeps |x| > a, maps
    a*eps <= |x| <= a to sign(x) a and the rest to 0, so E[T(x)] = x and no error feedback is
    needed. Payload: [int32 indices, fp32 values] of the survivors; their number varies
    (variable size: one host sync for the size exchange before the all-gather). NaN / inf
    handling is ``stochastic_prune``'s.
    """

    sparsity: float = 0.9

    aggregation = Aggregation.ALLGATHER
    variable_size = True

    def __post_init__(self):
        require_open_unit(self.sparsity, "sparsity")

    def threshold(self, x: torch.Tensor) -> torch.Tensor:
        """Lognormal threshold a of ``x`` for the target sparsity (0-d tensor; the solver's
        argument checks read a few scalars on the host)."""
        fit = fit_lognormal(x)
        ok = fit.ok  # fewer than 2 finite non-zeros: nothing to fit, threshold 0 (no pruning)
        mu = torch.where(ok, fit.mu, torch.zeros_like(fit.mu))
        sigma = torch.where(ok, fit.sigma, torch.ones_like(fit.sigma))
        a = lognormal_threshold(self.sparsity, mu, sigma, fit.zero_fraction.clamp(0.0, 1.0))
        return torch.where(ok, a, torch.zeros_like(a))

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list:
        """Payload [int32 indices, fp32 values] of the non-zeros of the pruned flat x."""
        require_float_tensor(x, "x")
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return [torch.zeros(0, dtype=torch.int32, device=flat.device), flat]
        y = stochastic_prune(flat, self.threshold(flat), generator=generator)
        idx = torch.nonzero(y).reshape(-1)  # host sync: the survivor count sizes the payload
        return [idx.to(torch.int32), y[idx]]

    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Dense flat tensor: survivors at their indices, zeros elsewhere."""
        idx, vals = payload
        out = torch.zeros(numel, dtype=dtype, device=vals.device)
        out[idx.long()] = vals.to(dtype)
        return out

    def wire_bytes(self, numel: int) -> int:
        """Upper bound: every element survives (int32 index + fp32 value)."""
        return 8 * int(numel)


class ErrorFeedback:
    """Per-key error-feedback memory: ``m <- (1 - beta) m + beta (m + g - sent)``.

    Keys are stable identifiers (DDP bucket indices, parameter names); memory is float32 of the
    key's numel, created as zeros on first use. A key whose size changes raises ValueError
    (memory of another tensor must never be added to this one). beta = 1 conserves the
    residual exactly: sum of sent + m equals the sum of gradients. Non-finite gradients
    propagate into the memory (and so are visible); reset with ``clear``. A memory loaded from
    a checkpoint on another device moves to the gradient's device on first use.
    """

    def __init__(self, beta: float = 1.0):
        if isinstance(beta, bool) or not (isinstance(beta, (int, float))
                                          and 0.0 < float(beta) <= 1.0):
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
        if m.device != g.device:
            m = self.memory[key] = m.to(g.device)
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
        """Checkpointable copy: beta and a CPU clone of every key's memory."""
        return {"beta": self.beta,
                "memory": {k: v.detach().to("cpu", copy=True) for k, v in self.memory.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (tensors move to the gradient's device on use)."""
        self.beta = float(state["beta"])
        self.memory = {k: v.clone() for k, v in state["memory"].items()}
