"""``gradcomp formats``: optimal FP formats for lognormal neural gradients (Table 2, Fig. 3).

sigma is the std of ln|g| (natural log) everywhere; the log2 value is sigma / ln 2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from gradcomp.numerics.fp_error import (
    monte_carlo_relative_error,
    optimal_format,
    split_formats,
)

# Paper Table 2 (notes section 2): sigma range -> optimal formats for FP4..FP8.
PAPER_TABLE2 = {
    "CIFAR-100": ((2.5, 4.5), ["1-3-0", "1-4-0", "1-4-1", "1-4-2", "1-5-2"]),
    "ImageNet": ((3.0, 5.5), ["1-3-0", "1-4-0", "1-5-0", "1-5-1", "1-5-2"]),
}
CONVENTION = "sigma = std of ln|g| (natural log); sigma_log2 = sigma / ln 2"


def _parse_bits(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            bits = list(range(lo, hi + 1))
        else:
            bits = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--bits must look like 4-8 or 4,6,8; got {text!r}") from None
    for b in bits:
        if not 3 <= b <= 16:
            raise ValueError(f"--bits values must be in [3, 16], got {b}")
    if not bits:
        raise ValueError(f"--bits is empty: {text!r}")
    return bits


def _parse_sigma(text: str) -> list[float]:
    try:
        if ":" in text:
            lo, hi, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            vals = list(np.round(np.arange(lo, hi + step / 2, step), 10))
        else:
            vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--sigma must look like 1:6:0.5 or 2,3,4; got {text!r}") from None
    for v in vals:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--sigma values must be finite and > 0, got {v!r}")
    if not vals:
        raise ValueError(f"--sigma is empty: {text!r}")
    return [float(v) for v in vals]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "formats",
        help="optimal FP formats for lognormal gradients (Table 2, Fig. 3)",
        description="Table of the 1-n2-n1 split minimising the exact expected relative error "
        "over a sigma grid; " + CONVENTION + ".",
    )
    p.add_argument("--bits", default="4-8", help="total bits: a range 4-8 or a list 4,6,8")
    p.add_argument("--sigma", default="1:6:0.5", help="sigma grid lo:hi:step or a list (ln)")
    p.add_argument("--semantics", default="paper", choices=("paper", "ieee"),
                   help="paper = Eq. 2 idealised formats; ieee = eXmY with subnormals")
    p.add_argument("--scale", default="optimal", choices=("optimal", "centered"),
                   help="score each split at its optimal scale, or at s=1 (centred)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--out", default=None, help="directory for fig3a/b/c PNG + JSON")
    p.add_argument("--fig-sigma", type=float, default=3.0, help="sigma of Fig. 3a")
    p.add_argument("--mc", type=int, default=20000, help="Monte-Carlo samples per Fig. 3a point")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo points")
    return p


def optimal_table(bits, sigmas, semantics, scale="optimal", distribution="lognormal"):
    """{bits: [(sigma, format name, error, exponent bits), ...]} over the grid."""
    out = {}
    for b in bits:
        rows = []
        for s in sigmas:
            r = optimal_format(b, s, semantics, distribution=distribution, scale=scale)
            rows.append((s, r.fmt.name, r.error, r.fmt.exp_bits))
        out[b] = rows
    return out


def _split(fmt) -> str:
    """The paper's 1-n2-n1 label of a format, whatever its semantics."""
    return f"1-{fmt.exp_bits}-{fmt.man_bits}"


def table2_comparison(semantics: str, scale: str = "optimal") -> list[dict]:
    """Paper Table 2 vs our optimum over each sigma range, read as ln and as log2 sigma."""
    rows = []
    for data, ((lo, hi), paper) in PAPER_TABLE2.items():
        sig = list(np.round(np.arange(lo, hi + 0.25, 0.5), 10))
        for i, b in enumerate(range(4, 9)):
            ours_ln = sorted({_split(optimal_format(b, s, semantics, scale=scale).fmt)
                              for s in sig})
            ours_l2 = sorted({_split(optimal_format(b, s * math.log(2), semantics, scale=scale).fmt)
                              for s in sig})
            rows.append({"data": data, "sigma": [lo, hi], "bits": b, "paper": paper[i],
                         "ours_ln": ours_ln, "ours_log2": ours_l2})
    return rows


def _format_tables(tab, comparison, semantics, scale) -> str:
    lines = [f"# {CONVENTION}", f"# semantics: {semantics}; scale: {scale}"]
    bits = list(tab)
    lines.append("sigma  " + "  ".join(f"FP{b:<8d}" for b in bits))
    for i, (s, *_) in enumerate(tab[bits[0]]):
        lines.append(f"{s:5.2f}  " + "  ".join(f"{tab[b][i][1]:<10s}" for b in bits))
    lines.append("")
    lines.append("Paper Table 2 vs ours (sigma range read as ln, then as log2):")
    for r in comparison:
        mark = "=" if r["ours_ln"] == [r["paper"]] else "~" if r["paper"] in r["ours_ln"] else "x"
        lines.append(
            f"  {r['data']:<9s} sigma {r['sigma'][0]}-{r['sigma'][1]} FP{r['bits']}: paper "
            f"{r['paper']:<6s} ours(ln) {','.join(r['ours_ln']):<14s} {mark}  "
            f"ours(log2) {','.join(r['ours_log2'])}"
        )
    return "\n".join(lines)


def _figures(out: Path, bits, sigmas, semantics, fig_sigma, mc, seed, tab) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    fig3a = {"sigma": fig_sigma, "semantics": semantics, "curves": {}}
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in bits:
        r = optimal_format(b, fig_sigma, semantics)
        n2 = [row[1] for row in r.table]
        err = [row[3] for row in r.table]
        mcs = [monte_carlo_relative_error(f, 0.0, fig_sigma, row[4], n=mc, generator=g)[0]
               for f, row in zip(split_formats(b, semantics), r.table)]
        fig3a["curves"][b] = {"exp_bits": n2, "exact": err, "monte_carlo": mcs}
        line = ax.plot(n2, err, marker="", label=f"FP{b}")[0]
        ax.plot(n2, mcs, "o", color=line.get_color(), ms=4)
    ax.set(xlabel="exponent bits n2", ylabel="E|Q(x)-x|/|x|", yscale="log",
           title=f"Fig. 3a: sigma={fig_sigma} (ln), {semantics}; dots: Monte Carlo")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig3a.png", dpi=120)
    plt.close(fig)
    (out / "fig3a.json").write_text(json.dumps(fig3a, indent=1))

    files = {"fig3a": str(out / "fig3a.png")}
    tabn = optimal_table(bits, sigmas, semantics, distribution="normal")
    for key, t, title in (("fig3b", tab, "lognormal"), ("fig3c", tabn, "normal assumption")):
        data = {"semantics": semantics, "distribution": title, "sigma": sigmas,
                "optimal_exp_bits": {b: [n2 for _, _, _, n2 in t[b]] for b in bits}}
        fig, ax = plt.subplots(figsize=(6, 4))
        for b in bits:
            ax.step(sigmas, data["optimal_exp_bits"][b], where="mid", label=f"FP{b}")
        ax.set(xlabel="sigma (std of ln|g|)", ylabel="optimal exponent bits",
               title=f"{key}: {title}, {semantics}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{key}.png", dpi=120)
        plt.close(fig)
        (out / f"{key}.json").write_text(json.dumps(data, indent=1))
        files[key] = str(out / f"{key}.png")
    return files


def run(args) -> int:
    bits = _parse_bits(args.bits)
    sigmas = _parse_sigma(args.sigma)
    if args.mc < 100:
        raise ValueError(f"--mc must be >= 100, got {args.mc}")
    if not (math.isfinite(args.fig_sigma) and args.fig_sigma > 0):
        raise ValueError(f"--fig-sigma must be finite and > 0, got {args.fig_sigma}")
    tab = optimal_table(bits, sigmas, args.semantics, args.scale)
    comparison = table2_comparison(args.semantics, args.scale)
    files = {}
    if args.out:
        files = _figures(Path(args.out), bits, sigmas, args.semantics, args.fig_sigma, args.mc,
                         args.seed, tab)
    if args.json:
        print(json.dumps({"convention": CONVENTION, "semantics": args.semantics,
                          "scale": args.scale,
                          "table": {b: [{"sigma": s, "format": f, "error": e}
                                        for s, f, e, _ in rows] for b, rows in tab.items()},
                          "table2_comparison": comparison, "files": files}, indent=1))
    else:
        print(_format_tables(tab, comparison, args.semantics, args.scale))
        for v in files.values():
            print(f"wrote {v}")
    return 0
