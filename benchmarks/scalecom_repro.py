"""ScaleCom on a real model: ResNet-20 / Fashion-MNIST with DDP and FSDP, 2 and 4 gloo workers.

    python benchmarks/scalecom_repro.py [--workers 2,4] [--modes ddp,fsdp]
        [--methods allreduce,scalecom,topk] [--ratio 0.01] [--beta 0.1] [--warmup-steps 200]
        [--epochs 10] [--batch 128] [--lr 0.1] [--max-train N] [--max-test N]

ScaleCom (Chen et al. 2020) claims 65-400x gradient compression without significant accuracy
loss, using cyclic local top-k with a low-pass filtered error feedback (``--beta``; 1 = plain
error feedback) and an uncompressed warm-up (``--warmup-steps``: steps of dense all-reduce /
reduce-scatter before compressing). Every (mode, workers, method) trains the same model from
the same initialisation on the same data: the training set is split across the workers
(rank r takes samples r, r + n, ...), the global batch ``--batch`` is divided evenly between
them, the order of each epoch is drawn from (seed, epoch), SGD with momentum 0.9, weight decay
5e-4 and a cosine learning rate. Printed: a markdown table of final test accuracy, last-epoch
mean training loss, compression ratio from the bytes actually sent, and wall time.

Long runs (the headline) take hours on CPUs; ``--epochs 1 --max-train 512 --max-test 256``
checks that everything runs.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcomp.apps.data import load_dataset
from gradcomp.apps.models import build_model
from gradcomp.integration import ddp_hooks as H
from gradcomp.integration import fsdp as F


def _options(args, method) -> dict:
    if method == "allreduce":
        return {}
    opts = {"ratio": args.ratio}
    if method == "scalecom":
        opts["beta"] = args.beta
    return opts


def _worker(rank, world, port, args, mode, method, out):
    torch.set_num_threads(max(1, args.threads))
    os.environ["GRADCOMP_COMPILE"] = "0"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        data = load_dataset(args.dataset, max_train=args.max_train, val_fraction=0.0)
        xs, ys = data.train.x[rank::world], data.train.y[rank::world]
        xt, yt = data.test.x[: args.max_test], data.test.y[: args.max_test]
        torch.manual_seed(args.seed)
        model = build_model(args.model, in_channels=data.in_channels,
                            num_classes=data.num_classes, image_size=data.image_size)
        opts = _options(args, method)
        if mode == "fsdp":
            if method != "allreduce":
                opts["start_iter"] = args.warmup_steps
            groups = ["stem", "stages.0", "stages.1", "stages.2", "fc"]
            net, comm = F.setup_fsdp(model, method, opts, seed=args.seed, groups=groups)
            metrics = comm.metrics
        else:
            if method != "allreduce":
                opts["start_iter"] = max(2, args.warmup_steps)  # DDP rebuilds buckets first
            net = DDP(model)
            state, hook = H.make_comm_hook(method, seed=args.seed, **opts) \
                if method != "allreduce" else H.make_comm_hook("allreduce")
            net.register_comm_hook(state, hook)
            metrics = state.metrics
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        per_rank = args.batch // world
        steps_per_epoch = len(ys) // per_rank
        total = steps_per_epoch * args.epochs
        t0, step, losses = time.perf_counter(), 0, []
        for epoch in range(args.epochs):
            perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(
                args.seed * 1000 + epoch))
            losses = []
            net.train()
            for i in range(steps_per_epoch):
                for g in opt.param_groups:  # cosine schedule over the whole run
                    g["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * step / total))
                idx = perm[i * per_rank:(i + 1) * per_rank]
                loss = torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(xt[i:i + 256]).argmax(1) == yt[i:i + 256]).sum())
                          for i in range(0, len(yt), 256))
        row = {"mode": mode, "workers": world, "method": method, "acc": correct / len(yt),
               "loss": sum(losses) / max(1, len(losses)),
               "ratio": metrics()["compression_ratio"], "time": time.perf_counter() - t0,
               "steps": step}
        if rank == 0:
            torch.save(row, out)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="2,4")
    p.add_argument("--modes", default="ddp,fsdp")
    p.add_argument("--methods", default="allreduce,scalecom,topk")
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--beta", type=float, default=0.1, help="ScaleCom's low-pass filter")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mode in args.modes.split(","):
            for world in (int(w) for w in args.workers.split(",")):
                for method in args.methods.split(","):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", 0))
                        port = s.getsockname()[1]
                    out = os.path.join(d, "row.pt")
                    mp.spawn(_worker, args=(world, port, args, mode, method, out),
                             nprocs=world, join=True)
                    rows.append(torch.load(out, weights_only=False))
                    print(rows[-1], flush=True)
    print(f"\n{args.model} / {args.dataset}, {args.epochs} epochs, global batch {args.batch}, "
          f"ratio {args.ratio}, beta {args.beta}, warm-up {args.warmup_steps} steps\n")
    print("| mode | workers | method | test acc | last-epoch loss | compression | time (s) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['method']} | {r['acc']:.4f} | "
              f"{r['loss']:.3f} | {r['ratio']:.1f}x | {r['time']:.0f} |")


if __name__ == "__main__":
    main()
