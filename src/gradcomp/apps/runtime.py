"""Process-level settings for training on the CPU: ``retain_freed_memory()``.

PyTorch's CPU tensors come from the C library's ``malloc`` (no caching allocator, unlike CUDA's).
glibc's ``malloc`` serves a large request (at or above its mmap threshold: 128 KiB, raised on
the fly up to the size of the largest such block freed, at most 32 MiB on 64-bit) with a fresh
``mmap`` that ``free`` unmaps, and it gives the top of its heap back to the kernel (``trim``)
whenever more than the trim threshold lies free there (128 KiB, twice the mmap threshold once
that has been raised). A training step allocates and frees the same large tensors every step,
so either way the next step's tensors can land on pages the kernel must fault in and zero
again, one fault per 4 KiB page, and how many depends on the order of allocations and on what
the process did before. The per-GEMM recipes, whose backward allocates several
activation-sized temporaries per layer, paid tens of thousands of faults per ResNet-8 step
(``benchmarks/bench_train_step.py`` prints them per recipe; the README has the figures).

``retain_freed_memory()`` tells glibc to keep freed memory in the process and reuse it: blocks
below 32 MiB (the ceiling of glibc's own adaptive threshold, ``DEFAULT_MMAP_THRESHOLD_MAX``;
512 KiB on 32-bit; glibc 2.36 also accepts larger values, but see below) come from the heap,
and the heap is never trimmed (``M_TRIM_THRESHOLD`` -1). The process's resident memory then
stays at its peak, as under CUDA's caching allocator, and a later step reuses the pages the
previous one faulted in. Larger blocks are still mapped per allocation: with mmap off altogether
(``M_MMAP_MAX`` 0) a freed 64 MiB block was not reused for the next request of its size in some
processes (a small allocation had landed between it and the heap's top, and the 64-byte-aligned
request is larger than the block), so the heap grew by 64 MiB per cycle. Blocks allocated on
other threads live in glibc's per-thread arenas, which still release heaps that empty
entirely. Values, bits and results are unchanged: only where memory comes from.
``gradcomp train`` and ``apps.train.train`` retain by default (``TrainConfig.malloc``); the
training-step benchmark does before measuring any recipe, the baseline included.

The setting is process-wide and lasts until the process ends: glibc has no way back to its
adaptive thresholds, so ``apply_malloc_policy("default")`` leaves the process's policy as it
is, whatever an earlier call set. Children made by ``fork`` (DataLoader workers under the fork
start method) inherit it; spawned processes (the data-parallel ranks of ``gradcomp train
--nproc``) start with glibc's defaults, and ``train`` sets it again in each rank. Other C
libraries (musl, macOS, Windows) have no ``mallopt``: the call changes nothing and returns
False. An allocator preloaded in glibc's place (jemalloc, tcmalloc through ``LD_PRELOAD``)
keeps its own policy; glibc's ``mallopt`` still answers True.
"""

from __future__ import annotations

import ctypes
import functools
import sys

from gradcomp.numerics._checks import require_choice

__all__ = ["MALLOC_POLICIES", "apply_malloc_policy", "retain_freed_memory"]

# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_NEVER_TRIM = -1  # M_TRIM_THRESHOLD -1: trimming disabled (``man mallopt``)
# the ceiling of glibc's adaptive mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX): 4 MiB *
# sizeof(long) on 64-bit, 512 KiB on 32-bit
_MMAP_THRESHOLD_MAX = (4 << 20) * 8 if ctypes.sizeof(ctypes.c_long) == 8 else 512 << 10

MALLOC_POLICIES = ("retain", "default")


@functools.lru_cache(maxsize=1)
def _mallopt():
    """glibc's ``mallopt`` as this process resolves it, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallopt  # the process's own symbol: no library search
    except (OSError, AttributeError):  # no mallopt in this C library
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def retain_freed_memory() -> bool:
    """Keep the memory this process frees for its next allocations (glibc: blocks below 32 MiB
    from the heap, never trimmed); see the module docstring for why and what it costs. Returns
    True when glibc accepted both settings; False when there is no ``mallopt`` or glibc refused
    the mmap threshold, and then nothing was changed (the trim threshold is set only after the
    mmap threshold was accepted: alone, it would freeze glibc's adaptive mmap threshold)."""
    fn = _mallopt()
    if fn is None:
        return False
    # mallopt returns 1 on success, 0 on error
    if fn(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) != 1:
        return False
    return fn(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1


def apply_malloc_policy(policy: str) -> bool:
    """``"retain"``: :func:`retain_freed_memory` (its result); ``"default"``: leave the
    process's policy as it is (False; glibc's own unless an earlier call changed it). Any
    other value raises ValueError naming ``malloc``."""
    require_choice(policy, "malloc", MALLOC_POLICIES)
    return retain_freed_memory() if policy == "retain" else False
