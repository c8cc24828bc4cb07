"""Training-step overhead of each recipe (ratio to the uncompressed step).

Same model, same batch, same thread count: the time of a full training step (forward, backward
with compression, optimizer step) for each recipe against the uncompressed baseline measured in
the same run, interleaved (a short block of steps per recipe per round, the recipes in a new
seeded order each round) so that machine load hits every recipe alike. ``copy-floor``
(measured by default) only copies each selected layer's neural gradient: what any out-of-place
compression must at least pay. The overhead is the median over rounds of (recipe's median step
/ baseline's median step in that round), with a distribution-free 95% confidence interval of
that median (order statistics: ``median_ci_ranks``); the quartiles of the per-round ratios show
the noise. The last column gives issue 13's target where one applies: met when the interval's
upper end is below it, not met when its lower end is above, else across. "Fastest steps"
compares each recipe's fastest step with the baseline's (machine noise only ever adds time, so
the minimum is the least disturbed figure, as in the kernel benchmarks). Each recipe is
installed as ``train`` installs it: forward quantization (``quantize_forward``: PACT/SAWB or
block formats), per-GEMM backward quantization (``quantize_backward``) and neural-gradient
compression (``compress_gradients``).
Targets on the CPU (issue 13): FP quantization <= 10% overhead, stochastic pruning <= 12%,
prune + FP6 <= 15%. Per-GEMM FP4 recipes emulate their formats in float32 (no FP4 GEMM), so
their overhead measures the emulation, not what FP4 hardware would run.

Memory: before building anything the script calls ``retain_freed_memory()``
(``gradcomp.apps.runtime``, as ``gradcomp train`` does): glibc then keeps freed memory for the
next allocation instead of unmapping or trimming it, so no step pays page faults for tensors the
previous step freed (``--malloc default`` leaves glibc's own policy, under which the number of
faults per step depends on the process's history). The last column counts the minor page
faults per step (``getrusage``, median of the recipe's steps; Linux and macOS).

    python benchmarks/bench_train_step.py [--model resnet8 --width 16 --batch 128 --rounds 40]
    python benchmarks/bench_train_step.py --phases --recipes nvfp4-recipe,luq-fp4  # + phases
    python benchmarks/bench_train_step.py --model gpt-tiny --batch 16 \
        --recipes fp4,luq-fp4,nvfp4-recipe,quartet-mxfp4,fp4-all-the-way,mxfp8,mxfp4,nvfp4

Image models get 1x28x28 inputs and 10 classes; the sequence models (gpt*, bert*) get random
byte tokens (vocabulary 256) of ``--context`` tokens (default: the model's context).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

try:
    import resource  # page faults per step (Unix)
except ImportError:  # pragma: no cover
    resource = None

import torch
from torch import nn

from gradcomp.apps.models import build_model
from gradcomp.apps.recipes import get_recipe
from gradcomp.apps.runtime import MALLOC_POLICIES, apply_malloc_policy
from gradcomp.integration.forward import quantize_forward
from gradcomp.integration.gemm import quantize_backward
from gradcomp.integration.wrap import compress_gradients, select_modules
from gradcomp.numerics.block import BlockFormat

VOCAB = 256
FLOOR = "copy-floor"  # a pseudo-recipe: one copy of each compressed layer's neural gradient


def _faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _inputs(args, model, dev):
    """(x, y) of one batch for the model's kind: images or byte tokens."""
    if args.model.startswith(("gpt", "bert")):
        context = args.context or (model.context - (0 if args.model.startswith("gpt") else 1))
        x = torch.randint(0, VOCAB, (args.batch, context), device=dev)
        shape = (args.batch, context) if args.model.startswith("gpt") else (args.batch,)
        return x, torch.randint(0, VOCAB, shape, device=dev)
    x = torch.randn(args.batch, 1, 28, 28, device=dev)
    return x, torch.randint(0, 10, (args.batch,), device=dev)


def _build(args, name, dev):
    torch.manual_seed(0)
    seq = args.model.startswith(("gpt", "bert"))
    kw = {"num_classes": VOCAB} if seq else {}
    if args.width:
        kw["width"] = args.width
    model = build_model(args.model, **kw).to(dev)
    if name == FLOOR:
        # the floor of any out-of-place per-layer compression: one copy of each neural
        # gradient at the layers the compression recipes select (read once, written once)
        def clone_grad(module, inputs, output):
            if output.requires_grad:
                output.register_hook(lambda g: g.clone())
        for _, module in select_modules(model, get_recipe("fp6").compression):
            module.register_forward_hook(clone_grad)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), None, None
    recipe = get_recipe(name)
    fwd = quantize_forward(model, **recipe.forward.kwargs()) if recipe.forward else None
    if recipe.backward is not None:
        quantize_backward(model, recipe.backward)
    handle = compress_gradients(model, recipe.compression) if recipe.compression else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, handle, fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--width", type=int, default=None,
                    help="base width (default: 16 for image models, the model's own otherwise)")
    ap.add_argument("--context", type=int, default=None, help="tokens per sequence (gpt/bert)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1, help="steps per recipe per round")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--recipes", default="baseline,copy-floor,fp6,fp4,fp6-optscale,prune-0.8,"
                    "prune-0.85-het,"
                    "prune-0.8-emp,atp-0.8,prune-0.8-fp6",
                    help="comma-separated recipe names; 'baseline' is always measured too")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--phases", action="store_true",
                    help="also time the step's phases (forward + loss, zero_grad + backward, "
                         "optimizer step) and print their medians per recipe (on CUDA the "
                         "synchronisation at each boundary adds to the main table's steps)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--malloc", default="retain", choices=MALLOC_POLICIES,
                    help="retain: glibc keeps freed memory for reuse (gradcomp train's default); "
                         "default: glibc's own trim / mmap policy")
    args = ap.parse_args()
    retained = apply_malloc_policy(args.malloc)
    if args.width is None and not args.model.startswith(("gpt", "bert")):
        args.width = 16
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.recipes.split(",") if n]
    if "baseline" not in names:  # the reference of every ratio, measured in the same run
        names.insert(0, "baseline")
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    setups = {name: _build(args, name, dev) for name in names}
    torch.manual_seed(0)
    x, y = _inputs(args, setups["baseline"][0], dev)

    phases = {n: [] for n in names}  # (forward + loss, backward, optimizer step) per step
    stamp = (lambda: (sync(), time.perf_counter())[1]) if args.phases else (lambda: 0.0)

    def step(model, opt, handle, fwd, record=None):
        t0 = stamp()
        out = model(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        if fwd is not None:
            loss = loss + fwd.alpha_regularization()
        t1 = stamp()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = stamp()
        if handle is not None:
            handle.step(opt)
        else:
            opt.step()
        if record is not None and args.phases:
            record.append((t1 - t0, t2 - t1, stamp() - t2))

    for s in setups.values():  # warm-up: statistics step, compilation of fused kernels
        for _ in range(3):
            step(*s)
    times = {n: [] for n in names}
    faults = {n: [] for n in names}  # minor page faults per step
    ratios = {n: [] for n in names}  # per round: this recipe's median / the baseline's
    order = random.Random(0)  # a new recipe order each round: no recipe always follows another
    for _ in range(args.rounds):
        block = {}
        for name in order.sample(names, len(names)):
            s = setups[name]
            block[name] = []
            for _ in range(args.steps):
                sync()
                f0 = _faults()
                t0 = time.perf_counter()
                step(*s, record=phases[name])
                sync()
                block[name].append(time.perf_counter() - t0)
                faults[name].append(_faults() - f0)
            times[name] += block[name]
        b = statistics.median(block["baseline"])
        for name in names:
            ratios[name].append(statistics.median(block[name]) / b)
    width = f"width {args.width}, " if args.width else ""
    print(f"{args.model} {width}batch {args.batch}, {dev}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps per recipe, interleaved; malloc "
          f"{args.malloc}{'' if retained or args.malloc == 'default' else ' (not applied)'}"
          "\n")
    print("| recipe | step ms (median) | overhead (median of rounds) | 95% CI of the median | "
          "rounds' quartiles | overhead (fastest steps) | page faults per step | target |")
    print("|---|---:|---:|---|---|---:|---:|---|")
    fastest = min(times["baseline"])
    lo_rank, hi_rank = median_ci_ranks(args.rounds)
    for name in names:
        med = statistics.median(times[name])
        r = sorted(ratios[name])
        q1, q3 = (statistics.quantiles(r, n=4)[::2] if len(r) > 1 else (r[0], r[0]))
        ci = (f"{100 * (r[lo_rank] - 1):+.1f}% .. {100 * (r[hi_rank] - 1):+.1f}%"
              if lo_rank is not None else "(too few rounds)")
        print(f"| {name} | {1000 * med:.1f} | {100 * (statistics.median(r) - 1):+.1f}% | "
              f"{ci} | {100 * (q1 - 1):+.1f}% .. {100 * (q3 - 1):+.1f}% | "
              f"{100 * (min(times[name]) / fastest - 1):+.1f}% | "
              f"{statistics.median(faults[name]):.0f} | "
              f"{_verdict(target_of(name), r, lo_rank, hi_rank)} |")
    if args.phases:  # the phases' medians over all steps (synchronised at each boundary)
        print("\n| recipe | forward + loss ms | backward ms | optimizer step ms | "
              "backward - baseline's |")
        print("|---|---:|---:|---:|---:|")
        base_bw = statistics.median(p[1] for p in phases["baseline"])
        for name in names:
            f, b, o = (statistics.median(col) for col in zip(*phases[name]))
            print(f"| {name} | {1000 * f:.1f} | {1000 * b:.1f} | {1000 * o:.2f} | "
                  f"{1000 * (b - base_bw):+.1f} |")


def target_of(name: str) -> float | None:
    """Issue 13's CPU target for a recipe's step overhead, as a fraction: FP quantization of the
    neural gradients 0.10, pruning (each threshold method; the top-k baselines too) 0.12,
    pruning then FP quantization 0.15; None for the others (block formats, per-GEMM and
    forward quantization: their table is reported, without a target)."""
    if name in ("baseline", FLOOR):
        return None
    recipe = get_recipe(name)
    c = recipe.compression
    if c is None or recipe.forward is not None or recipe.backward is not None:
        return None
    fp = c.quantize is not None and not isinstance(c.quantize.format, BlockFormat)
    if c.prune is not None:
        return 0.15 if fp else (0.12 if c.quantize is None else None)
    return 0.10 if fp else None


def _verdict(target: float | None, ratios: list, lo_rank, hi_rank) -> str:
    """``<= T%``, then ``met`` (the interval's upper end below the target), ``not met`` (its
    lower end above) or ``across`` (the interval holds the target); empty without a target."""
    if target is None:
        return ""
    head = f"<= {100 * target:.0f}%"
    if lo_rank is None:
        return f"{head}: too few rounds"
    lo, hi = ratios[lo_rank] - 1, ratios[hi_rank] - 1
    return f"{head}: " + ("met" if hi < target else "not met" if lo > target
                          else "across")


def median_ci_ranks(n: int, level: float = 0.95):
    """(lo, hi) 0-based ranks of the sorted sample that bound its median with at least
    ``level`` confidence, distribution-free: the number of rounds below the true median is
    Binomial(n, 1/2), so P(r[lo] <= median <= r[hi]) = P(lo < B <= hi) >= level for the largest
    such lo, hi = n - 1 - lo. (None, None) when n is too small for that level (n < 6 at 95%)."""
    tail = (1 - level) / 2
    cdf, lo = 0.0, None
    for k in range(n + 1):  # cdf = P(B <= k)
        cdf += math.comb(n, k) / 2**n
        if cdf > tail:
            break
        lo = k
    return (None, None) if lo is None else (lo, n - 1 - lo)


if __name__ == "__main__":
    main()
