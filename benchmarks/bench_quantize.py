"""Time quantize_fp on a 16M-element float32 tensor against references measured in the same run.

References:

* ``x.clone()``: one read and one write into a new tensor, as every out-of-place quantizer
  allocates its output;
* ``kept.copy_(x)``, a copy into a buffer kept across runs: the memory roofline. On the CPU a
  64 MiB tensor is above the 32 MiB up to which glibc's adaptive mmap threshold grows (and
  ``gradcomp.apps.runtime.retain_freed_memory`` keeps blocks in the heap), so each new tensor
  is a fresh mapping whose pages the kernel faults in and zeroes, and a clone measures
  page faults as much as memory (the last column counts them per call). With
  ``MALLOC_MMAP_THRESHOLD_=134217728 MALLOC_TRIM_THRESHOLD_=-1`` in the environment glibc keeps
  such blocks in its heap, and the same run times the kernels without faults;
* torch's float8 cast (``x.to(float8_e4m3fn).float()``: RNE only, no scaling), and qtorch's
  ``float_quantize`` when it is importable (optional; not installed by this project).

Prints the min and median of ``--repeat`` runs and ratios to both copies (min / min). Run:

    python benchmarks/bench_quantize.py [--n 16777216] [--repeat 7] [--device cpu]
    python benchmarks/bench_quantize.py --n 802816 --repeat 50 --no-eager   # a ResNet layer
"""

from __future__ import annotations

import argparse

try:
    import resource  # page faults per call (Unix)
except ImportError:  # pragma: no cover
    resource = None

import torch

from _timing import time_call  # noqa: E402  (a sibling script module)
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.kernels import variant
from gradcomp.numerics.rounding import _quantize_flat, prepare, quantize_fp, quantize_fp_amax


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1 << 24, help="elements (default 16M)")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per case")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--format", default="e4m3fn", help="format name")
    p.add_argument("--no-eager", action="store_true", help="skip the (slow) eager path")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    fmt = FPFormat.from_name(args.format)
    x = torch.randn(args.n, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    kept = torch.empty_like(x).fill_(0.0)  # its pages touched once, before any timing
    cases = {"clone": lambda: x.clone(), "copy into a kept buffer": lambda: kept.copy_(x)}
    if hasattr(torch, "float8_e4m3fn"):
        cases["float8_e4m3fn cast"] = lambda: x.to(torch.float8_e4m3fn).float()
    for compiled in (True, False):
        if not compiled and args.no_eager:
            continue
        tag = "fused" if compiled else "eager"
        cases[f"nearest ({tag})"] = lambda c=compiled: quantize_fp(x, fmt, compile=c)
        cases[f"stochastic ({tag})"] = lambda c=compiled: quantize_fp(
            x, fmt, "stochastic", generator=g, compile=c)
        # with the metric / non-finite counts of the hot path reduced in the same pass
        cases[f"nearest+counts ({tag})"] = lambda c=compiled: quantize_fp(
            x, fmt, compile=c, counts=True)
        # the current amax scale found in the same call (a reduction pass, then the rounding)
        cases[f"amax+nearest ({tag})"] = lambda c=compiled: quantize_fp_amax(x, fmt, compile=c)
    static = dict(prepare(x, fmt, "nearest", None, None).static)
    if static["fast"]:
        # the integer (bit-pattern) rounding that nearest used before its float path: the
        # same bits (benchmarks/rounding_exactness.py), the previous speed
        static.update(fast=False, overflow_inf=False)
        integer = variant(_quantize_flat, "quantize_fp", count=(), **static)
        cases["nearest, integer path"] = lambda: integer(
            x, *prepare(x, fmt, "nearest", None, None).tensors, compile=True)
    try:
        from qtorch.quant import float_quantize

        e, m = fmt.exp_bits, fmt.man_bits
        cases["qtorch nearest"] = lambda: float_quantize(x, e, m, rounding="nearest")
        cases["qtorch stochastic"] = lambda: float_quantize(x, e, m, rounding="stochastic")
    except ImportError:
        print("qtorch not importable: skipped (optional reference)")
    results = {name: time_call(fn, args.repeat, device) for name, fn in cases.items()}
    faults = {name: _faults_of(fn) for name, fn in cases.items()}
    ref, roof = results["clone"][0], results["copy into a kept buffer"][0]
    print(f"{args.n} float32 on {device}, format {fmt.name}, threads {torch.get_num_threads()}")
    print(f"{'case':<26s} {'min ms':>9s} {'median ms':>10s} {'x clone':>8s} {'x kept copy':>12s} "
          f"{'page faults':>12s}")
    for name, (tmin, tmed) in results.items():
        print(f"{name:<26s} {tmin * 1e3:9.2f} {tmed * 1e3:10.2f} {tmin / ref:8.2f} "
              f"{tmin / roof:12.2f} {faults[name]:12d}")
    return 0


def _faults_of(fn) -> int:
    """Minor page faults of one call of ``fn`` (0 where ``resource`` is missing)."""
    if resource is None:
        return 0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


if __name__ == "__main__":
    raise SystemExit(main())
