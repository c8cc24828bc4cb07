"""Distribution analysis of captured tensors (paper section 3: Table 1, Fig. 2, Fig. A.2)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gradcomp.integration.capture import GradientRecord
from gradcomp.numerics.fit import fit_lognormal
from gradcomp.numerics.goodness import DISTRIBUTIONS, finite_magnitudes, fit_distribution, ks_table

__all__ = ["analyze_records", "summarize", "split_head", "sigma_spread", "HEAD_NAMES",
           "plot_distributions", "plot_sigma_over_training"]

# The output layer of the sequence models: its neural gradient is softmax(logits) - onehot(target)
# (divided by the batch's positions), bounded in [-1, 1] with one negative entry per row: not a
# lognormal population, so the Table 1 summary leaves it out and reports it on its own.
HEAD_NAMES = ("head",)


def analyze_records(
    records: list[GradientRecord],
    distributions=tuple(DISTRIBUTIONS),
    ks_sample: int = 30_000,
    seed: int = 0,
) -> list[dict]:
    """One row per record: identity, lognormal fit (of the record's sample) and KS D per family."""
    rows = []
    for r in records:
        fit = fit_lognormal(r.sample).to_dict()
        ks = ks_table(r.sample, distributions, sample_size=ks_sample, seed=seed)
        d = {k.distribution: k.statistic for k in ks}
        finite = {k: v for k, v in d.items() if math.isfinite(v)}
        rows.append({
            "layer": r.name, "kind": r.kind, "step": r.step, "module": r.module_type,
            "shape": list(r.shape), "numel": r.numel,
            # whole-tensor zero fraction (the sample's is an estimate of it)
            "zero_fraction": r.zero_fraction,
            "nonfinite": int(r.nonfinite),
            "mu": fit["mu"], "sigma": fit["sigma"], "count": fit["count"],
            "ks_n": ks[0].n if ks else 0,
            "D": d,
            "p": {k.distribution: k.pvalue for k in ks},
            "best": min(finite, key=finite.get) if finite else None,
        })
    return rows


def summarize(rows: list[dict], distributions=tuple(DISTRIBUTIONS)) -> dict:
    """Mean and std of D per distribution over rows (layers x time); how often each fits best."""
    out = {}
    for name in distributions:
        vals = np.array([r["D"][name] for r in rows if math.isfinite(r["D"].get(name, math.nan))])
        out[name] = {
            "mean": float(vals.mean()) if vals.size else math.nan,
            "std": float(vals.std()) if vals.size else math.nan,
            "n": int(vals.size),
            "best_count": sum(1 for r in rows if r["best"] == name),
        }
    return out


def _label(r) -> str:
    """A record's layer as a reader knows it: module name, type and output shape."""
    kind = r.module_type or "layer"
    return f"{r.name} ({kind}, {'x'.join(map(str, r.shape))})"


def _pick_layers(names: list[str], k: int = 3) -> list[str]:
    if len(names) <= k:
        return names
    return [names[0], names[len(names) // 2], names[-1]]


def plot_distributions(records: list[GradientRecord], out_dir: Path,
                       layers: list[str] | None = None, seed: int = 0) -> list[Path]:
    """Fig. 2 for chosen layers: |g| histograms (linear, log axes), Q-Q vs normal and lognormal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(r.name for r in records))
    layers = layers or _pick_layers(names)
    last = {r.name: r for r in records}  # latest step of each layer
    fig, axes = plt.subplots(len(layers), 4, figsize=(16, 3.6 * len(layers)), squeeze=False)
    for row, name in zip(axes, layers):
        r = last[name]
        a = finite_magnitudes(r.sample, 30_000, seed)
        if a.size < 2:
            row[0].set_title(f"{_label(r)}: no non-zero values")
            continue
        la = np.log(a)
        row[0].hist(a, bins=200, density=True, color="C0")
        row[0].set_title(f"{_label(r)}, step {r.step}: |g|", fontsize=9)
        row[0].set_xlim(0, np.quantile(a, 0.99))
        row[1].hist(la, bins=100, density=True, color="C1")
        xs = np.linspace(la.min(), la.max(), 200)
        row[1].plot(xs, stats.norm(la.mean(), la.std()).pdf(xs), "k--", label="normal fit of ln|g|")
        row[1].set_title("ln|g| (lognormal: a normal bell)")
        row[1].legend(fontsize=7)
        q = (np.arange(1, a.size + 1) - 0.5) / a.size
        srt = np.sort(a)
        for ax, fam in ((row[2], "normal"), (row[3], "lognormal")):
            dist = fit_distribution(fam, a)
            theo = dist.ppf(q)
            ax.plot(theo, srt, ".", ms=1.5)
            lim = [min(theo.min(), srt.min()), max(theo.max(), srt.max())]
            ax.plot(lim, lim, "k--", lw=0.8)
            ax.set_title(f"Q-Q vs fitted {fam}")
            ax.set_xlabel("theoretical quantile")
            ax.set_ylabel("|g| quantile")
            if fam == "lognormal":
                ax.set_xscale("log")
                ax.set_yscale("log")
    fig.tight_layout()
    path = out_dir / "distributions.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def plot_sigma_over_training(rows: list[dict], out_dir: Path) -> Path:
    """sigma (std of ln|g|) per layer, one line per capture step (paper Fig. A.5 for the
    transformer layers, Fig. A.3 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    steps = sorted({r["step"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 4))
    for s in steps:
        by = {r["layer"]: r["sigma"] for r in rows if r["step"] == s}
        ax.plot(range(len(layers)), [by.get(n, math.nan) for n in layers], "o-", ms=3,
                label=f"step {s}")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_ylabel("sigma of ln|g|")
    ax.set_title("Neural-gradient sigma per layer over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "sigma_per_layer.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def split_head(rows: list[dict], head_names=HEAD_NAMES) -> tuple[list[dict], list[dict]]:
    """(hidden-layer rows, output-layer rows): rows whose layer is named in ``head_names``
    (the transformers' ``head``) go to the second list."""
    head = [r for r in rows if r["layer"] in head_names]
    return [r for r in rows if r["layer"] not in head_names], head


def sigma_spread(rows: list[dict], octaves: float = 8.0) -> list[dict]:
    """Per capture step: how far the layers' log-magnitude statistics spread (paper Fig. A.5,
    section 4.4) and what one global scale costs against per-layer scales.

    For each step: min / max / mean of sigma (std of ln|g|) and of mu (mean of ln|g|) over the
    layers, the spread of the layers' centres in octaves ((max mu - min mu) / ln 2), and, for a
    format whose normal range spans ``octaves`` octaves (FP4 1-3-0 of Eq. 2: magnitudes
    2^-4..2^4, 8 octaves), the fraction of each layer's non-zero |g| inside that range under
    the fitted lognormal, ln|g| ~ N(mu, sigma^2): with a per-layer scale (range centred on each
    layer's mu: 2 Phi(R / (2 sigma)) - 1, R = octaves ln 2) and with the best single scale
    shared by all layers (a grid search over the shift, 1/64 octave). Reported: the mean and the
    worst layer of both.
    """
    from scipy.stats import norm

    width = octaves * math.log(2.0)
    out = []
    for step in sorted({r["step"] for r in rows}):
        rs = [r for r in rows if r["step"] == step and math.isfinite(r["mu"])
              and math.isfinite(r["sigma"]) and r["sigma"] > 0]
        if not rs:
            continue
        mu = np.array([r["mu"] for r in rs])
        sg = np.array([r["sigma"] for r in rs])
        per_layer = 2 * norm.cdf(width / (2 * sg)) - 1
        # range [c - R/2, c + R/2] of ln|g| for one shared centre c
        grid = np.arange(mu.min() - width, mu.max() + width, math.log(2.0) / 64)
        lo = (grid[:, None] - width / 2 - mu[None, :]) / sg[None, :]
        hi = (grid[:, None] + width / 2 - mu[None, :]) / sg[None, :]
        cover = norm.cdf(hi) - norm.cdf(lo)
        best = int(np.argmax(cover.mean(axis=1)))
        shared = cover[best]
        out.append({
            "step": step, "layers": len(rs),
            "sigma_min": float(sg.min()), "sigma_max": float(sg.max()),
            "sigma_mean": float(sg.mean()),
            "mu_min": float(mu.min()), "mu_max": float(mu.max()),
            "mu_spread_octaves": float((mu.max() - mu.min()) / math.log(2.0)),
            "sigma_min_layer": rs[int(sg.argmin())]["layer"],
            "sigma_max_layer": rs[int(sg.argmax())]["layer"],
            "octaves": octaves,
            "in_range_per_layer_mean": float(per_layer.mean()),
            "in_range_per_layer_worst": float(per_layer.min()),
            "in_range_global_mean": float(shared.mean()),
            "in_range_global_worst": float(shared.min()),
            "global_worst_layer": rs[int(shared.argmin())]["layer"],
        })
    return out
