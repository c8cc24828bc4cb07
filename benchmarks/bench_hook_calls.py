"""Work per layer call of the compression hook: Python calls and top-level aten ops.

Inside the backward, a layer's hook runs with cold caches (the layer backward before it streams
far more data than the caches hold), so each Python call and small device op of the hook costs
microseconds; this script counts them for one layer's call in the middle of a step (the step's
hash keys already drawn), deterministically, so that two versions compare without timing noise
(run it with ``PYTHONPATH`` on an older checkout's ``src``):

    python benchmarks/bench_hook_calls.py --recipes fp6,prune-0.8,prune-0.8-fp6
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
import torch.profiler as tp
from torch import nn

import gradcomp.integration.wrap as wrap
from gradcomp.apps.models import build_model
from gradcomp.apps.recipes import get_recipe


def count(recipe: str) -> tuple[int, int]:
    """(Python + C calls, top-level aten ops) of one layer's compression call."""
    torch.manual_seed(0)
    model = build_model("resnet8", width=16)
    handle = wrap.compress_gradients(model, get_recipe(recipe).compression)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x0, y0 = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for _ in range(3):  # past the statistics step: compression is on
        loss = nn.functional.cross_entropy(model(x0), y0)
        opt.zero_grad()
        loss.backward()
        handle.step(opt)
    layer, other = handle._layers[0], handle._layers[1]
    # the first layer's own output gradient at the warm-up batch (32 x 16 x 28 x 28, 401408
    # values): the shape its kernels were compiled for, large enough for the CPU's 2-D
    # counter layout (``random.counter_layout``), as the layers of a training step
    g = torch.randn(32, 16, 28, 28) * 1e-3
    with torch.no_grad():
        for _ in range(3):
            layer.compress(g)  # compiled and cached
        handle.streams.set_step(100)
        other.compress(g)  # the step's first draw
        with tp.profile() as prof:
            layer.compress(g)
        handle.streams.set_step(101)
        other.compress(g)
        calls = [0]

        def tracer(frame, event, arg):
            if event in ("call", "c_call"):
                calls[0] += 1

        sys.setprofile(tracer)
        try:
            layer.compress(g)
        finally:
            sys.setprofile(None)
    ops = collections.Counter(e.name for e in prof.events()
                              if e.name.startswith("aten::") and e.cpu_parent is None)
    handle.remove()
    return calls[0] - 1, sum(ops.values())  # less the setprofile(None) call itself


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="fp6,fp4,prune-0.8,prune-0.8-fp6,mxfp4")
    args = ap.parse_args()
    print("| recipe | Python + C calls per layer call | top-level aten ops |")
    print("|---|---:|---:|")
    for name in args.recipes.split(","):
        calls, ops = count(name)
        print(f"| {name} | {calls} | {ops} |")


if __name__ == "__main__":
    main()
