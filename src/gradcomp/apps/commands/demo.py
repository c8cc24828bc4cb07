"""``gradcomp demo``: the main job. Trains a small ResNet on Fashion-MNIST with the paper's
methods side by side and prints one table with the paper's predictions beside the measurements."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from gradcomp.apps.commands._common import add_data_args
from gradcomp.apps.tables import format_table, write_json

DEFAULT_OUT = "runs/demo"

# (recipe, what the paper predicts, in words, with the paper's figure)
DEMO = [
    ("baseline", "reference"),
    ("fp6", "= baseline (Tab. 3, ResNet18 C100: 64.9 vs 64.9)"),
    ("fp6-e-1", "worse than E* (Tab. 3: 59.7 vs 64.9)"),
    ("fp4", "per-layer scaling: small loss (Tab. 4: 64.8 vs 70.4)"),
    ("fp4-dynamic", "global dynamic scaling: far worse (Tab. 4: 3.0)"),
    ("prune-0.8", "Eq. 8: 80% at no loss (Sec. 5)"),
    ("prune-0.8-emp", "(ours) exact 80%, no loss expected"),
    ("prune-0.85-het-emp", "85% heterogeneous at no loss (Sec. 5.3)"),
    ("atp-0.8", "ATP misses its 80% target (Fig. 5 right)"),
]
EXTENDED = [
    ("fp6-e-2", "much worse (Tab. 3: 28.6)"),
    ("fp6-e+1", "about E* (Tab. 3: 64.6)"),
    ("topks-0.8", "top-k then stochastic misses target (Fig. 5)"),
    ("w4a4", "INT4 W/A: small loss"),
    ("w4a4-fp4", "W4A4 + FP4 grads: ~0.3% loss (paper Sec. 6)"),
    ("w4a4-fp6", "W4A4 + FP6 grads: small loss"),
]


def add_parser(sub):
    p = sub.add_parser(
        "demo",
        help="the main job: baseline vs FP6/FP4 gradients vs stochastic pruning on Fashion-MNIST",
        description="Train a small ResNet on Fashion-MNIST with the baseline, FP6 at E* and E*-1, "
        "FP4 with per-layer vs dynamic global loss scaling, stochastic pruning (80%% "
        "homogeneous, 85%% heterogeneous) and ATP at 80%%; print one table and write a "
        "report (markdown + PNG). About 10 minutes on 2 CPU cores; --quick in about a minute.",
    )
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test, about a minute)")
    p.add_argument("--extended", action="store_true",
                   help="also E*-2, E*+1, top-k-then-stochastic, W4A4 (+FP4/FP6 gradients)")
    p.add_argument("--recipes", default=None, help="comma-separated recipes instead of the list")
    add_data_args(p, model="resnet8")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train", type=int, default=20000,
                   help="training images used (default 20000 of 54000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--quiet", action="store_true")
    return p


def _plan(args) -> list[tuple[str, str]]:
    known = dict(DEMO + EXTENDED)
    if args.recipes:
        names = [r.strip() for r in args.recipes.split(",") if r.strip()]
        return [(n, known.get(n, "")) for n in names]
    return DEMO + (EXTENDED if args.extended else [])


def run(args: argparse.Namespace) -> int:
    from gradcomp.apps.recipes import get_recipe
    from gradcomp.apps.train import TrainConfig, train

    plan = _plan(args)
    for name, _ in plan:
        get_recipe(name)  # fail fast on a typo
    if args.quick:
        args.max_train, args.epochs, args.width, max_test = 1024, 1, 8, 1000
    else:
        max_test = None
    out = Path(args.out)
    results = {}
    t0 = time.perf_counter()
    for i, (name, _) in enumerate(plan):
        if not args.quiet:
            print(f"[{i + 1}/{len(plan)}] {name}", flush=True)
        cfg = TrainConfig(
            recipe=name, model=args.model, dataset=args.dataset, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
            out=str(out / name), data_dir=args.data_dir, max_train=args.max_train,
            width=args.width, progress=not args.quiet, max_test=max_test,
        )
        results[name] = train(cfg)
    total = time.perf_counter() - t0

    base = results.get("baseline")
    rows, data = [], []
    for name, prediction in plan:
        r = results[name]
        last = r.history[-1]
        delta = 100 * (r.test_accuracy - base.test_accuracy) if base else math.nan
        overhead = (r.step_seconds / base.step_seconds - 1) * 100 if base else math.nan
        fmt = last.get("format", "")
        rows.append([
            name + (f" ({fmt})" if fmt else ""), 100 * r.test_accuracy, delta,
            last.get("sparsity", 0.0), last.get("bits_per_element", 32.0), overhead, prediction,
        ])
        data.append({"recipe": name, "format": fmt, "test_accuracy": r.test_accuracy,
                     "delta_pp": delta, "sparsity": last.get("sparsity"),
                     "bits_per_element": last.get("bits_per_element"),
                     "overflow": last.get("overflow"), "underflow": last.get("underflow"),
                     "step_seconds": r.step_seconds, "step_overhead_pct": overhead,
                     "prediction": prediction, "history": r.history})
    headers = ["recipe", "test acc %", "delta pp", "sparsity", "bits/elem", "step overhead %",
               "paper predicts"]
    table = format_table(headers, rows, ".2f")
    setup = (f"{args.model} (width {args.width}) on {args.dataset}, {args.epochs} epoch(s), "
             f"{args.max_train} training images, batch {args.batch_size}, SGD lr {args.lr} cosine, "
             f"seed {args.seed}; total {total:.0f} s")
    print(f"\n{setup}\n\n{table}\n")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", {"setup": setup, "rows": data})
    png = _plot(results, plan, out)
    (out / "report.md").write_text(
        f"# gradcomp demo\n\n{setup}\n\n{table}\n\n"
        "sparsity: fraction of zeros in the compressed neural gradients (last epoch); "
        "bits/elem: bits per neural-gradient element (FP width, or the entropy bound of the "
        "pruned stream); step overhead: mean training-step time vs the baseline.\n\n"
        f"![curves]({png.name})\n"
    )
    print(f"wrote {out / 'report.md'}, {png}, {out / 'demo.json'}")
    return 0


def _plot(results, plan, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, _ in plan:
        tr = np.array(results[name].loss_trace)
        if tr.size:
            k = max(1, tr.size // 50)
            sm = np.convolve(tr, np.ones(k) / k, mode="valid")
            ax1.plot(np.arange(sm.size) + k - 1, sm, label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (moving average)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    names = [n for n, _ in plan]
    accs = [100 * results[n].test_accuracy for n in names]
    ax2.barh(names, accs, color="C0")
    lo = min(accs) - 2
    ax2.set_xlim(max(0, lo), 100)
    for i, a in enumerate(accs):
        ax2.text(a, i, f" {a:.2f}", va="center", fontsize=7)
    ax2.set_xlabel("test accuracy %")
    ax2.invert_yaxis()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
