"""Compression time per training step: the summed wall time of the compression hooks.

``bench_train_step.py`` times whole steps, whose noise on a shared machine can exceed the
compression's cost; this script times only what the wrapper's hooks spend inside the backward
pass (every selected layer's statistics, pruning and quantization), per step, and prints the
median and minimum over ``--steps`` steps after ``--warmup`` steps (past the first metric step,
so no compilation falls in the window). It wraps the hook of ``compress_gradients`` from the
outside, so the same script times an earlier version too (run it with ``PYTHONPATH`` set to
that version's ``src``):

    python benchmarks/bench_hook_time.py --recipes fp6,fp6-optscale,prune-0.8,prune-0.8-fp6
    PYTHONPATH=/path/to/older/checkout/src python benchmarks/bench_hook_time.py ...

``--in-place alternate`` times this version's in-place write against a new tensor per layer in
alternate steps of one process; ``--calls wrapped`` sends the compiled kernels' direct calls
through AOT autograd's runtime wrappers again (compare with the default in alternating
processes). The wrapper measures ``_Layer.compress``: the hook's ownership check before it (a
few microseconds per layer) is not in the figures. ``--per-layer`` also prints each layer's
call with its gradient's size (the fixed cost of a call inside the backward is the intercept
of call time against size):

    python benchmarks/bench_hook_time.py --model resnet20 --recipes fp6 --per-layer
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gradcomp.integration.wrap as wrap
from gradcomp.apps.models import build_model
from gradcomp.apps.recipes import get_recipe
from gradcomp.apps.runtime import MALLOC_POLICIES, apply_malloc_policy


def measure(recipe: str, model_name: str, width: int, batch: int, warmup: int, steps: int,
            in_place: str = "on", per_layer: dict | None = None):
    """{mode: (median, min) seconds per step spent in the compression hooks, and the step
    median}; ``in_place``: "on" (the wrapper's own choice), "off" (every layer writes a new
    tensor) or "alternate" (the two in alternate steps of one process: both modes).
    ``per_layer``: filled with {(layer name, gradient elements): [seconds of each timed call]}."""
    spent = [0.0]
    timing = [False]  # past the warm-up: calls are recorded per layer
    allow = [in_place != "off"]
    # ``_Layer.compress``, which the hook calls after its in-place check (``_Layer.grad``,
    # three reference counts, a few us per call, outside the timing: a wrapper around the hook
    # itself would hold a reference to the gradient and so turn the in-place write off)
    layer_compress = wrap._Layer.compress

    def timed(self, g, *rest):  # rest: the in-place permission where the version has one
        rest = tuple(bool(r) and allow[0] for r in rest)
        t0 = time.perf_counter()
        out = layer_compress(self, g, *rest)
        dt = time.perf_counter() - t0
        spent[0] += dt
        if per_layer is not None and timing[0]:
            per_layer.setdefault((self.name, g.numel()), []).append(dt)
        return out

    wrap._Layer.compress = timed
    modes = ("on", "off") if in_place == "alternate" else (in_place,)
    hooks: dict = {m: [] for m in modes}
    whole: dict = {m: [] for m in modes}
    try:
        torch.manual_seed(0)
        model = build_model(model_name, width=width)
        handle = wrap.compress_gradients(model, get_recipe(recipe).compression)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 1, 28, 28)
        y = torch.randint(0, 10, (batch,))

        def step():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            handle.step(opt)

        for _ in range(warmup):
            step()
        timing[0] = True
        for i in range(steps * len(modes)):
            mode = modes[i % len(modes)]
            allow[0] = mode == "on"
            spent[0] = 0.0
            t0 = time.perf_counter()
            step()
            whole[mode].append(time.perf_counter() - t0)
            hooks[mode].append(spent[0])
        handle.remove()
    finally:
        wrap._Layer.compress = layer_compress
    return {m: (statistics.median(hooks[m]), min(hooks[m]), statistics.median(whole[m]))
            for m in modes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="fp6,fp6-optscale,prune-0.8,prune-0.8-fp6")
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--in-place", default="on", choices=("on", "off", "alternate"),
                    help="on: the wrapper writes a compressed gradient into its own memory "
                         "where autograd alone holds it; off: never; alternate: both, in "
                         "alternate steps of one process (the same compiled kernels)")
    ap.add_argument("--calls", default="generated", choices=("generated", "wrapped"),
                    help="generated: the compiled kernels' direct calls run inductor's "
                         "generated code; wrapped: through AOT autograd's runtime wrappers "
                         "(as before this version; compare in separate processes)")
    ap.add_argument("--malloc", default="retain", choices=MALLOC_POLICIES,
                    help="retain: glibc keeps freed memory (gradcomp train's default)")
    ap.add_argument("--per-layer", action="store_true",
                    help="also print each layer's call (median and minimum over the timed "
                         "steps) with its gradient's size: a call's fixed cost is the intercept "
                         "of time against size")
    args = ap.parse_args()
    apply_malloc_policy(args.malloc)
    if args.calls == "wrapped":
        from gradcomp.numerics import kernels
        kernels._generated_graph = lambda compiled: None
    torch.set_num_threads(args.threads)
    print(f"{args.model} width {args.width}, batch {args.batch}, {args.threads} threads, "
          f"{args.steps} steps after {args.warmup}, in place {args.in_place}, calls "
          f"{args.calls}, malloc {args.malloc}; gradcomp from {wrap.__file__}\n")
    print("| recipe | in place | compression per step (median) | min | step (median) |")
    print("|---|---|---:|---:|---:|")
    layers = {}
    for name in args.recipes.split(","):
        layers[name] = {} if args.per_layer else None
        res = measure(name, args.model, args.width, args.batch, args.warmup, args.steps,
                      args.in_place, layers[name])
        for mode, (med, low, step) in res.items():
            print(f"| {name} | {mode} | {med * 1e3:.2f} ms | {low * 1e3:.2f} ms | "
                  f"{step * 1e3:.1f} ms |")
    if args.per_layer:  # every mode's calls together (``--in-place alternate``: both)
        print("\n| recipe | layer | elements | call (median) | min |")
        print("|---|---|---:|---:|---:|")
        for name, calls in layers.items():
            for (layer, n), times in calls.items():
                print(f"| {name} | {layer} | {n} | {statistics.median(times) * 1e3:.3f} ms | "
                      f"{min(times) * 1e3:.3f} ms |")


if __name__ == "__main__":
    main()
