"""``gradcomp formats``: optimal FP formats for lognormal neural gradients (Table 2, Fig. 3).

sigma is the std of ln|g| (natural log) everywhere; the log2 value is sigma / ln 2.
``--block``: the same question for block-scaled formats (MX, NVFP4): expected relative error
per element format and block size, predicted (order statistics of the block maximum) and
Monte Carlo side by side, and the element format the theory picks at each block size.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from gradcomp.apps.commands._common import parse_bits
from gradcomp.numerics.block import BlockFormat
from gradcomp.numerics.block_error import (
    ELEMENT_CANDIDATES,
    expected_block_error,
    monte_carlo_block_error,
)
from gradcomp.numerics.formats import FPFormat
from gradcomp.numerics.fp_error import (
    monte_carlo_relative_error,
    optimal_format,
    split_formats,
)

# Paper Table 2: sigma range -> optimal formats for FP4..FP8.
PAPER_TABLE2 = {
    "CIFAR-100": ((2.5, 4.5), ["1-3-0", "1-4-0", "1-4-1", "1-4-2", "1-5-2"]),
    "ImageNet": ((3.0, 5.5), ["1-3-0", "1-4-0", "1-5-0", "1-5-1", "1-5-2"]),
}
CONVENTION = "sigma = std of ln|g| (natural log); sigma_log2 = sigma / ln 2"
DEFAULT_OUT = "runs/formats"
BLOCK_ELEMENTS = ("e4m3fn", "e5m2", "e2m3fn", "e3m2fn", "e2m1fn")


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
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"directory for the figures (PNG + JSON; default {DEFAULT_OUT})")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--block", action="store_true",
                   help="block-scaled formats (MX/NVFP4): error vs sigma and block size")
    p.add_argument("--block-sizes", default="16,32,128", help="block sizes for --block")
    p.add_argument("--block-scale", default="e8m0:floor",
                   choices=("e8m0:floor", "e8m0:rceil", "e4m3:nearest", "fp32:nearest"),
                   help="scale format and rule for --block (e4m3 adds NVFP4's tensor scale)")
    p.add_argument("--rounding", default="nearest", choices=("nearest", "stochastic"),
                   help="element rounding for --block")
    p.add_argument("--mc-blocks", type=int, default=2000,
                   help="Monte-Carlo blocks per --block cell (0: theory only)")
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


def _step_lines(ax, xs, series: dict) -> None:
    """Step lines of whole-number values that stay visible where they coincide: each series
    is offset by a small fraction of a bit and drawn with its own marker; integer y ticks."""
    markers = "osD^v<>ph*"
    k = len(series)
    for i, (label, ys) in enumerate(series.items()):
        off = (i - (k - 1) / 2) * 0.06
        ax.step(xs, np.asarray(ys, dtype=float) + off, where="mid", marker=markers[i % 10],
                ms=4, lw=1.4, label=label)
    vals = [v for ys in series.values() for v in ys]
    lo, hi = int(min(vals)), int(max(vals))
    ax.set_yticks(range(lo, hi + 1))
    ax.set_ylim(lo - 0.5, hi + 0.5)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


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
        _step_lines(ax, sigmas, {f"FP{b}": data["optimal_exp_bits"][b] for b in bits})
        ax.set(xlabel="sigma (std of ln|g|)", ylabel="optimal exponent bits",
               title=f"{key}: {title}, {semantics}")
        fig.tight_layout()
        fig.savefig(out / f"{key}.png", dpi=120)
        plt.close(fig)
        (out / f"{key}.json").write_text(json.dumps(data, indent=1))
        files[key] = str(out / f"{key}.png")
    return files


def _parse_blocks(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--block-sizes must look like 16,32,128; got {text!r}") from None
    if not vals or any(not 2 <= v <= 4096 for v in vals):
        raise ValueError(f"--block-sizes values must be in [2, 4096], got {text!r}")
    return vals


def block_table(sigmas, blocks, scale_rule, rounding, mc_blocks, seed) -> list[dict]:
    """Rows {sigma, block, elem, bits, predicted, monte_carlo, mc_se} of the block theory."""
    scale, rule = scale_rule.split(":")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in sigmas:
        for n in blocks:
            for el in BLOCK_ELEMENTS:
                bf = BlockFormat(FPFormat.from_name(el), (n,), scale, rule,
                                 tensor_scale=scale == "e4m3")
                th = expected_block_error(bf, s, rounding=rounding)
                mc = se = None
                if mc_blocks:
                    m, e = monte_carlo_block_error(bf, s, rounding=rounding, blocks=mc_blocks,
                                                   generator=g)
                    mc, se = m.relative, e.relative
                rows.append({"sigma": s, "block": n, "elem": el, "bits": bf.elem.bits,
                             "format": bf.name, "predicted": th.relative, "monte_carlo": mc,
                             "mc_se": se})
    return rows


def block_choice(rows) -> dict:
    """{(block, bits): [(sigma, best element), ...]} from the predicted errors."""
    best = {}
    for r in rows:
        key = (r["block"], r["bits"], r["sigma"])
        if key not in best or r["predicted"] < best[key][1]:
            best[key] = (r["elem"], r["predicted"])
    out = {}
    for (n, b, s), (el, _) in sorted(best.items()):
        if len(ELEMENT_CANDIDATES.get(b, ())) > 1:
            out.setdefault((n, b), []).append((s, el))
    return out


def _format_block(rows, choice, scale_rule, rounding) -> str:
    lines = [f"# {CONVENTION}",
             f"# block formats: scale {scale_rule}, element rounding {rounding}; expected "
             "relative error E|Q(g)-g|/|g|, predicted | Monte Carlo (+- standard error)"]
    head = f"{'sigma':>5s} {'block':>5s}  " + "  ".join(f"{e:>23s}" for e in BLOCK_ELEMENTS)
    lines.append(head)
    cells = {(r["sigma"], r["block"], r["elem"]): r for r in rows}
    for s in sorted({r["sigma"] for r in rows}):
        for n in sorted({r["block"] for r in rows}):
            parts = []
            for el in BLOCK_ELEMENTS:
                r = cells[(s, n, el)]
                mc = "-" if r["monte_carlo"] is None else f"{r['monte_carlo']:.4f}"
                parts.append(f"{r['predicted']:.4f} | {mc:>6s}" + (
                    "" if r["mc_se"] is None else f" +-{r['mc_se']:.4f}"))
            lines.append(f"{s:5.2f} {n:5d}  " + "  ".join(f"{p:>23s}" for p in parts))
    lines.append("")
    lines.append("Element format the theory picks (least predicted relative error):")
    for (n, b), picks in sorted(choice.items()):
        txt = ", ".join(f"{s:g}: {el}" for s, el in picks)
        lines.append(f"  block {n:4d}, {b} bits: sigma {txt}")
    return "\n".join(lines)


def _block_figures(out: Path, rows, choice, scale_rule, rounding) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    blocks = sorted({r["block"] for r in rows})
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.2 * len(blocks), 3.8), squeeze=False,
                             sharey=True)
    for ax, n in zip(axes[0], blocks):
        for el in BLOCK_ELEMENTS:
            rr = [r for r in rows if r["block"] == n and r["elem"] == el]
            xs = [r["sigma"] for r in rr]
            line = ax.plot(xs, [r["predicted"] for r in rr], label=el)[0]
            if rr and rr[0]["monte_carlo"] is not None:
                ax.plot(xs, [r["monte_carlo"] for r in rr], "o", color=line.get_color(), ms=4)
        ax.set(xscale="linear", yscale="log", xlabel="sigma (std of ln|g|)",
               title=f"block {n}, scale {scale_rule}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("E|Q(g)-g|/|g|  (lines: theory, dots: MC)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "block_error.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), squeeze=False)
    for ax, b in zip(axes[0], (8, 6)):
        series = {}
        for (n, bb), picks in sorted(choice.items()):
            if bb == b:
                series[f"block {n}"] = [FPFormat.from_name(el).exp_bits for _, el in picks]
                xs = [s for s, _ in picks]
        if series:
            _step_lines(ax, xs, series)
        ax.set(xlabel="sigma (std of ln|g|)", ylabel="optimal element exponent bits",
               title=f"FP{b} elements, scale {scale_rule}")
    fig.tight_layout()
    fig.savefig(out / "block_choice.png", dpi=120)
    plt.close(fig)
    data = {"convention": CONVENTION, "scale": scale_rule, "rounding": rounding, "rows": rows,
            "choice": {f"block{n}_fp{b}": picks for (n, b), picks in choice.items()}}
    (out / "block.json").write_text(json.dumps(data, indent=1))
    return {"block_error": str(out / "block_error.png"),
            "block_choice": str(out / "block_choice.png"), "block_json": str(out / "block.json")}


def run_block(args, sigmas) -> int:
    blocks = _parse_blocks(args.block_sizes)
    if args.mc_blocks and args.mc_blocks < 10:
        raise ValueError(f"--mc-blocks must be 0 or >= 10, got {args.mc_blocks}")
    rows = block_table(sigmas, blocks, args.block_scale, args.rounding, args.mc_blocks,
                       args.seed)
    choice = block_choice(rows)
    files = {} if args.no_plots else _block_figures(Path(args.out), rows, choice,
                                                     args.block_scale, args.rounding)
    if args.json:
        print(json.dumps({"convention": CONVENTION, "scale": args.block_scale,
                          "rounding": args.rounding, "rows": rows,
                          "choice": {f"block{n}_fp{b}": p for (n, b), p in choice.items()},
                          "files": files}, indent=1))
    else:
        print(_format_block(rows, choice, args.block_scale, args.rounding))
        for v in files.values():
            print(f"wrote {v}")
    return 0


def run(args) -> int:
    bits = parse_bits(args.bits)
    sigmas = _parse_sigma(args.sigma)
    if args.mc < 100:
        raise ValueError(f"--mc must be >= 100, got {args.mc}")
    if not (math.isfinite(args.fig_sigma) and args.fig_sigma > 0):
        raise ValueError(f"--fig-sigma must be finite and > 0, got {args.fig_sigma}")
    if args.block:
        return run_block(args, sigmas)
    tab = optimal_table(bits, sigmas, args.semantics, args.scale)
    comparison = table2_comparison(args.semantics, args.scale)
    files = {}
    if not args.no_plots:
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
