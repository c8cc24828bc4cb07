"""``gradcomp fitcheck``: is the lognormal model enough? Model vs measurement on real gradients.

Captures neural gradients of a short training run (or draws synthetic layers with
``--synthetic``) and tabulates, per method and on average over layers: target vs achieved
sparsity of every pruning threshold method, and predicted vs held-out relative FP quantization
error per split for the lognormal model and the empirical (sample-based) one, with the split
each selects; and predicted (lognormal order-statistics theory at each layer's fit) vs
measured error of block formats (MX, NVFP4: ``--block-formats``), with a figure. Logic in
``gradcomp.apps.fitcheck``; JSON (with per-layer records) and the figure under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gradcomp.apps.commands._common import (
    add_data_args,
    parse_bits,
    parse_methods,
    parse_targets,
)
from gradcomp.apps.evaluation import DEFAULT_METHODS, DEFAULT_TARGETS, synthetic_layers
from gradcomp.apps.fitcheck import (
    DEFAULT_BITS,
    DEFAULT_BLOCK_FORMATS,
    block_check,
    block_tables,
    capture_layers,
    per_layer_tables,
    plot_block_check,
    quantization_check,
    quantization_tables,
    sparsity_check,
    sparsity_tables,
)
from gradcomp.apps.tables import to_json, write_json

DEFAULT_OUT = "runs/fitcheck"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fitcheck",
        help="lognormal model vs measurement: pruning thresholds and FP formats on real gradients",
        description="Capture neural gradients and compare, per layer and on average, the "
        "lognormal closed forms (Eq. 8 thresholds, exact FP error integral) with the "
        "distribution-free sample-based methods: target vs achieved sparsity per threshold "
        "method, predicted vs held-out quantization error per FP split, and the split each "
        "selects, and predicted vs measured error of block formats (MX, NVFP4).",
    )
    add_data_args(p)
    p.add_argument("--steps", type=int, default=200,
                   help="training steps; gradients captured at steps//2 and the last (200)")
    p.add_argument("--capture-size", type=int, default=1 << 18,
                   help="values kept per captured tensor, random subsample (default 262144)")
    p.add_argument("--targets", default=",".join(str(t) for t in DEFAULT_TARGETS),
                   help="comma list of target sparsities in (0, 1)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma list of pruning threshold methods")
    p.add_argument("--sample-size", type=int, default=16384,
                   help="sample per layer for the sample-based thresholds (default 16384)")
    p.add_argument("--extra-sample-sizes", default="4096",
                   help="comma list: the empirical threshold again at these sample sizes "
                   "('' for none)")
    p.add_argument("--bits", default=",".join(str(b) for b in DEFAULT_BITS),
                   help="FP widths: a range 4-8 or a list 4,6,8 (default 4-8)")
    p.add_argument("--semantics", default="paper", choices=("paper", "ieee"),
                   help="paper = Eq. 2 idealised formats; ieee = eXmY with subnormals")
    p.add_argument("--rounding", default="nearest", choices=("nearest", "stochastic"))
    p.add_argument("--quant-values", type=int, default=32768,
                   help="values per layer for the FP check, split in two halves (32768)")
    p.add_argument("--block-formats", default=",".join(DEFAULT_BLOCK_FORMATS),
                   help="comma list of block formats for the block check ('' for none; "
                   f"default {','.join(DEFAULT_BLOCK_FORMATS)})")
    p.add_argument("--block-rounding", default="nearest,stochastic",
                   help="comma list of element roundings for the block check "
                   "(nearest, stochastic; default both)")
    p.add_argument("--width", type=int, default=None, help="model base width")
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic lognormal layers instead of training (quick self-check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--json", action="store_true", help="print JSON summaries instead of tables")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _parse_sizes(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--extra-sample-sizes must look like 1024,4096; got {text!r}") from None
    if any(v < 1 for v in vals):
        raise ValueError(f"--extra-sample-sizes values must be >= 1, got {text!r}")
    return vals


def _parse_block(formats: str, roundings: str):
    from gradcomp.numerics.block import BlockFormat

    fmts = []
    for name in (f.strip() for f in formats.split(",")):
        if not name:
            continue
        try:
            fmts.append(BlockFormat.from_name(name))
        except ValueError as exc:
            raise ValueError(f"--block-formats: {exc}") from None
    rnds = [r.strip() for r in roundings.split(",") if r.strip()]
    bad = [r for r in rnds if r not in ("nearest", "stochastic")]
    if bad or not rnds:
        raise ValueError(f"--block-rounding must be a comma list of nearest, stochastic; got "
                         f"{roundings!r}")
    return fmts, rnds


def run(args: argparse.Namespace) -> int:
    targets = parse_targets(args.targets)
    methods = parse_methods(args.methods)
    bits = parse_bits(args.bits)
    extra = _parse_sizes(args.extra_sample_sizes)
    block_fmts, block_rnds = _parse_block(args.block_formats, args.block_rounding)
    for name in ("sample_size", "quant_values", "capture_size"):
        if getattr(args, name) < 4:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 4, got "
                             f"{getattr(args, name)}")
    if args.synthetic:
        layers = synthetic_layers(seed=args.seed)  # one tensor per layer: no staleness rows
        source = "synthetic"
    else:
        if args.steps < 2:
            raise ValueError(f"--steps must be >= 2, got {args.steps}")
        layers = capture_layers(args.model, args.dataset, args.steps, args.capture_size,
                                seed=args.seed, device=args.device, data_dir=args.data_dir,
                                progress=not args.quiet, width=args.width)
        source = f"{args.model}/{args.dataset}, {args.steps} steps"
    show = not (args.quiet or args.json)
    with torch.no_grad():
        sp = sparsity_check(layers, targets, methods, sample_size=args.sample_size,
                            extra_sample_sizes=extra, seed=args.seed, progress=show)
        fp = quantization_check(layers, bits, semantics=args.semantics, rounding=args.rounding,
                                max_values=args.quant_values, seed=args.seed, progress=show)
        blk = (block_check(layers, block_fmts, block_rnds, seed=args.seed, progress=show)
               if block_fmts else None)
    result = {"source": source, "sparsity": sp, "quantization": fp, "blocks": blk}
    out = Path(args.out)
    write_json(out / "fitcheck.json", result)
    if blk is not None:
        plot_block_check(blk, out / "fitcheck_block.png")
    if args.json:
        print(to_json({
            "source": source,
            "sparsity": {k: v for k, v in sp.items() if k != "per_layer"},
            "quantization": {k: v for k, v in fp.items() if k != "per_layer"},
            "blocks": None if blk is None else {k: v for k, v in blk.items()
                                                if k != "per_layer"},
        }))
    else:
        print(f"source: {source}")
        print(sparsity_tables(sp))
        print()
        print(quantization_tables(fp))
        print()
        print(per_layer_tables(sp, fp))
        if blk is not None:
            print()
            print(block_tables(blk))
        print(f"\nwrote {out / 'fitcheck.json'}"
              + (f" and {out / 'fitcheck_block.png'}" if blk is not None else ""))
    return 0
