"""Arguments shared by the CLI subcommands (the leading underscore keeps this out of the
subcommand list)."""

from __future__ import annotations

import argparse


def add_data_args(p: argparse.ArgumentParser, model: str = "resnet20") -> None:
    """--model, --dataset, --data-dir: what every command that trains or captures takes."""
    p.add_argument("--model", default=model, help=f"model name (default: {model})")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset (default: fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="directory of the dataset files")


def parse_targets(text: str, arg: str = "--targets") -> list[float]:
    """Comma list of target sparsities, each in (0, 1)."""
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{arg} must look like 0.5,0.8,0.9; got {text!r}") from None
    if not vals:
        raise ValueError(f"{arg} is empty: {text!r}")
    for v in vals:
        if not 0.0 < v < 1.0:
            raise ValueError(f"{arg} values must lie in (0, 1), got {v!r}")
    return vals


def parse_methods(text: str, arg: str = "--methods") -> list[str]:
    """Comma list of pruning threshold methods (``PRUNE_METHODS``)."""
    from gradcomp.compressors.pruning import PRUNE_METHODS

    vals = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in vals if m not in PRUNE_METHODS]
    if bad or not vals:
        raise ValueError(f"{arg} must be a comma list of {', '.join(PRUNE_METHODS)}; "
                         f"got {text!r}")
    return vals


def parse_bits(text: str, arg: str = "--bits") -> list[int]:
    """FP widths: a range ``4-8`` or a list ``4,6,8``, each in [3, 16]."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            bits = list(range(lo, hi + 1))
        else:
            bits = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{arg} must look like 4-8 or 4,6,8; got {text!r}") from None
    for b in bits:
        if not 3 <= b <= 16:
            raise ValueError(f"{arg} values must be in [3, 16], got {b}")
    if not bits:
        raise ValueError(f"{arg} is empty: {text!r}")
    return bits
