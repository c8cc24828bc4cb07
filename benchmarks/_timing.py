"""Shared timing helper of the benchmark scripts (run as ``python benchmarks/bench_*.py``)."""

from __future__ import annotations

import statistics
import time

import torch


def time_call(fn, repeat: int, device) -> tuple[float, float]:
    """(min, median) wall seconds of ``fn()`` over ``repeat`` runs after one warm-up call (which
    compiles a fused kernel on its first use); CUDA work is synchronised around each run."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)
