"""Training-step overhead of each recipe (ratio to the uncompressed step).

Same model, same batch, same thread count: the median time of a full training step (forward,
backward with compression, optimizer step) for each recipe against the uncompressed baseline
measured in the same run, interleaved (one block of steps per recipe per round) so that machine
load hits every recipe alike. Each recipe is installed as ``train`` installs it: forward
quantization (``quantize_forward``: PACT/SAWB or block formats), per-GEMM backward quantization
(``quantize_backward``) and neural-gradient compression (``compress_gradients``).
Targets on the CPU: FP quantization with per-layer scaling <= 15% overhead, stochastic pruning
with statistics <= 20%. Per-GEMM FP4 recipes emulate their formats in float32 (no FP4 GEMM), so
their overhead measures the emulation, not what FP4 hardware would run.

    python benchmarks/bench_train_step.py [--model resnet8 --width 16 --batch 128 --steps 30]
    python benchmarks/bench_train_step.py --model gpt-tiny --batch 16 \
        --recipes fp4,luq-fp4,nvfp4-recipe,quartet-mxfp4,fp4-all-the-way,mxfp8,mxfp4,nvfp4

Image models get 1x28x28 inputs and 10 classes; the sequence models (gpt*, bert*) get random
byte tokens (vocabulary 256) of ``--context`` tokens (default: the model's context).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradcomp.apps.models import build_model
from gradcomp.apps.recipes import get_recipe
from gradcomp.integration.forward import quantize_forward
from gradcomp.integration.gemm import quantize_backward
from gradcomp.integration.wrap import compress_gradients

VOCAB = 256


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
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--recipes", default="baseline,fp6,fp4,fp6-optscale,prune-0.8,prune-0.85-het,"
                    "prune-0.8-emp,atp-0.8,prune-0.8-fp6",
                    help="comma-separated recipe names; 'baseline' is always measured too")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
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

    def step(model, opt, handle, fwd):
        out = model(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        if fwd is not None:
            loss = loss + fwd.alpha_regularization()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if handle is not None:
            handle.step(opt)
        else:
            opt.step()

    for s in setups.values():  # warm-up: statistics step, compilation of fused kernels
        for _ in range(3):
            step(*s)
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for name, s in setups.items():
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                step(*s)
                sync()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["baseline"])
    width = f"width {args.width}, " if args.width else ""
    print(f"{args.model} {width}batch {args.batch}, {dev}, {torch.get_num_threads()} threads, "
          f"{args.rounds}x{args.steps} steps per recipe (median)\n")
    print("| recipe | step ms | ratio to baseline | overhead |")
    print("|---|---:|---:|---:|")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} | {1000 * med:.1f} | {med / base:.2f} | {100 * (med / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
