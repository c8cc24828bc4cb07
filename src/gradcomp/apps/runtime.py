"""Process-level settings for training on the CPU: ``retain_freed_memory()``.

PyTorch's CPU tensors come from the C library's ``malloc`` (no caching allocator, unlike CUDA's).
glibc's ``malloc`` serves a large request (above its mmap threshold: 128 KiB, raised on the fly
up to the size of the largest such block freed, at most 32 MiB) with a fresh ``mmap`` that
``free`` unmaps, and it gives the top of its heap back to the kernel (``trim``) whenever more
than twice that threshold lies free there. A training step allocates and frees the same large
tensors every step, so either way the next step's tensors can land on pages the kernel must
fault in and zero again, one fault per 4 KiB page, and how many depends on the order of
allocations and on what the process did before. ``python benchmarks/bench_train_step.py
--malloc default --recipes nvfp4-recipe`` (the per-GEMM NVFP4 recipe, whose backward allocates
several activation-sized temporaries per layer: the Hadamard-transformed and quantized operands)
counted 27 700-28 900 minor faults per ResNet-8 step, against 5 300-7 000 when twelve other
recipes ran in the same process first (glibc's thresholds had grown), and its overhead over the
uncompressed step was +112% against +80-86% with retained memory (0-2 faults per step).

``retain_freed_memory()`` tells glibc to keep freed memory in the process and reuse it: blocks
up to 32 MiB (its largest ``M_MMAP_THRESHOLD``) come from the heap, and the heap is not trimmed
(``M_TRIM_THRESHOLD`` at its largest, 2 GiB - 1). The process's resident memory then stays at
its peak, as under CUDA's caching allocator, and a later step reuses the pages the previous one
faulted in. Larger blocks are still mapped per allocation: with mmap off altogether
(``M_MMAP_MAX`` 0) a freed 64 MiB block was not reused for the next request of its size in some
processes (a small allocation had landed between it and the heap's top, and the 64-byte-aligned
request is larger than the block), so the heap grew by 64 MiB per cycle. Values, bits and
results are unchanged: only where memory comes from. It is what ``gradcomp train`` does by
default (``--malloc default`` leaves glibc's policy) and what the training-step benchmark does
before measuring any recipe, the baseline included.

The setting is process-wide and lasts until the process ends (glibc has no way back to its
adaptive thresholds); forked children (DataLoader workers) inherit it, spawned ones (the
data-parallel ranks of ``gradcomp train --nproc``) start with glibc's defaults, and ``train``
sets it again in each rank. Other C libraries (musl, macOS, Windows) have no ``mallopt``: the
call changes nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

from gradcomp.numerics._checks import require_choice

__all__ = ["MALLOC_POLICIES", "apply_malloc_policy", "retain_freed_memory"]

# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = (1 << 31) - 1
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX: 4 MiB * sizeof(long))
_MMAP_THRESHOLD_MAX = 32 << 20

MALLOC_POLICIES = ("retain", "default")


@functools.lru_cache(maxsize=1)
def _mallopt():
    """glibc's ``mallopt``, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def retain_freed_memory() -> bool:
    """Keep the memory this process frees for its next allocations (glibc: blocks up to 32 MiB
    from the heap, no trim); see the module docstring for why and what it costs. Returns True
    when glibc accepted both settings, False where there is no glibc (nothing changed)."""
    fn = _mallopt()
    if fn is None:
        return False
    # mallopt returns 1 on success, 0 on error
    return bool(fn(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) & bool(fn(_M_TRIM_THRESHOLD, _INT_MAX))


def apply_malloc_policy(policy: str) -> bool:
    """``"retain"``: :func:`retain_freed_memory` (its result); ``"default"``: leave the C
    library's policy as it is (False). Any other value raises ValueError naming ``malloc``."""
    require_choice(policy, "malloc", MALLOC_POLICIES)
    return retain_freed_memory() if policy == "retain" else False
