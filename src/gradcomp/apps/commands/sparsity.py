"""``gradcomp sparsity``: required vs achieved sparsity of each threshold method (paper Fig. 5).

Captures real neural gradients (or draws synthetic lognormal ones with ``--synthetic``), prunes
every layer at every target with each threshold method through one ``Pruner`` per layer, and
reports the achieved fraction of zeros (mean and worst layer |error|) and the encoded size
(``encode_pruned``, real bytes) per method and target; writes a Fig. 5 (right)-like plot and JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gradcomp.apps.commands._common import add_data_args, parse_methods, parse_targets
from gradcomp.apps.evaluation import (
    DEFAULT_METHODS,
    DEFAULT_TARGETS,
    evaluate_sparsity,
    synthetic_layers,
)
from gradcomp.apps.tables import format_table, to_json, write_json
from gradcomp.compressors.pruning import PRUNE_METHODS

DEFAULT_OUT = "runs/sparsity"


def format_report(result: dict) -> str:
    """Plain-text tables: one row per (method, target), then one row per method."""
    rows = [[s["method"], s["target"], s["mean_achieved"], 100 * s["mean_abs_error"],
             100 * s["worst_abs_error"], s["worst_layer"], s["bits_per_element"]]
            for s in result["summary"]]
    head = ["method", "target", "achieved (mean)", "mean abs err %", "worst abs err %",
            "worst layer", "bits/elem"]
    by_method = {}
    for s in result["summary"]:
        by_method.setdefault(s["method"], []).append(s)
    rows2 = [[m, 100 * sum(s["mean_abs_error"] for s in v) / len(v),
              100 * max(s["worst_abs_error"] for s in v)] for m, v in by_method.items()]
    return (format_table(head, rows, ".4g") + "\n\n"
            + format_table(["method", "mean abs err % (all targets)", "worst abs err %"], rows2))


def plot_fig5(result: dict, path: Path) -> Path:
    """Two panels. Left: achieved vs required sparsity per method (mean over layers, band =
    min..max layer) with the "required = achieved" line drawn on top. Right: achieved minus
    required in points, where methods that lie on top of each other on the left (the lognormal,
    empirical and calibrated thresholds on lognormal data) separate; each method has its own
    marker, line style and a small horizontal offset so that none hides another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    ts = np.asarray(result["targets"], dtype=float)
    methods = list(result["methods"])
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    styles = ["-", "--", "-.", ":"]
    step = float(np.min(np.diff(ts))) if ts.size > 1 else 0.1
    for k, m in enumerate(methods):
        rows = [s for s in result["summary"] if s["method"] == m]
        mean = np.array([r["mean_achieved"] for r in rows])
        lo = np.array([r["min_achieved"] for r in rows])
        hi = np.array([r["max_achieved"] for r in rows])
        off = (k - (len(methods) - 1) / 2) * 0.08 * step
        style = dict(marker=markers[k % len(markers)], linestyle=styles[k % len(styles)],
                     markersize=8 - 0.8 * k, markerfacecolor="none", markeredgewidth=1.4,
                     lw=1.3, color=f"C{k}", label=m)
        ax.plot(ts + off, mean, **style)
        ax.fill_between(ts, lo, hi, alpha=0.10, color=f"C{k}")
        ax2.errorbar(ts + off, 100 * (mean - ts), yerr=[100 * (mean - lo), 100 * (hi - mean)],
                     capsize=2, elinewidth=0.8, **style)
    # the reference line last and on top: it must stay visible where the methods meet it
    ax.plot(ts, ts, color="black", linestyle=(0, (4, 3)), lw=1.6, zorder=10,
            label="required = achieved")
    ax2.axhline(0.0, color="black", linestyle=(0, (4, 3)), lw=1.6, zorder=10,
                label="required = achieved")
    ax.set_xlabel("required sparsity")
    ax.set_ylabel("achieved sparsity (band: min..max layer)")
    ax.set_title(f"{result['layers']} layers: achieved vs required")
    ax.legend(fontsize=8)
    ax2.set_xlabel("required sparsity")
    ax2.set_ylabel("achieved - required, points")
    ax2.set_title("deviation from the target")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sparsity",
        help="required vs achieved sparsity of the threshold methods on real neural gradients",
        description="Capture neural gradients, prune each layer at each target with the "
        "lognormal (Eq. 8), empirical, calibrated, ATP and top-k-then-stochastic thresholds, "
        "and report achieved sparsity and encoded size (paper Fig. 5 right).",
    )
    add_data_args(p)
    p.add_argument("--steps", type=int, default=200, help="training steps before capture (200)")
    p.add_argument("--capture-size", type=int, default=1 << 18,
                   help="values kept per captured tensor, random subsample (default 262144)")
    p.add_argument("--targets", default=",".join(str(t) for t in DEFAULT_TARGETS),
                   help="comma list of target sparsities in (0, 1)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list of {', '.join(PRUNE_METHODS)}")
    p.add_argument("--sample-size", type=int, default=16384,
                   help="sample per layer for the empirical/ATP thresholds (default 16384)")
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic lognormal layers instead of training (quick self-check)")
    p.add_argument("--no-encode", action="store_true", help="skip the encoded-size column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _capture(args) -> list[tuple[str, torch.Tensor]]:
    try:
        from gradcomp.apps.experiments import collect_neural_gradients
    except ImportError as exc:  # the capture layer is part of the lead's foundation work
        raise ValueError(f"gradient capture is unavailable ({exc}); use --synthetic") from exc
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {args.steps}")
    # two capture points: the calibrated method learns on the first, all are scored on the last
    steps = [args.steps // 2, args.steps - 1]
    recs = collect_neural_gradients(
        model=args.model, dataset=args.dataset, steps=args.steps, capture_steps=steps,
        sample_size=args.capture_size, seed=args.seed, device=args.device,
        data_dir=args.data_dir, progress=not args.quiet,
    )
    recs = sorted(recs, key=lambda r: r.step)
    return [(r.name, r.sample.float().cpu()) for r in recs if r.sample.numel() > 0]


def run(args: argparse.Namespace) -> int:
    targets = parse_targets(args.targets)
    methods = parse_methods(args.methods)
    if args.sample_size < 1:
        raise ValueError(f"--sample-size must be >= 1, got {args.sample_size}")
    layers = synthetic_layers(seed=args.seed) if args.synthetic else _capture(args)
    result = evaluate_sparsity(layers, targets, methods, sample_size=args.sample_size,
                               seed=args.seed, encode=not args.no_encode,
                               progress=not (args.quiet or args.json))
    result["source"] = "synthetic" if args.synthetic else f"{args.model}/{args.dataset}"
    out = Path(args.out)
    write_json(out / "sparsity.json", result)
    plot_fig5(result, out / "fig5_sparsity.png")
    if args.json:
        print(to_json({k: v for k, v in result.items() if k != "per_layer"}))
    else:
        print(f"source: {result['source']}, {result['layers']} layers, sample {args.sample_size}"
              f"{' (calibrated: in-sample)' if result['calibration_in_sample'] else ''}")
        print(format_report(result))
        print(f"wrote {out / 'sparsity.json'} and {out / 'fig5_sparsity.png'}")
    return 0
