"""The per-GEMM recipes' operand transforms: randomized Hadamard transform, LUQ and NVFP4
blocks, per call.

``quantize_backward``'s NVFP4 and Quartet recipes apply a 16- / 32-element RHT to both
weight-gradient operands along dim 0 (a linear layer's (tokens, features) matrix; a conv
layer's (batch, channels, h, w) tensor, transformed along its batch), then quantize them in
blocks along the GEMM's reduction (a conv weight gradient's: batch and pixels, dims (0, 2, 3));
the LUQ recipe quantizes the neural gradient with LUQ at 4 bits. This script times those calls
on operands of a ResNet-8 layer (batch 128, 28x28: a (pixels, 64 channels) matrix and a
16-channel conv operand for the RHT and the blocks; 1.6M elements for LUQ), interleaved with
``x.clone()`` of the same tensor (the memory roofline, measured in the same run), and prints
the minimum and median per call and the minimum's ratio to the clone's. The NVFP4 rows compare
the blocks over (batch, pixels) quantized where they lie (784 pixels: each block a run of the
tensor) with the same blocks moved (the channels first, quantized, and back to the NCHW layout
that convolution_backward reads), and show the channel blocks of the dgrad operand (dims (1,),
reduced in place along the channels). Run it with ``PYTHONPATH`` on another checkout's ``src``
to compare versions (a checkout without blocks over several dims leaves the in-place row out):

    python benchmarks/bench_gemm_operands.py [--calls 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradcomp.numerics.block import BlockFormat, quantize_block
from gradcomp.numerics.hadamard import rht, rht_signs
from gradcomp.numerics.luq import luq_quantize


def _moved(conv, bf, gen):
    """NVFP4 over (batch, pixels) the way that moves: channels first, blocks along the merged
    rest, back to a contiguous NCHW tensor."""
    c = conv.shape[1]
    q = quantize_block(conv.transpose(0, 1).reshape(c, -1), bf, "stochastic", gen)
    return q.view(c, conv.shape[0], *conv.shape[2:]).transpose(0, 1).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128 * 784, 64, generator=gen)  # pixels x channels: RHT along dim 0
    g = torch.randn(128 * 16 * 28 * 28, generator=gen)  # one 16-channel layer's gradient
    conv = torch.randn(128, 16, 28, 28, generator=gen)  # a conv operand: RHT along its batch
    signs, signs32 = rht_signs(16, 3), rht_signs(32, 3)
    nv = BlockFormat.from_name("nvfp4")
    try:
        over = nv.replace(dims=(0, 2, 3))
    except TypeError:  # a checkout from before 1-D blocks over several dims
        over = None
        print("this checkout has no 1-D blocks over several dims: the in-place NVFP4 row is "
              "left out\n")
    cases = {
        "clone of the RHT operand (6.4M)": lambda: x.clone(),
        "rht, 16-element blocks along dim 0 (6.4M)": lambda: rht(x, signs, 0),
        "clone of the conv operand (1.6M)": lambda: conv.clone(),
        "rht of the conv operand, 16-element blocks along the batch": lambda: rht(conv, signs, 0),
        "rht of the conv operand, 32-element blocks along the batch":
            lambda: rht(conv, signs32, 0),
        "clone of the LUQ operand (1.6M)": lambda: g.clone(),
        "luq_quantize, 4 bits (1.6M)": lambda: luq_quantize(g, 4),
        "clone of the conv operand (1.6M), again": lambda: conv.clone(),
        "nvfp4 stochastic over (batch, pixels), in place":
            lambda: quantize_block(conv, over, "stochastic", gen),
        "nvfp4 stochastic over (batch, pixels), moved and back": lambda: _moved(conv, nv, gen),
        "nvfp4 stochastic along the channels (dgrad operand)":
            lambda: quantize_block(conv, nv.replace(dims=(1,)), "stochastic", gen),
    }
    if over is None:
        del cases["nvfp4 stochastic over (batch, pixels), in place"]
    for f in cases.values():  # compilation and warm-up
        for _ in range(3):
            f()
    times = {k: [] for k in cases}
    for _ in range(args.calls):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    print(f"float32, {torch.get_num_threads()} threads, {args.calls} interleaved calls per case\n")
    print("| call | min ms | median ms | min x clone |")
    print("|---|---:|---:|---:|")
    ref = None
    for k, v in times.items():
        if k.startswith("clone"):
            ref = min(v)
        print(f"| {k} | {1e3 * min(v):.2f} | {1e3 * statistics.median(v):.2f} | "
              f"{min(v) / ref:.2f} |")


if __name__ == "__main__":
    main()
