"""Walsh-Hadamard and randomized Hadamard transforms (RHT), blockwise along one dimension.

``H_n`` is the Sylvester-ordered Hadamard matrix (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]),
normalised by 1/sqrt(n) so that it is symmetric and orthogonal: H^T = H, H H = I. It is applied
to consecutive, non-overlapping blocks of ``n`` elements along a chosen dimension (in a GEMM:
the reduction dimension, so that the transform of both operands cancels in the product:
(H A)^T (H B) = A^T H^T H B = A^T B).

The fast transform is the butterfly: log2(n) stages, each one ``(a, b) -> (a + b, a - b)`` on
pairs at distance 1, 2, 4, ... (O(n log n) adds per block, whole-tensor ops, no Python loop over
elements). The normalisation is one multiply by 2^(-log2(n)/2) at the end: exact for even
log2(n) (n = 16, 64, 256, ...), correctly rounded otherwise (n = 32, 128).

RHT = H D with D = diag(s), s a vector of n random signs (+1/-1) shared by every block. The
signs come from the counter-based hash of :mod:`gradcomp.numerics.random` keyed by an integer
seed (and an optional step), not from torch's generator: the same (seed, step) gives the same
signs on every rank, device and run. The inverse is exact: (H D)^-1 = D H (D^2 = I, H^2 = I).

Sizes: the size along ``dim`` must be a multiple of ``n`` (ValueError otherwise). Callers with
ragged sizes pad with zeros first (:func:`pad_to_block`): in a product of two transformed
operands the zero rows contribute exactly nothing, so padding changes no result.

Numerics: float dtypes only; computed in the input dtype (each stage is one rounding per
element: |error| <= log2(n) ulps relative to the block's norm). NaN/inf spread to the whole
block (every output of a block depends on every input). Zeros stay zeros.
"""

from __future__ import annotations

import math

import torch

from gradcomp.numerics._checks import require_float_tensor
from gradcomp.numerics.kernels import variant
from gradcomp.numerics.random import SEED_HIGH, uniform_from_counter

__all__ = [
    "MAX_BLOCK",
    "hadamard_matrix",
    "hadamard_transform",
    "pad_to_block",
    "rht",
    "rht_inverse",
    "rht_signs",
]

MAX_BLOCK = 1 << 15


def _check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block must be an int (a power of two), got {block!r}")
    if block < 2 or block > MAX_BLOCK or block & (block - 1):
        raise ValueError(f"block must be a power of two in [2, {MAX_BLOCK}], got {block}")
    return block


def _check_dim(x: torch.Tensor, dim: int, block: int) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-d tensor, "
                         f"got {dim}")
    d = dim % x.dim()
    if x.shape[d] % block:
        raise ValueError(
            f"size {x.shape[d]} of dim {dim} is not a multiple of block {block}; pad it first "
            "(gradcomp.numerics.hadamard.pad_to_block)"
        )
    return d


def hadamard_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The dense normalised Sylvester Hadamard matrix H_n (n x n), for tests and small blocks."""
    n = _check_block(n)
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / torch.sqrt(torch.tensor(float(n), dtype=dtype, device=device))


def hadamard_transform(x: torch.Tensor, block: int = 16, dim: int = -1) -> torch.Tensor:
    """y = H_n applied to every block of ``block`` consecutive elements of ``x`` along ``dim``.

    Returns a new tensor of x's shape, dtype and device. H_n is symmetric and orthogonal, so the
    transform is its own inverse (up to float rounding). Raises ValueError when the size along
    ``dim`` is not a multiple of ``block`` or ``block`` is not a power of two in [2, 2^15].
    """
    require_float_tensor(x, "x")
    n = _check_block(block)
    d = _check_dim(x, dim, n)
    return _transform(x, d, n, None, "none")


def _transform(x: torch.Tensor, d: int, n: int, signs, where: str) -> torch.Tensor:
    """H_n along dim d, with the sign vector applied before (``where="pre"``: H D x) or after
    (``"post"``: D H x) in the same pass, or none. x is viewed as (blocks, n, trail) in its own
    layout (trail: the elements after dim d), so blocks along a dimension that is not the last
    are transformed where they lie, vectorised along the trailing elements, and the result has
    x's layout."""
    x = x.contiguous()
    trail = math.prod(x.shape[d + 1:])
    y = x.view(-1, n) if trail == 1 else x.view(-1, n, trail)
    args = (y,) if signs is None else (y, signs.to(x.device, x.dtype))
    if x.dtype in (torch.float32, torch.float64) and y.numel():
        # one fused pass (the eager butterfly wrote and re-read the tensor three times per
        # stage, after a copy that moved dim last and a pass for the signs); the same
        # operations on every element, so the same bits. Half types stay eager: inductor keeps
        # a half-precision graph's intermediates in float32 (no rounding between the stages)
        fn = _butterfly_unrolled if n <= UNROLL_MAX else _butterfly
        out = variant(fn, "hadamard_transform", elementwise=False, n=n, where=where)(*args)
    else:
        out = _butterfly(*args, n=n, where=where)
    return out.view(x.shape)


# the largest block whose compiled transform is unrolled (``_butterfly_unrolled``); above it the
# unrolled graph's compile time grows past 20 s (n = 64, measured) for a smaller gain
UNROLL_MAX = 32


def _butterfly_unrolled(y: torch.Tensor, signs: torch.Tensor | None = None, *, n: int,
                        where: str) -> torch.Tensor:
    """``_butterfly``'s operations on the n rows of each block as n separate tensors, for the
    compiled path. Traced as ``_butterfly``, each stage's reshape + stack made inductor compute
    every output from its block's n inputs anew (4-13x slower than this form on the CPU for
    n = 16 / 32, measured on a conv operand transformed along its batch dimension); here the
    stages are element-wise ops on the rows (blocks[, trail]) of one loop, each stage's sums
    computed once and the n results written into their rows of the output. The same additions
    in the same order on every element: the same bits as ``_butterfly``."""
    rows = list(y.unbind(1))
    if where == "pre":
        rows = [r * signs[j] for j, r in enumerate(rows)]
    h = 1
    while h < n:  # pairs (j, j + h) inside groups of 2h, as ``_butterfly``'s stage
        nxt = list(rows)
        for g in range(0, n, 2 * h):
            for j in range(g, g + h):
                a, b = rows[j], rows[j + h]
                nxt[j], nxt[j + h] = a + b, a - b
        rows, h = nxt, 2 * h
    norm = 2.0 ** (-(n.bit_length() - 1) / 2)
    rows = [r * norm for r in rows]
    if where == "post":
        rows = [r * signs[j] for j, r in enumerate(rows)]
    return torch.stack(rows, dim=1)


def _butterfly(y: torch.Tensor, signs: torch.Tensor | None = None, *, n: int,
               where: str) -> torch.Tensor:
    """H_n on the middle dimension of y (blocks, n[, trail]): log2(n) Sylvester stages, then
    the normalisation; ``signs`` multiplied in before or after (``where``)."""
    rows, tail = y.shape[0], tuple(y.shape[2:])
    s = None if signs is None else signs.reshape(n, *(1 for _ in tail))
    if where == "pre":
        y = y * s
    h = 1
    while h < n:
        # pairs (j, j + h) inside groups of 2h: the butterfly of one Sylvester stage
        v = y.reshape(rows, n // (2 * h), 2, h, *tail)
        a, b = v[:, :, 0], v[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).reshape(rows, n, *tail)
        h *= 2
    log2n = n.bit_length() - 1
    y = y * (2.0 ** (-log2n / 2))
    return y * s if where == "post" else y


def rht_signs(block: int, seed: int, step: int = 0, device=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sign vector s (``block`` values of +1/-1) of the RHT for ``(seed, step)``.

    s_i = -1 where the counter hash uniform u_i < 1/2. The 62-bit key is
    (seed * 0x9E3779B97F4A7C15 + step) mod 2^62 (a fixed odd multiplier, so distinct steps of one
    seed give distinct keys); the hash is pure integer math, identical on every device and rank.
    ``seed`` and ``step`` are ints >= 0.
    """
    n = _check_block(block)
    for v, name in ((seed, "seed"), (step, "step")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    key = (seed * 0x9E3779B97F4A7C15 + step) % SEED_HIGH
    dev = torch.device("cpu") if device is None else torch.device(device)
    u = uniform_from_counter(torch.tensor(key, dtype=torch.int64), n, device=torch.device("cpu"))
    s = torch.where(u < 0.5, -1.0, 1.0)
    return s.to(device=dev, dtype=dtype)


def _check_signs(signs: torch.Tensor) -> int:
    n = _check_block(int(signs.numel()))
    if signs.shape != (n,):
        raise ValueError(f"signs must have shape ({n},) (one sign per block element), got "
                         f"{tuple(signs.shape)}")
    return n


def rht(x: torch.Tensor, signs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Randomized Hadamard transform H D x blockwise along ``dim``; block = ``signs.numel()``.

    ``signs`` is a vector of +1/-1 (e.g. :func:`rht_signs`), applied to each block before H.
    """
    require_float_tensor(x, "x")
    n = _check_signs(signs)
    return _transform(x, _check_dim(x, dim, n), n, signs, "pre")


def rht_inverse(y: torch.Tensor, signs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The exact inverse D H y of :func:`rht` (H symmetric orthogonal, D^2 = I)."""
    require_float_tensor(y, "y")
    n = _check_signs(signs)
    return _transform(y, _check_dim(y, dim, n), n, signs, "post")


def pad_to_block(x: torch.Tensor, block: int, dim: int = -1) -> torch.Tensor:
    """``x`` with zeros appended along ``dim`` up to a multiple of ``block`` (x itself if none
    are needed). Zero padding is exact for transformed GEMM operands: padded rows add 0."""
    require_float_tensor(x, "x")
    n = _check_block(block)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}], got {dim}")
    d = dim % x.dim()
    extra = (-x.shape[d]) % n
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[d] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=d)
