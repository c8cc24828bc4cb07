"""``gradcomp gemmcheck``: which layers and backward GEMMs add the most quantization noise.

Captures x, W and the neural gradient of every Linear/Conv2d at the last step of a short run,
recomputes dgrad and wgrad under each backward-quantization scheme ``--draws`` times, and prints
one table ranked by added noise (1 - cosine to the exact product): cosine, relative variance,
the lognormal model's predicted variance (where a closed form exists), relative bias with its
noise floor, and the bias z statistic (below 5 for an unbiased estimator). Writes
``gemmcheck.json`` and a per-layer figure ``gemmcheck.png`` under ``--out``. Logic in
``gradcomp.apps.gemmcheck``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gradcomp.apps.commands._common import add_data_args
from gradcomp.apps.gemmcheck import (
    SCHEMES,
    capture_gemm_operands,
    gemm_diagnostics,
    plot_layers,
    ranked_rows,
)
from gradcomp.apps.tables import format_table, to_json, write_json

DEFAULT_OUT = "runs/gemmcheck"
DEFAULT_SCHEMES = "luq4,fp4-sr,fp4-rn"
_COLUMNS = ["layer", "scheme", "gemm", "cosine", "rel_var", "pred_rel_var", "rel_bias",
            "noise_floor", "bias_z"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gemmcheck",
        help="per-layer, per-GEMM bias / variance / cosine of backward quantization schemes",
        description="Capture the backward operands of every Linear/Conv2d in a short run and "
        "measure, for dgrad and wgrad under each scheme, the bias (z below 5 means unbiased), "
        "the variance (with the lognormal prediction) and the cosine to the exact product; "
        "ranked by added noise.",
    )
    add_data_args(p, model="cnn")
    p.add_argument("--steps", type=int, default=10, help="training steps before capture (10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--width", type=int, default=None,
                   help="model base width (default 8 for image models; a transformer's own)")
    p.add_argument("--max-train", type=int, default=2048, help="training samples loaded (2048)")
    p.add_argument("--schemes", default=DEFAULT_SCHEMES,
                   help=f"comma list of {', '.join(SCHEMES)} (default {DEFAULT_SCHEMES})")
    p.add_argument("--draws", type=int, default=8, help="independent draws per scheme (8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    return p


def _parse_schemes(text: str) -> dict:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCHEMES]
    if not names or unknown:
        raise ValueError(f"--schemes must be a comma list of {', '.join(SCHEMES)}; got {text!r}")
    return {n: SCHEMES[n] for n in names}


def run(args: argparse.Namespace) -> int:
    schemes = _parse_schemes(args.schemes)
    if args.draws < 2:
        raise ValueError(f"--draws must be >= 2, got {args.draws}")
    recs = capture_gemm_operands(args.model, args.dataset, steps=args.steps,
                                 batch_size=args.batch_size, width=args.width, seed=args.seed,
                                 data_dir=args.data_dir, max_train=args.max_train,
                                 device=args.device)
    with torch.no_grad():
        measured = gemm_diagnostics(recs, schemes, draws=args.draws, seed=args.seed)
    rows = ranked_rows(measured)
    out = Path(args.out)
    source = f"{args.model}/{args.dataset}, step {args.steps}, {args.draws} draws"
    write_json(out / "gemmcheck.json", {"source": source, "rows": rows})
    if not args.no_plot:
        plot_layers(measured, out / "gemmcheck.png")  # layers in model order
    if args.json:
        print(to_json(rows))
        return 0
    print(f"source: {source}; ranked by added noise (1 - cosine)")
    print(format_table(_COLUMNS, [[r[k] for k in _COLUMNS] for r in rows]))
    print(f"\nwrote {out / 'gemmcheck.json'}" + ("" if args.no_plot else
                                                 f" and {out / 'gemmcheck.png'}"))
    return 0
