"""Training-step overhead of compressed neural gradients (ratio to the uncompressed step).

Same model, same batch, same thread count: the median time of a full training step (forward,
backward with compression, optimizer step) for each recipe against the uncompressed baseline
measured in the same run, interleaved so that machine load hits every recipe alike.
Targets on the CPU: FP quantization with per-layer scaling <= 15% overhead, stochastic pruning
with statistics <= 20%.

    python benchmarks/bench_train_step.py [--model resnet8 --width 16 --batch 128 --steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradcomp.apps.models import build_model
from gradcomp.apps.recipes import get_recipe
from gradcomp.integration.wrap import compress_gradients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--recipes", default="baseline,fp6,fp4,fp6-optscale,prune-0.8,prune-0.85-het,"
                    "prune-0.8-emp,atp-0.8,prune-0.8-fp6")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.recipes.split(",")
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(args.batch, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    setups = {}
    for name in names:
        torch.manual_seed(0)
        model = build_model(args.model, width=args.width).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        comp = get_recipe(name).compression
        handle = compress_gradients(model, comp) if comp is not None else None
        setups[name] = (model, opt, handle)

    def step(model, opt, handle):
        loss = nn.functional.cross_entropy(model(x), y)
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
    base = statistics.median(times["baseline"]) if "baseline" in times else None
    print(f"{args.model} width {args.width}, batch {args.batch}, {dev}, "
          f"{torch.get_num_threads()} threads, {args.rounds}x{args.steps} steps per recipe "
          "(median)\n")
    print("| recipe | step ms | overhead vs baseline |")
    print("|---|---:|---:|")
    for name in names:
        med = statistics.median(times[name])
        ov = f"{100 * (med / base - 1):+.1f}%" if base else "-"
        print(f"| {name} | {1000 * med:.1f} | {ov} |")


if __name__ == "__main__":
    main()
