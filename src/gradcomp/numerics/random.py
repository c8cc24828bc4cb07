"""Counter-based random numbers: uniforms from (seed, element index) with integer bit ops.

Why: a fused kernel (``torch.compile``) cannot call torch's stateful generator per element, and
drawing a full ``torch.rand`` tensor costs a separate pass and a full-size buffer. Instead one
int64 seed is drawn per call from the user's ``torch.Generator`` (a 0-d device tensor, so no host
sync on CUDA) and each element hashes ``(seed, index)`` with a 32-bit integer mixer
(the "lowbias32" mixer of C. Wellons: xor-shift / multiply rounds, bias ~0.17 of an ideal
32-bit permutation). The same seed and shape always give the same numbers, on every device
and in both the fused and the eager path, because only exact integer ops are used.

All arithmetic is int32 with wrap-around products (two's complement, the behaviour of torch
int32 multiplication on CPU and CUDA); right shifts are made logical by masking, since torch's
``>>`` is arithmetic on negative values.
"""

from __future__ import annotations

import torch

__all__ = [
    "SEED_HIGH", "draw_seed", "mix32", "seed_keys", "uniform_from_counter", "uniform_from_keys",
    "sample_values", "hash_at", "hash_counter", "uniform_at", "random_bits", "stacked_keys",
    "wide_keys",
]

# seeds are drawn in [0, 2^62): positive int64, room for the two 31-bit halves below
SEED_HIGH = 1 << 62
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # same 32-bit pattern as a signed int32 constant


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 ``x`` by ``s`` bits."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit integer mixer (lowbias32) on an int32 tensor (wrap-around products).

    Every output bit depends on every input bit; the map is a permutation of the 2^32 values.
    """
    x = x ^ _srl(x, 16)
    x = x * _M1
    x = x ^ _srl(x, 15)
    x = x * _M2
    return x ^ _srl(x, 16)


def draw_seed(generator: torch.Generator | None, device) -> torch.Tensor:
    """One int64 seed in [0, 2^62) as a 0-d tensor on ``device`` (no host sync).

    With ``generator=None`` torch's default generator of ``device`` is used, so
    ``torch.manual_seed`` makes a run reproducible.
    """
    device = torch.device(device)
    if generator is not None:
        return torch.randint(0, SEED_HIGH, (), generator=generator, device=generator.device,
                             dtype=torch.int64).to(device)
    return torch.randint(0, SEED_HIGH, (), device=device, dtype=torch.int64)


def seed_keys(seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 0-d int32 keys from the 62-bit int64 seed (its low and high 31-bit halves, mixed).

    Call this *outside* a ``torch.compile`` region and pass the keys in: torch 2.13's CPU
    inductor evaluates this scalar int64 -> int32 chain in wider precision when it is fused
    into a broadcast loop (no 32-bit wrap), which silently changes the stream.
    """
    lo = (seed & 0x7FFFFFFF).to(torch.int32)
    hi = ((seed >> 31) & 0x7FFFFFFF).to(torch.int32)
    k1 = mix32(lo ^ 0x2545F491)
    k2 = mix32(hi ^ k1)
    return k1, k2


def uniform_from_counter(seed: torch.Tensor, numel: int, device=None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``numel`` uniforms in [0, 1) from ``(seed, index)`` for index = 0..numel-1.

    Values are multiples of 2^-24 (24 random bits: exact in float32, so ``u < 1`` always);
    0 occurs with probability 2^-24. Two rounds of ``mix32`` keyed by both seed halves make
    streams of different seeds independent for practical purposes. ``numel`` must be < 2^31
    (the index is an int32 counter).
    """
    device = seed.device if device is None else device
    k1, k2 = seed_keys(seed.to(device))
    return uniform_from_keys(k1, k2, numel, device, dtype)


def hash_counter(k1: torch.Tensor, k2: torch.Tensor, numel: int, device=None,
                 start: int = 0) -> torch.Tensor:
    """The counter hash: int32 ``mix32(mix32(index ^ k1) + k2)`` for index = start..start+numel-1
    (``start``: where a chunk of a larger tensor begins, so a chunked pass draws the same bits).

    The one per-element hash of the package (stochastic rounding and stochastic pruning both
    draw from it). Safe inside torch.compile given keys from ``seed_keys``.
    """
    if start + numel >= 1 << 31:
        raise ValueError(f"numel must be < 2**31 for the int32 counter, got {start + numel}")
    device = k1.device if device is None else device
    return hash_at(k1, k2, torch.arange(start, start + numel, device=device, dtype=torch.int32))


def hash_at(k1: torch.Tensor, k2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``hash_counter`` at the given int32 counter values ``idx`` (any shape): the bits that
    element ``idx`` of a flat pass draws (a layout that skips elements, e.g. padding, can draw
    what the padded pass drew)."""
    return mix32(mix32(idx ^ k1) + k2)


def wide_keys(k1: torch.Tensor, k2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A second, independent key pair derived from ``seed_keys``' (for 63-bit random words)."""
    k3 = mix32(k2 ^ 0x6A09E667)
    return k3, mix32(k3 ^ k1)


def random_bits(keys: torch.Tensor, numel: int, wide: bool, device=None,
                start: int = 0) -> torch.Tensor:
    """Non-negative random integers per element: 31 bits (int32) or 63 bits (int64, ``wide``).

    ``keys``: int32 tensor ``[k1, k2, k3, k4]`` (``stacked_keys``). The 31-bit word is the top
    31 bits of ``hash_counter(k1, k2)``; the 63-bit word puts those 31 bits above the 32 bits
    of ``hash_counter(k3, k4)``.
    """
    h1 = hash_counter(keys[0], keys[1], numel, device, start)
    if not wide:
        return _srl(h1, 1)
    h2 = hash_counter(keys[2], keys[3], numel, device, start)
    return ((h1.to(torch.int64) & 0x7FFFFFFF) << 32) | (h2.to(torch.int64) & 0xFFFFFFFF)


def stacked_keys(seed: torch.Tensor) -> torch.Tensor:
    """``[k1, k2, k3, k4]`` (int32, on seed's device) for ``random_bits``; computed eagerly,
    outside any compiled region (see ``seed_keys``)."""
    k1, k2 = seed_keys(seed)
    k3, k4 = wide_keys(k1, k2)
    return torch.stack([k1, k2, k3, k4])


def uniform_from_keys(k1: torch.Tensor, k2: torch.Tensor, numel: int, device=None,
                      dtype: torch.dtype = torch.float32, start: int = 0) -> torch.Tensor:
    """The body of ``uniform_from_counter`` given ``seed_keys(seed)``; safe inside torch.compile.

    Values: the top 24 bits of ``hash_counter`` times 2^-24.
    """
    return _uniform(hash_counter(k1, k2, numel, device, start), dtype)


def uniform_at(k1: torch.Tensor, k2: torch.Tensor, idx: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uniform_from_keys`` at the given int32 counter values ``idx`` (``hash_at``)."""
    return _uniform(hash_at(k1, k2, idx), dtype)


def _uniform(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the top 24 bits of the hash times 2^-24: exact in float32, so u < 1
    return _srl(h, 8).to(dtype) * (2.0**-24)


class DeviceGenerators:
    """One ``torch.Generator`` per device, all seeded with ``seed`` on first use.

    Stateful compressors and capture draw from these so that a seeded run repeats exactly on
    every device; ``state_dict`` keeps each generator's state for checkpoints.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._gens: dict[torch.device, torch.Generator] = {}

    def __call__(self, device) -> torch.Generator:
        device = torch.device(device)
        g = self._gens.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._gens[device] = g
        return g

    def state_dict(self) -> dict:
        return {str(d): g.get_state() for d, g in self._gens.items()}

    def load_state_dict(self, state: dict) -> None:
        for dev, st in state.items():
            self(dev).set_state(st)


def sample_values(x: torch.Tensor, size: int | None, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """A 1-D sample of ``x``'s elements: all of them when ``x`` has at most ``size`` elements
    (or ``size`` is None), else ``size`` indices drawn uniformly *with replacement*.

    With replacement, so that each draw is an independent value of the tensor's empirical
    distribution (the sample-based thresholds and errors are then plain Monte Carlo averages).
    The indices are drawn on ``generator``'s device (CPU when None) and moved to ``x``'s: the
    same generator state gives the same sample on every device. Returns a view-free tensor of
    ``x``'s dtype; no host synchronisation.
    """
    flat = x.detach().reshape(-1)
    if size is None or flat.numel() <= size:
        return flat
    dev = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randint(0, flat.numel(), (int(size),), generator=generator, device=dev)
    return flat[idx.to(flat.device)]
