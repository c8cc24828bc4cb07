"""Every FSDP ``--comm`` method next to uncompressed FSDP and DDP: final loss and accuracy.

    python benchmarks/fsdp_accuracy.py [--workers 2,4] [--epochs 4] [--model mlp]
                                       [--dataset digits] [--json runs/fsdp_accuracy.json]

For each worker count, the same ``gradcomp train`` command (the CLI, as a subprocess: same seed,
same data, same initial weights) runs with DDP (``--comm allreduce``, no FSDP) and with
``--fsdp --comm METHOD`` for every FSDP method (default options; ``block`` with MXFP8, its
default, MXFP4 and NVFP4). Printed: a markdown table of the final test accuracy, the last
epoch's mean training loss and the whole run's compression ratio from the bytes actually sent
(``comm_ratio_cumulative`` of ``metrics.json``), and the wall time of each run. One thread per
process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [
    ("DDP, uncompressed", ["--comm", "allreduce"]),
    ("FSDP, uncompressed", ["--fsdp", "--comm", "allreduce"]),
    ("FSDP fp8", ["--fsdp", "--comm", "fp8"]),
    ("FSDP block MXFP8", ["--fsdp", "--comm", "block"]),
    ("FSDP block MXFP4", ["--fsdp", "--comm", "block", "--comm-options", '{"fmt": "mxfp4"}']),
    ("FSDP block NVFP4", ["--fsdp", "--comm", "block", "--comm-options", '{"fmt": "nvfp4"}']),
    ("FSDP qsgd", ["--fsdp", "--comm", "qsgd"]),
    ("FSDP prune", ["--fsdp", "--comm", "prune"]),
    ("FSDP fp", ["--fsdp", "--comm", "fp"]),
    ("FSDP topk", ["--fsdp", "--comm", "topk"]),
    ("FSDP scalecom", ["--fsdp", "--comm", "scalecom"]),
]


def _run(args, world: int, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "gradcomp.apps.cli", "train", "--recipe", "baseline",
           "--model", args.model, "--dataset", args.dataset, "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", "0",
           "--nproc", str(world), "--out", str(out), "--quiet", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}"
                         f"{proc.stderr}")
    last = json.loads((out / "metrics.json").read_text())["history"][-1]
    return {"acc": last["test_accuracy"], "loss": last["train_loss"],
            "ratio": last.get("comm_ratio_cumulative", float("nan")),
            "time": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="2,4")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for world in (int(w) for w in args.workers.split(",")):
            for label, extra in RUNS:
                r = _run(args, world, extra, Path(d) / f"{world}-{len(rows)}")
                rows.append({"workers": world, "method": label, **r})
                print(rows[-1], flush=True)
    print(f"\n{args.model} / {args.dataset}, {args.epochs} epochs, batch {args.batch_size} per "
          f"worker, seed 0\n")
    print("| workers | method | test acc | last-epoch loss | compression | time (s) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['method']} | {100 * r['acc']:.2f}% | {r['loss']:.4f} | "
              f"{r['ratio']:.1f}x | {r['time']:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
