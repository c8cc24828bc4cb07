"""``gradcomp analyze``: are the neural gradients of a real model lognormal? (paper section 3)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from gradcomp.apps.commands._common import add_data_args
from gradcomp.apps.tables import format_table, to_json, write_json

DEFAULT_OUT = "runs/analyze"


def add_parser(sub):
    p = sub.add_parser(
        "analyze",
        help="train briefly, capture neural gradients, fit lognormal, KS tests, Q-Q plots",
        description="Train briefly, capture the neural gradients dL/dA of every Conv/Linear layer "
        "at several points of training, and test them against normal, lognormal and other "
        "distributions (paper Table 1, Fig. 2).",
    )
    add_data_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    g.add_argument("--epochs", type=float, default=None, help="training epochs instead of steps")
    p.add_argument("--points", type=int, default=4, help="capture points over training (default 4)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 0.05 SGD; 3e-3 AdamW for gpt/bert models)")
    p.add_argument("--context", type=int, default=None,
                   help="text datasets: bytes per sequence (default 64)")
    p.add_argument("--width", type=int, default=None, help="model base width")
    p.add_argument("--max-train", type=int, default=None, help="use at most this many train images")
    p.add_argument("--sample-size", type=int, default=100_000,
                   help="values kept per captured tensor (default 100000)")
    p.add_argument("--ks-sample", type=int, default=30_000, help="values per KS test (30000)")
    p.add_argument("--batchnorm", action="store_true", help="also capture BatchNorm outputs")
    p.add_argument("--contrast", action="store_true",
                   help="also analyse weights, activations and weight gradients (Fig. A.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _steps(args, data_len: int | None = None) -> int:
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        return args.steps
    if args.epochs is not None:
        if args.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {args.epochs}")
        return max(1, int(args.epochs * data_len // args.batch_size))
    return 300


def run(args: argparse.Namespace) -> int:
    from gradcomp.apps.analysis import (
        analyze_records,
        plot_distributions,
        plot_sigma_over_training,
        sigma_spread,
        split_head,
        summarize,
    )
    from gradcomp.apps.data import is_text_dataset, load_dataset
    from gradcomp.apps.experiments import default_capture_steps, train_and_capture
    from gradcomp.numerics.goodness import DISTRIBUTIONS

    # the sequence models train with AdamW (SGD at these step counts barely moves them)
    transformer = args.model.startswith(("gpt", "bert"))
    data_len = None
    if args.epochs is not None:
        opts = {} if args.context is None else {"context": args.context}
        data_len = len(load_dataset(args.dataset, args.data_dir, max_train=args.max_train,
                                    **opts).train.y)
    steps = _steps(args, data_len)
    kinds = ("neural", "activation", "weight", "weight_grad") if args.contrast else ("neural",)
    run_ = train_and_capture(
        args.model, args.dataset, steps=steps,
        capture_steps=default_capture_steps(steps, args.points), sample_size=args.sample_size,
        kinds=kinds, include_batchnorm=args.batchnorm, batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else (3e-3 if transformer else 0.05),
        optimizer="adamw" if transformer else "sgd", seed=args.seed, device=args.device,
        data_dir=args.data_dir, max_train=args.max_train, width=args.width,
        progress=not (args.quiet or args.json), context=args.context,
        max_test=1024 if is_text_dataset(args.dataset) else None,
    )
    dists = tuple(DISTRIBUTIONS)
    rows = analyze_records(run_.records, dists, ks_sample=args.ks_sample, seed=args.seed)
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in kinds}
    # the output layer's neural gradient (softmax - onehot) is summarised on its own
    head_rows = split_head(by_kind["neural"])[1]
    summaries = {k: summarize(split_head(v)[0], dists) for k, v in by_kind.items()}
    spread = sigma_spread(split_head(by_kind["neural"])[0])
    result = {
        "model": args.model, "dataset": args.dataset, "steps": steps,
        "capture_steps": run_.capture_steps, "test_accuracy": run_.test_accuracy,
        "val_loss": run_.val_loss, "val_accuracy": run_.val_accuracy,
        "val_perplexity": run_.val_perplexity,
        "train_seconds": run_.seconds, "summary": summaries,
        "summary_head": summarize(head_rows, dists) if head_rows else None,
        "sigma_spread": spread, "layers": rows,
    }
    out = Path(args.out)
    figures = []
    if not args.no_plots:
        neural = [r for r in run_.records if r.kind == "neural"]
        figures += plot_distributions(neural, out, seed=args.seed)
        figures.append(plot_sigma_over_training(by_kind["neural"], out))
    result["figures"] = [str(f) for f in figures]
    write_json(out / "analyze.json", result)
    if args.json:
        print(to_json(result))
        return 0

    last = max(run_.capture_steps)
    short = {"normal": "D norm", "lognormal": "D logn", "laplace": "D lapl", "uniform": "D unif",
             "cauchy": "D cauch", "logistic": "D logis", "loglaplace": "D loglap"}
    if math.isfinite(run_.val_perplexity):
        metric = f"validation perplexity {run_.val_perplexity:.3f}"
    elif math.isfinite(run_.val_accuracy):
        metric = f"validation accuracy {100 * run_.val_accuracy:.2f}%"
    else:
        metric = f"test accuracy {100 * run_.test_accuracy:.2f}%"
    print(f"\n{args.model} on {args.dataset}: {steps} steps, {metric}, captures at steps "
          f"{run_.capture_steps}")
    print(f"\nNeural gradients dL/dA per layer at step {last} (fit on finite non-zeros):\n")
    headers = ["layer", "shape", "mu", "sigma", "zeros", *[short[d] for d in dists], "best"]
    table = [
        [r["layer"], "x".join(map(str, r["shape"])), r["mu"], r["sigma"], r["zero_fraction"],
         *[r["D"][d] for d in dists], r["best"] or "-"]
        for r in by_kind["neural"] if r["step"] == last
    ]
    print(format_table(headers, table, ".3f"))
    head_note = (f" (output layer {', '.join(sorted({r['layer'] for r in head_rows}))} left "
                 "out: its gradient is softmax - onehot; summarised below)") if head_rows else ""
    for kind, summ in summaries.items():
        n_rows = len(split_head(by_kind[kind])[0])
        print(f"\nTable-1 summary, {kind} ({n_rows} tensors = layers x capture points"
              f"{head_note if kind == 'neural' else ''}): KS D, mean +- std; best = how often "
              "the family fits best\n")
        print(format_table(
            ["distribution", "D mean", "D std", "best"],
            [[d, s["mean"], s["std"], f"{s['best_count']}/{n_rows}"] for d, s in summ.items()],
            ".3f",
        ))
    if head_rows:
        hs = result["summary_head"]
        print(f"\nOutput layer (softmax - onehot), {len(head_rows)} tensors: KS D mean +- std\n")
        print(format_table(["distribution", "D mean", "D std", "best"],
                           [[d, s["mean"], s["std"], f"{s['best_count']}/{len(head_rows)}"]
                            for d, s in hs.items()], ".3f"))
    if spread:
        print(f"\nPer-layer spread of ln|g| over the {spread[0]['layers']} layers (Fig. A.5), "
              f"and the share of |g| inside an FP4 1-3-0 range ({spread[0]['octaves']:g} "
              "octaves) under the fitted lognormal: per-layer scale vs one global scale\n")
        print(format_table(
            ["step", "sigma min", "sigma max", "mu spread (oct)", "in range per-layer",
             "in range global (mean)", "global worst", "worst layer"],
            [[s["step"], s["sigma_min"], s["sigma_max"], s["mu_spread_octaves"],
              s["in_range_per_layer_mean"], s["in_range_global_mean"],
              s["in_range_global_worst"], s["global_worst_layer"]] for s in spread],
            ".3f"))
    ln = summaries["neural"]["lognormal"]["mean"]
    nm = summaries["neural"]["normal"]["mean"]
    if math.isfinite(ln) and math.isfinite(nm):
        print(f"\nlognormal D {ln:.3f} vs normal D {nm:.3f} on neural gradients")
    print(f"\nwrote {out / 'analyze.json'}" + "".join(f", {f}" for f in figures))
    return 0
