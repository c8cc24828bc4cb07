"""``gradcomp sparsity``: required vs achieved sparsity of each threshold method (paper Fig. 5).

Captures real neural gradients (or draws synthetic lognormal ones with ``--synthetic``), prunes
every layer at every target with each threshold method through one ``Pruner`` per layer, and
reports the achieved fraction of zeros (mean and worst layer |error|) and the encoded size
(``encode_pruned``, real bytes) per method and target; writes a Fig. 5 (right)-like plot and JSON.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from gradcomp.apps.commands._common import add_data_args
from gradcomp.apps.tables import format_table, to_json, write_json
from gradcomp.compressors.encoding import encode_pruned
from gradcomp.compressors.pruning import PRUNE_METHODS, Pruner, topk_threshold
from gradcomp.numerics.fit import LayerStats, fit_lognormal

DEFAULT_OUT = "runs/sparsity"
DEFAULT_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DEFAULT_METHODS = ("lognormal", "empirical", "calibrated", "atp", "topk_stochastic")


def _parse_targets(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--targets must look like 0.5,0.8,0.9; got {text!r}") from None
    if not vals:
        raise ValueError(f"--targets is empty: {text!r}")
    for v in vals:
        if not 0.0 < v < 1.0:
            raise ValueError(f"--targets values must lie in (0, 1), got {v!r}")
    return vals


def _parse_methods(text: str) -> list[str]:
    vals = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in vals if m not in PRUNE_METHODS]
    if bad or not vals:
        raise ValueError(f"--methods must be a comma list of {', '.join(PRUNE_METHODS)}; "
                         f"got {text!r}")
    return vals


def synthetic_layers(n_layers: int = 8, numel: int = 50_000, seed: int = 0):
    """Signed lognormal tensors with sigma in [1, 4] and zero fractions in [0, 0.5] (for tests)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_layers):
        mu = -12 + 6 * float(torch.rand((), generator=g))
        sigma = 1 + 3 * float(torch.rand((), generator=g))
        z = 0.5 * float(torch.rand((), generator=g))
        mag = torch.exp(mu + sigma * torch.randn(numel, generator=g))
        sign = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
        x = mag * sign * (torch.rand(numel, generator=g) >= z)
        out.append((f"layer{i}", x))
    return out


def _group(layers: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, t in layers:
        groups.setdefault(name, []).append(t.detach().reshape(-1))
    return groups


def _sample(t: torch.Tensor, size: int | None, g: torch.Generator) -> torch.Tensor:
    if size is None or t.numel() <= size:
        return t  # fewer elements than the sample size: use every element (issue 8)
    idx = torch.randint(0, t.numel(), (size,), generator=g, device="cpu").to(t.device)
    return t[idx]


def evaluate_sparsity(layers: Sequence[tuple[str, torch.Tensor]], targets=DEFAULT_TARGETS,
                      methods=DEFAULT_METHODS, *, sample_size: int | None = 16384, seed: int = 0,
                      encode: bool = True) -> dict:
    """Prune every layer at every target with every method; measure achieved sparsity and size.

    ``layers`` is a list of (name, tensor). A name repeated (the same layer captured at several
    steps) is a time series: every method is evaluated on its *last* tensor, and the calibrated
    method is refreshed on each tensor in order before that (as during training); with a single
    tensor it is refreshed three times on it (in-sample, flagged in the result). Samples for
    'empirical' / 'atp' are ``sample_size`` values drawn with replacement (all values when the
    layer is smaller). Returns a dict with per-layer records and per (method, target) summaries:
    mean achieved sparsity, mean and worst-layer |achieved - target|, mean signed error and the
    element-weighted encoded bits per element.
    """
    groups = _group(layers)
    if not groups:
        raise ValueError("layers is empty: nothing to evaluate")
    g = torch.Generator().manual_seed(seed)
    per_layer, summary = [], []
    in_sample = all(len(v) == 1 for v in groups.values())
    for method in methods:
        for target in targets:
            errs, achieved_all, bits, elems = [], [], 0.0, 0
            for name, series in groups.items():
                p = Pruner(target, method)
                history = series if len(series) > 1 or method != "calibrated" else series * 3
                if method != "calibrated":
                    history = history[-1:]
                for t in history:
                    p.update(LayerStats(fit_lognormal(t), _sample(t, sample_size, g)))
                    y = p(t, g)
                x = history[-1]
                achieved = float(p.metrics()["sparsity"])
                rec = {"layer": name, "method": method, "target": target, "numel": x.numel(),
                       "achieved": achieved, "error": achieved - target}
                if encode:
                    a = p.threshold if p.threshold is not None else topk_threshold(x, target)
                    nbytes = len(encode_pruned(y, float(a)))
                    rec["bits_per_element"] = 8 * nbytes / x.numel()
                    bits += 8 * nbytes
                    elems += x.numel()
                per_layer.append(rec)
                errs.append(achieved - target)
                achieved_all.append(achieved)
            worst = max(range(len(errs)), key=lambda i: abs(errs[i]))
            summary.append({
                "method": method, "target": target,
                "mean_achieved": sum(achieved_all) / len(errs),
                "min_achieved": min(achieved_all), "max_achieved": max(achieved_all),
                "mean_abs_error": sum(abs(e) for e in errs) / len(errs),
                "mean_error": sum(errs) / len(errs),
                "worst_abs_error": abs(errs[worst]), "worst_layer": list(groups)[worst],
                "bits_per_element": bits / elems if elems else math.nan,
            })
    return {"layers": len(groups), "methods": list(methods), "targets": list(targets),
            "sample_size": sample_size, "calibration_in_sample": in_sample,
            "summary": summary, "per_layer": per_layer}


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
    """Achieved vs required sparsity per method (mean over layers, band = min..max layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ts = result["targets"]
    ax.plot(ts, ts, "k--", lw=1, label="required")
    for m in result["methods"]:
        rows = [s for s in result["summary"] if s["method"] == m]
        ax.plot(ts, [r["mean_achieved"] for r in rows], marker="o", label=m)
        ax.fill_between(ts, [r["min_achieved"] for r in rows], [r["max_achieved"] for r in rows],
                        alpha=0.15)
    ax.set_xlabel("required sparsity")
    ax.set_ylabel("achieved sparsity")
    ax.set_title(f"{result['layers']} layers: achieved vs required")
    ax.legend(fontsize=8)
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
    targets = _parse_targets(args.targets)
    methods = _parse_methods(args.methods)
    if args.sample_size < 1:
        raise ValueError(f"--sample-size must be >= 1, got {args.sample_size}")
    layers = synthetic_layers(seed=args.seed) if args.synthetic else _capture(args)
    result = evaluate_sparsity(layers, targets, methods, sample_size=args.sample_size,
                               seed=args.seed, encode=not args.no_encode)
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
