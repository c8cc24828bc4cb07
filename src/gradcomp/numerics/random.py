"""Counter-based random numbers: uniforms from (seed, element index) with integer bit ops.

Why: a fused kernel (``torch.compile``) cannot call torch's stateful generator per element, and
drawing a full ``torch.rand`` tensor costs a separate pass and a full-size buffer. Instead each
stochastic call gets one 62-bit seed, turns it into four int32 hash keys (``draw_keys``) and
each element hashes ``(keys, index)`` with a 32-bit integer mixer (the "lowbias32" mixer of
C. Wellons: xor-shift / multiply rounds, bias ~0.17 of an ideal 32-bit permutation). The same
seed and shape always give the same numbers, on every device and in both the fused and the
eager path, because only exact integer ops are used.

Where a call's seed comes from (the ``generator`` argument of every stochastic operator):

* a ``torch.Generator`` (or None: torch's default one): one int64 seed drawn per call (a 0-d
  device tensor, so no host sync on CUDA; on the CPU its keys are derived on Python integers,
  ``keys_of_seed``, the same bits as the device chain ``stacked_keys``);
* a ``Stream`` of ``StepStreams``: no draw at all. The seed is a pure function of (run seed,
  training step, stream, draw number within the step) (``stream_seed``), derived on the host,
  so a training step costs no generator call and no device key ops (on an accelerator: one
  small non-blocking host-to-device copy per call), a resumed run repeats the same streams
  from its step counter alone, and a one-device run gives the same streams on every device.

All arithmetic is int32 with wrap-around products (two's complement, the behaviour of torch
int32 multiplication on CPU and CUDA); right shifts are made logical by masking, since torch's
``>>`` is arithmetic on negative values.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "SEED_HIGH", "draw_seed", "draw_keys", "host_keys", "keys_of_seed", "mix32", "seed_keys",
    "stream_seed", "uniform_from_counter", "uniform_from_keys", "sample_values", "hash_at",
    "hash_counter", "uniform_at", "random_bits", "stacked_keys", "wide_keys", "Stream",
    "StepStreams", "COUNTER_COLUMNS", "counter_columns", "counter_layout", "counter_like",
    "layout_columns", "uniform_like",
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
    if isinstance(generator, Stream):
        raise TypeError("draw_seed: a Stream gives hash keys, not a seed; call draw_keys")
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
    device = k1.device if device is None else device
    return hash_at(k1, k2, _flat_counter(numel, device, start))


def _flat_counter(numel: int, device, start: int) -> torch.Tensor:
    """int32 start, start+1, ..., start+numel-1 (the counter of a flat pass)."""
    _check_counter(start + numel)
    return torch.arange(start, start + numel, device=device, dtype=torch.int32)


def _check_counter(end: int) -> None:
    if end >= 1 << 31:
        raise ValueError(f"numel must be < 2**31 for the int32 counter, got {end}")


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


# ---- the counter as a 2-D loop on the CPU ---------------------------------------------------
# Inductor's CPU code builds an in-kernel arange vector from 16 scalars (``Vectorized<int32_t>::
# arange``): measured on 1.6M float32 in cache, a pruning-like kernel cost 0.80 ms per call with
# it and 0.46 ms with the counter built from a row offset plus 16 columns loaded from a small
# tensor, the same values. So the pruning kernels view their flat input as (rows, L) and take
# the columns 0..L-1 after the four keys (``counter_layout``): element (r, c) draws at counter
# r*L + c + start, exactly what the flat pass draws (same bits in both layouts). Stochastic
# rounding's bit path (``rounding``, also after pruning) keeps the flat counter: it is bound by
# its float <-> int reinterpretations, which inductor's CPU code does element by element.
COUNTER_COLUMNS = 1024  # the longest row; the keys tensor of the 2-D layout holds 4 + this
_WIDTHS = (1024, 512, 256, 128, 64)


def counter_columns(numel: int, device) -> int:
    """L of the (rows, L) counter layout for a fused kernel over ``numel`` elements on
    ``device``, or 0 (a flat loop: not on the CPU, or no width that fits).

    L divides numel and leaves at least 64 rows, and the rows differ from L and from the
    keys' length: a size shared by two arguments (dynamo's duck sizing) would tie them in the
    compiled graph, whose direct call (``kernels._Direct``) then refuses other sizes until
    dynamo compiles a more general graph.
    """
    if torch.device(device).type != "cpu" or numel >= 1 << 31:
        return 0
    for width in _WIDTHS:
        rows = numel // width
        if numel % width == 0 and rows >= 64 and rows not in (width, 4 + COUNTER_COLUMNS):
            return width
    return 0


@lru_cache(maxsize=16)
def _columns(device) -> torch.Tensor:
    return torch.arange(COUNTER_COLUMNS, dtype=torch.int32, device=device)


def counter_layout(flat: torch.Tensor, keys: torch.Tensor, compiled: bool):
    """``(x, keys)`` as a fused kernel takes them: the flat tensor and its keys
    (``draw_keys``), or on the CPU the (rows, L) view and ``[k1, k2, k3, k4, 0, 1, ...,
    COUNTER_COLUMNS - 1]`` (the counter's columns: ``counter_like``). ``compiled``: whether
    the call takes the fused path (the eager path gains nothing). ``flat`` may have any shape
    (its elements in order: a contiguous tensor costs one view op). ``keys`` may already carry
    the columns (``draw_keys(..., columns=True)``): they are then passed as they are (or the
    first four, for a flat pass)."""
    width = counter_columns(flat.numel(), flat.device) if compiled else 0
    full = keys.numel() == 4 + COUNTER_COLUMNS  # ``draw_keys(..., columns=True)``
    if not width:
        return flat if flat.dim() == 1 else flat.reshape(-1), keys[:4] if full else keys
    # reshape: one view op from a contiguous tensor of any shape (a copy of a strided one)
    return flat.reshape(-1, width), keys if full else torch.cat([keys, _columns(flat.device)])


def counter_like(x: torch.Tensor, keys: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The int32 counter of every element of ``x`` (what ``hash_counter`` hashes): a flat x
    counts start, start+1, ...; a (rows, L) x (``counter_layout``) counts r*L + c + start,
    its columns c read from ``keys[4:4 + L]``. Safe inside torch.compile."""
    if x.dim() == 1:
        return _flat_counter(x.numel(), x.device, start)
    _check_counter(start + x.numel())
    rows, width = x.shape
    base = torch.arange(rows, device=x.device, dtype=torch.int32) * width + start
    return base[:, None] + layout_columns(x, keys)


def layout_columns(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The column indices 0..L-1 of a (rows, L) counter layout, as its keys tensor carries
    them (``counter_layout``)."""
    return keys[4:4 + x.shape[1]]


def uniform_like(keys: torch.Tensor, x: torch.Tensor, dtype: torch.dtype = torch.float32,
                 start: int = 0) -> torch.Tensor:
    """``uniform_from_keys(keys[0], keys[1], x.numel(), ...)`` in x's shape (``counter_like``:
    a flat x or the 2-D counter layout): the same numbers at the same counters."""
    return _uniform(hash_at(keys[0], keys[1], counter_like(x, keys, start)), dtype)


def stacked_keys(seed: torch.Tensor) -> torch.Tensor:
    """``[k1, k2, k3, k4]`` (int32, on seed's device) for ``random_bits``; computed eagerly,
    outside any compiled region (see ``seed_keys``)."""
    k1, k2 = seed_keys(seed)
    k3, k4 = wide_keys(k1, k2)
    return torch.stack([k1, k2, k3, k4])


_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def _mix32_int(u):
    """``mix32`` on a Python integer (its 32-bit pattern; products wrap modulo 2^32), or
    elementwise on a numpy uint64 array (each product of two 32-bit values < 2^64: exact; no
    in-place operation, so the caller's array is left as it is)."""
    u = u & _U32
    u = u ^ (u >> 16)
    u = (u * 0x7FEB352D) & _U32
    u = u ^ (u >> 15)
    u = (u * 0x846CA68B) & _U32
    return u ^ (u >> 16)


def _signed32(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def host_keys(seed: int) -> list[int]:
    """``stacked_keys`` of the seed ``seed`` (an int in [0, 2^62)) on Python integers: the
    same four int32 values (a test compares every bit with the tensor chain)."""
    return [_signed32(k) for k in _keys_of(seed)]


def _keys_of(seed):
    """(k1, k2, k3, k4) of a seed in [0, 2^62) as unsigned 32-bit values: Python integers, or
    elementwise on a numpy uint64 array of seeds (``keys_table``)."""
    k1 = _mix32_int((seed & 0x7FFFFFFF) ^ 0x2545F491)
    k2 = _mix32_int(((seed >> 31) & 0x7FFFFFFF) ^ k1)
    k3 = _mix32_int(k2 ^ 0x6A09E667)
    return k1, k2, k3, _mix32_int(k3 ^ k1)


def keys_table(seed: int, step: int, streams: np.ndarray, draw: int) -> np.ndarray:
    """``host_keys(stream_seed(seed, step, i, draw))`` for every i of ``streams`` (a uint64
    array) at once: an (len(streams), 4) int32 array, the same bits (numpy's uint64 array
    arithmetic is the masked Python-integer arithmetic)."""
    z = _splitmix64(_splitmix64(seed) ^ step)  # the part shared by every stream
    z = _splitmix64(np.full(streams.shape, z, dtype=np.uint64) ^ streams)
    seeds = _splitmix64(z ^ np.uint64(draw)) >> np.uint64(2)
    return np.stack(_keys_of(seeds), axis=1).astype(np.uint32).view(np.int32)


def keys_of_seed(seed: torch.Tensor) -> torch.Tensor:
    """``stacked_keys(seed)``: int32 ``[k1, k2, k3, k4]`` on seed's device, the same bits.

    A seed on the CPU is read for free (no device to synchronise), so there the chain runs on
    Python integers (``host_keys``: a few microseconds instead of about forty 0-d tensor ops,
    more than the kernel itself for a small layer); elsewhere it is ``stacked_keys`` itself.
    """
    if seed.device.type != "cpu":
        return stacked_keys(seed)
    return torch.tensor(host_keys(int(seed)), dtype=torch.int32)


def _splitmix64(z: int) -> int:
    # the output function of Steele, Lea and Flood's SplitMix64 (a bijection of 64-bit words);
    # also elementwise on a numpy uint64 array, whose arithmetic wraps modulo 2^64 as the masks
    z = (z + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def stream_seed(seed: int, step: int, stream: int, draw: int) -> int:
    """The seed in [0, 2^62) of draw ``draw`` of stream ``stream`` at training step ``step`` of
    a run seeded ``seed`` (each an int in [0, 2^64)).

    SplitMix64's output function chained over the four numbers: a bijection of the 64-bit
    state in each of them for the others fixed, so two draws that differ in one of the numbers
    never share the 64-bit value; any two draws share a 62-bit seed with probability about
    2^-62.
    """
    for name, v in (("seed", seed), ("step", step), ("stream", stream), ("draw", draw)):
        if not isinstance(v, int) or not 0 <= v <= _U64:
            raise ValueError(f"{name} must be an int in [0, 2**64), got {v!r}")
    z = _splitmix64(seed)
    for v in (step, stream, draw):
        z = _splitmix64(z ^ v)
    return z >> 2


def draw_keys(generator, device, columns: bool = False) -> torch.Tensor:
    """The hash keys of one stochastic call: int32 ``[k1, k2, k3, k4]`` on ``device``.

    ``generator``: a ``Stream`` (its next draw of the current step, no generator call), or a
    ``torch.Generator`` / None (one seed drawn, ``draw_seed``, then ``keys_of_seed``).
    ``[k1, k2]`` key the 31- and 24-bit words, ``[k3, k4]`` the low word of 63-bit ones
    (``random_bits``). ``columns`` (for a caller that takes ``counter_layout``): on the CPU
    the keys followed by the counter's columns ``0, 1, ..., COUNTER_COLUMNS - 1`` (what
    ``counter_layout`` passes to a 2-D kernel; a ``Stream`` hands out a row its step's table
    already holds, so the layout costs no op per call); elsewhere the four keys. The same
    draw either way.
    """
    columns = columns and torch.device(device).type == "cpu"
    if isinstance(generator, Stream):
        return generator.keys(device, columns)
    keys = keys_of_seed(draw_seed(generator, device))
    return torch.cat([keys, _columns(keys.device)]) if columns else keys


class Stream:
    """One stream of a ``StepStreams`` (the wrapper: one per layer): pass it where a
    stochastic operator takes ``generator``. Each call takes the stream's next draw of the
    current step (``StepStreams``)."""

    __slots__ = ("_owner", "index")

    def __init__(self, owner: StepStreams, index: int):
        self._owner, self.index = owner, index

    def keys(self, device, columns: bool = False) -> torch.Tensor:
        """The keys of this stream's next draw, int32 ``[k1, k2, k3, k4]`` on ``device``;
        ``columns`` (the CPU only): followed by the counter's columns (``draw_keys``)."""
        return self._owner._next(self.index, torch.device(device), columns)

    def __repr__(self) -> str:
        return f"Stream({self.index} of {self._owner!r})"


class StepStreams:
    """Hash keys for the stochastic calls of a training loop, without a generator: draw ``d``
    of stream ``i`` on device ordinal ``o`` at step ``k`` has the seed
    ``stream_seed(seed, k, i + 2^32 o, d)`` and the keys ``host_keys`` of it (``o`` is 0 for
    the CPU and for the first accelerator, so a one-device run has the same keys on any
    device; a replica or pipeline stage on another device gets its own).

    ``stream(i)``: stream i (a ``Stream``). ``set_step(k)``: step k begins; every draw counter
    restarts at 0 (a step may call a stream several times: prune then stochastic rounding,
    gradient accumulation). Counters are kept per (stream, device), so the threads of a
    multi-device backward (one per device) never share one. A step's keys are thus a function of
    the run seed and the step counter: a resumed run repeats them and a step costs no generator
    call. The keys are built on Python integers; on an accelerator they reach the device in one
    non-blocking copy from pinned host memory on the caller's stream (no host synchronisation,
    no device op besides the copy).
    """

    def __init__(self, seed: int, streams: int):
        if not isinstance(seed, int) or not 0 <= seed <= _U64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if not isinstance(streams, int) or streams < 1:
            raise ValueError(f"streams must be a positive int, got {streams!r}")
        self.seed, self.n = seed, streams
        self.step = 0
        self._draws: dict = {}  # (stream, device type, ordinal) -> draws taken in this step
        # (device type, ordinal, draw) -> every stream's keys of that draw in this step:
        # [(streams, 4) tensor on the device (``keys_table``: built once per step and draw), its
        # rows, its rows followed by the counter's columns (on the CPU, built on first use)]
        self._tables: dict = {}
        self._streams = [Stream(self, i) for i in range(streams)]

    def stream(self, index: int) -> Stream:
        if not isinstance(index, int) or not 0 <= index < self.n:
            raise ValueError(f"index must be an int in [0, {self.n}), got {index!r}")
        return self._streams[index]

    def set_step(self, step: int) -> None:
        """Begin step ``step`` (an int in [0, 2**64)): every stream's next draw is its first."""
        if not isinstance(step, int) or not 0 <= step <= _U64:
            raise ValueError(f"step must be an int in [0, 2**64), got {step!r}")
        self.step = step
        self._draws = {}
        self._tables = {}

    def keys_at(self, index: int, draw: int, device_index: int = 0) -> list[int]:
        """The four keys (Python ints) of draw ``draw`` of stream ``index`` on device ordinal
        ``device_index`` at this step."""
        return host_keys(stream_seed(self.seed, self.step, index + (device_index << 32), draw))

    def _next(self, index: int, device: torch.device, columns: bool = False) -> torch.Tensor:
        ordinal = device.index or 0  # "cuda" and "cuda:0" are one device, with one counter
        key = (index, device.type, ordinal)
        d = self._draws.get(key, 0)
        self._draws[key] = d + 1
        rows = self._tables.get((device.type, ordinal, d))
        if rows is None:
            table = self._table(d, device, ordinal)
            rows = self._tables[device.type, ordinal, d] = [table, table.unbind(0), None]
        if not (columns and device.type == "cpu"):
            return rows[1][index]
        if rows[2] is None:  # the first call of this draw that takes the 2-D layout
            n = rows[0].shape[0]
            rows[2] = torch.cat([rows[0], _columns(device).expand(n, -1)], dim=1).unbind(0)
        # views of the step's tables, made once per draw (keys are only read): a call costs no
        # tensor op (measured inside a ResNet-8 backward, with the caches the layer's backward
        # left: a row select and the columns' concatenation took about 90 us per layer)
        return rows[2][index]

    def _table(self, draw: int, device: torch.device, ordinal: int) -> torch.Tensor:
        """Draw ``draw`` of every stream at this step on ``device``: (streams, 4) int32."""
        streams = np.arange(self.n, dtype=np.uint64) + np.uint64(ordinal << 32)
        keys = torch.from_numpy(keys_table(self.seed, self.step, streams, draw))
        if device.type == "cpu":
            return keys
        try:  # pinned, so that the copy runs asynchronously (no host synchronisation)
            keys = keys.pin_memory()
        except RuntimeError:  # no pinned memory on this backend: a plain copy
            pass
        return keys.to(device, non_blocking=True)

    def __repr__(self) -> str:
        return f"StepStreams(seed={self.seed}, streams={self.n}, step={self.step})"


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
