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
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from gradcomp.compressors import elias
from gradcomp.compressors.pruning import stochastic_prune
from gradcomp.numerics._checks import (
    require_choice,
    require_float_tensor,
    require_int_range,
    require_open_unit,
)
from gradcomp.numerics.block import (
    NAMED_BLOCK_FORMATS,
    BlockFormat,
    block_scales,
    e8m0_decode,
    e8m0_encode,
    quantize_block,
)
from gradcomp.numerics.fit import fit_lognormal
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.packing import pack_codes, packed_bytes, unpack_codes
from gradcomp.numerics.rounding import quantize_fp
from gradcomp.numerics.scales import amax_to_scale, mean_log2_to_scale
from gradcomp.numerics.sparsity import lognormal_threshold

__all__ = [
    "Aggregation",
    "BlockCompress",
    "BlockPayload",
    "CommCompressor",
    "ErrorFeedback",
    "FPCompress",
    "IncompatibleAggregationError",
    "QSGD",
    "ScaleCom",
    "StochasticPrune",
    "TopK",
    "is_block_format_name",
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
    parsed once, at construction. Block format names (``mxfp4``, ``nvfp4``, ...) are refused
    here: they are :class:`BlockCompress`'s (the ``fp`` comm method routes them there).
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
        if is_block_format_name(self.fmt):
            raise ValueError(f"fmt {self.fmt!r} is a block format: use BlockCompress(fmt="
                             f"{self.fmt!r}) (the 'fp' comm method routes block names there)")
        try:
            f = FPFormat.from_name(self.fmt)
        except ValueError as exc:
            raise ValueError(f"fmt {self.fmt!r} is not a format ({exc}): fmt must be an element "
                             f"format (e4m3fn, e5m2, e3m2fn, e2m3fn, e2m1fn, 'eXmY', '1-X-Y')"
                             f" or a block format ({', '.join(BLOCK_COMM_FORMATS)} "
                             "or 'elem:block:scale:rule[:ts]'), sent by BlockCompress") from None
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


# the named block formats a flat bucket can carry: 1-D blocks (2-D tiles need the
# parameter's shape, which a DDP bucket has flattened away)
BLOCK_COMM_FORMATS = tuple(k for k, v in NAMED_BLOCK_FORMATS.items() if len(v[1]) == 1)
_SCALE_BYTES = {"e8m0": 1, "e4m3": 1, "fp32": 4}
_E4M3_MAX = 448.0


def is_block_format_name(fmt) -> bool:
    """True when ``fmt`` names a block format (a standard name such as ``mxfp4`` or the
    ``elem:block:scale:rule`` form), not an element format (``e4m3fn``, ``eXmY``, ``1-X-Y``).
    The two name spaces are disjoint, so the ``fp`` comm method can route on the name."""
    if not isinstance(fmt, str):
        return False
    key = fmt.strip().lower()
    return key in NAMED_BLOCK_FORMATS or ":" in key


@lru_cache(maxsize=64)
def _grid_tables(elem: FPFormat, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between consecutive non-negative grid values, decode table of 2^(bits-1)
    magnitudes: the grid, then NaN for the codes the encoder never writes), float32.

    The index of a value in the ascending grid is its IEEE bit pattern without the sign (every
    block element format is IEEE-like, its finite codes contiguous from 0), so the codes on
    the wire are the format's own encodings (ml_dtypes' and torchao's).
    """
    grid = torch.tensor(elem.grid(), dtype=torch.float64)
    mid = ((grid[1:] + grid[:-1]) / 2).to(torch.float32)  # one bit more than the grid: exact
    table = torch.full((1 << (elem.bits - 1),), float("nan"), dtype=torch.float32)
    table[: grid.numel()] = grid.to(torch.float32)
    return mid.to(device), table.to(device)


def _bytes_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A uint8 slice reinterpreted as ``dtype`` (copied when the slice is misaligned)."""
    if (t.storage_offset() * t.element_size()) % torch.empty(0, dtype=dtype).element_size():
        t = t.clone()
    return t.view(dtype)


class BlockPayload(NamedTuple):
    """The decoded fields of a :class:`BlockCompress` payload (``BlockCompress.parts``).

    ``codes``: the n element codes (sign bit on top of the format's magnitude bits; uint8 for
    formats of <= 8 bits, else int32); ``block_scales``: the stored scale of each block as
    float32 (E8M0 2^k, NaN for byte 0xFF; the E4M3 value; the FP32 value); ``tensor_scale``:
    the per-tensor FP32 scale t (0-d) or None.
    """

    codes: torch.Tensor
    block_scales: torch.Tensor
    tensor_scale: torch.Tensor | None


@dataclass(frozen=True)
class BlockCompress(CommCompressor):
    """Block-scaled formats on the wire (OCP MX, NVFP4, FP8 blockwise): real packed bytes.

    Per bucket, the flattened gradient is quantized with ``numerics.block.quantize_block`` in
    the block format ``fmt`` (blocks of n consecutive elements of the flat bucket, the last one
    ragged), ``rounding`` "stochastic" (default: unbiased for every element whose scaled value
    lies inside [-max, max]) or "nearest" (ties to even). What is sent, one uint8 tensor:

    1. the per-tensor FP32 scale t, 4 bytes, when the format has one that is used (E4M3
       scales with ``tensor_scale``: NVFP4);
    2. one scale per block, ceil(numel / n) of them, in the scale's own format: E8M0 bytes
       (``e8m0_encode``: 2^k as k + 127, 0xFF = NaN), E4M3 as float8_e4m3fn bytes (the block
       scale divided by t), or FP32 as 4 bytes (native byte order);
    3. the element codes (the element format's IEEE bit patterns: sign, exponent, mantissa) of
       the numel elements, packed at their width by ``numerics.packing.pack_codes`` (4-bit
       codes two per byte, first in the low nibble; 6-bit codes four per three bytes).

    So ``wire_bytes(numel) = 4 [t] + ceil(numel / n) * scale bytes + ceil(numel * bits / 8)``,
    and per element the wire holds ``bits + 8 * scale bytes / n`` bits: against an fp32
    all-reduce's 32 the ratio tends to 32 / 4.25 = 7.53 for mxfp4, 32 / 4.5 = 7.11 for nvfp4,
    32 / 6.25 = 5.12 for mxfp6, 32 / 8.25 = 3.88 for mxfp8 and fp8_block128.

    ``decompress`` rebuilds exactly (bit for bit) the float32 tensor ``quantize_block``
    returned: the codes give the element values q, the scale bytes the dequantization scale s
    (t * s_e4m3 for NVFP4), and q * s is the same float32 product. The codes are read off
    that result: q = the nearest grid value to result / s, exact because q * s was rounded to
    float32 with a relative error far below the grid's spacing (checked at construction: the
    smallest non-zero element times the smallest scale must be at least 2^(man_bits - 147),
    true for every named format). Codes cannot be summed across ranks (each rank has its own
    scales), so the payload is all-gathered and decoded rank by rank (ALLGATHER).

    Zeros, NaN and inf follow ``quantize_block``: a block of zeros gets the rule's smallest
    scale and decodes to zeros (signs kept: -0 is the code with only the sign bit); a block
    holding NaN has a NaN scale (E8M0 byte 0xFF, E4M3 NaN byte, FP32 NaN; its element codes are
    sent as 0) and decodes to NaN in every element; a block holding +-inf has the rule's
    largest scale, its inf elements are sent as +-max and decode to +-max * s (+-inf where
    that overflows float32, as in ``quantize_block``). For NVFP4, t comes from the largest
    finite magnitude (``quantize_block``'s rule), so a non-finite value spoils only its block.

    Args:
        fmt: a block format with 1-D blocks: one of ``BLOCK_COMM_FORMATS`` (mxfp8_e4m3,
            mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, nvfp4, fp8_block128) or
            ``elem:block:scale:rule[:ts]`` (``BlockFormat.from_name``), elements of at most 16
            bits. 2-D tiles (nvfp4_2d, fp8_block128x128) are refused: a bucket is flat.
        rounding: "stochastic" or "nearest" for the elements (scales follow the format's rule).
        compile: passed to ``quantize_block`` (None: its module switch).

    Input of any float dtype is quantized as float32; ``decompress`` returns ``dtype``.
    """

    fmt: str = "mxfp8_e4m3"
    rounding: str = "stochastic"
    compile: bool | None = None

    aggregation = Aggregation.ALLGATHER

    def __post_init__(self):
        if not isinstance(self.fmt, str):
            raise TypeError(f"fmt must be a block format name (str), got "
                            f"{type(self.fmt).__name__}")
        require_choice(self.rounding, "rounding", ("stochastic", "nearest"))
        if self.compile is not None and not isinstance(self.compile, bool):
            raise TypeError(f"compile must be None or a bool, got {self.compile!r}")
        allowed = (f"{', '.join(BLOCK_COMM_FORMATS)} or 'elem:block:scale:rule[:ts]' with 1-D "
                   "blocks (e.g. 'e4m3fn:32:e8m0:rceil')")
        if not is_block_format_name(self.fmt):
            raise ValueError(f"fmt must be a block format: one of {allowed}; got {self.fmt!r}"
                             " (element formats such as e4m3fn are FPCompress's)")
        try:
            bf = BlockFormat.from_name(self.fmt)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fmt must be one of {allowed}; got {self.fmt!r} ({exc})") from None
        if len(bf.block) != 1:
            raise ValueError(f"fmt {self.fmt!r} has 2-D tiles {bf.block}; a communicated bucket "
                             f"is a flat vector, so fmt must have 1-D blocks: one of {allowed}")
        if bf.dims not in ((-1,), (0,)):
            raise ValueError(f"fmt {self.fmt!r} blocks along dimensions {bf.dims}; a flat "
                             "bucket has one dimension (dims -1 or 0)")
        e = bf.elem
        if e.bits > 16:
            raise ValueError(f"fmt {self.fmt!r}: element format {e.name} has {e.bits} bits; "
                             "at most 16 are supported")
        # smallest dequantization scale of the rule: E8M0 2^-127, E4M3 2^-6 (times t >= 2^-126
        # with a tensor scale), FP32 2^-126
        ts = bf.scale == "e4m3" and bf.tensor_scale  # block.py uses t with E4M3 scales only
        low = {"e8m0": -127, "e4m3": -6 - (126 if ts else 0), "fp32": -126}[bf.scale]
        if math.log2(e.min_subnormal) + low < e.man_bits - 147:
            raise ValueError(
                f"fmt {self.fmt!r}: its smallest element ({e.min_subnormal!r}) times its "
                f"smallest scale (2^{low}) is too deep in float32's subnormals for the codes "
                "to be read back exactly; use a named format or a narrower element range")
        object.__setattr__(self, "_format", bf)  # frozen: derived, not part of the config
        object.__setattr__(self, "_tensor_scale", ts)

    @property
    def format(self) -> BlockFormat:
        """The parsed block format of ``fmt``."""
        return self._format

    @property
    def bits_per_element(self) -> float:
        """Wire bits per element for large buckets: element bits + scale bits / block size."""
        bf = self.format
        return bf.elem.bits + 8 * _SCALE_BYTES[bf.scale] / bf.block[0]

    def _tensor_scale_of(self, flat: torch.Tensor) -> torch.Tensor:
        """NVFP4's t: fp32(largest finite |x| / (448 * max)), clamped to [2^-126, fp32 max];
        the same float32 operations as ``quantize_block``."""
        a = flat.abs()
        amax = torch.where(torch.isfinite(a), a, 0).amax()
        top = torch.tensor(_E4M3_MAX, dtype=torch.float32, device=flat.device)
        t = amax / (top * self.format.elem.max_normal)
        return torch.clamp(t, 2.0**-126, float(torch.finfo(torch.float32).max))

    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list:
        """Payload [one uint8 tensor: t (if any), block scales, packed element codes]."""
        require_float_tensor(x, "x")
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        if n == 0:
            return [torch.zeros(0, dtype=torch.uint8, device=flat.device)]
        bf = self.format
        out = quantize_block(flat, bf, self.rounding, generator=generator, compile=self.compile)
        deq = block_scales(flat, bf)  # (nb,) float32: the dequantization scale of each block
        b, nb = bf.block[0], deq.numel()
        y = (F.pad(out, (0, nb * b - n)).view(nb, b) / deq[:, None]).reshape(-1)[:n]
        mid, _ = _grid_tables(bf.elem, flat.device)
        mag = torch.searchsorted(mid, y.abs(), out_int32=True)  # index of the nearest value
        codes = mag + (torch.signbit(y).to(torch.int32) << (bf.elem.bits - 1))
        codes = torch.where(torch.isnan(y), 0, codes)  # a NaN block: the scale carries it
        parts = []
        if self._tensor_scale:
            t = self._tensor_scale_of(flat)
            parts.append(t.reshape(1).view(torch.uint8))
            # deq = fp32(t * s8) with s8 an E4M3 value: deq / t is s8 up to a rounding far
            # below E4M3's spacing, so the nearest-even cast recovers s8 exactly
            scales = (deq / t).to(torch.float8_e4m3fn).view(torch.uint8)
        elif bf.scale == "e4m3":
            scales = deq.to(torch.float8_e4m3fn).view(torch.uint8)
        elif bf.scale == "e8m0":
            scales = e8m0_encode(deq, "floor")  # deq is 2^k exactly (or NaN)
        else:
            scales = deq.view(torch.uint8)
        dt = torch.uint8 if bf.elem.bits <= 8 else torch.int32
        parts += [scales, pack_codes(codes.to(dt), bf.elem.bits)]
        return [torch.cat(parts)]

    def parts(self, payload, numel: int) -> BlockPayload:
        """The fields of one rank's payload (ValueError when its size is not
        ``wire_bytes(numel)``)."""
        if not isinstance(payload, (list, tuple)) or len(payload) != 1:
            raise ValueError("a BlockCompress payload is a list of one uint8 tensor")
        (buf,) = payload
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ValueError("a BlockCompress payload is a list of one 1-D uint8 tensor")
        n = int(numel)
        if buf.numel() != self.wire_bytes(n):
            raise ValueError(f"BlockCompress payload holds {buf.numel()} bytes; {n} elements "
                             f"of {self.fmt} take {self.wire_bytes(n)}")
        bf = self.format
        nb = -(-n // bf.block[0])
        off, t = 0, None
        if self._tensor_scale and n:
            t, off = _bytes_as(buf[0:4], torch.float32)[0], 4
        sb = _SCALE_BYTES[bf.scale]
        raw = buf[off: off + nb * sb]
        if bf.scale == "e8m0":
            scales = e8m0_decode(raw)
        elif bf.scale == "e4m3":
            scales = raw.view(torch.float8_e4m3fn).float()
        else:
            scales = _bytes_as(raw, torch.float32)
        codes = unpack_codes(buf[off + nb * sb:], bf.elem.bits, n)
        return BlockPayload(codes, scales, t)

    def decompress(self, payload, numel: int, dtype=torch.float32) -> torch.Tensor:
        """Dense flat tensor: element values times their block's scale (times t), in float32
        exactly as ``quantize_block`` computed them, then cast to ``dtype``."""
        codes, scales, t = self.parts(payload, numel)
        bf = self.format
        n, b, bits = int(numel), bf.block[0], bf.elem.bits
        _, table = _grid_tables(bf.elem, codes.device)
        c = codes.to(torch.int32)
        q = torch.index_select(table, 0, c & ((1 << (bits - 1)) - 1))
        q = torch.where(c >> (bits - 1) != 0, -q, q)  # -(+0) = -0: signed zeros survive
        deq = scales if t is None else t * scales  # quantize_block's float32 product t * s8
        nb = scales.numel()
        out = F.pad(q, (0, nb * b - n)).view(nb, b) * deq[:, None]
        return out.reshape(-1)[:n].to(dtype)

    def wire_bytes(self, numel: int) -> int:
        """4 (t, NVFP4) + ceil(numel / n) scale bytes + ceil(numel * bits / 8); 0 if empty."""
        n = int(numel)
        if n == 0:
            return 0
        bf = self.format
        nb = -(-n // bf.block[0])
        return 4 * self._tensor_scale + nb * _SCALE_BYTES[bf.scale] + packed_bytes(n, bf.elem.bits)


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
