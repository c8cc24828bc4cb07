"""Arguments shared by the CLI subcommands (the leading underscore keeps this out of the
subcommand list)."""

from __future__ import annotations

import argparse


def add_data_args(p: argparse.ArgumentParser, model: str = "resnet20") -> None:
    """--model, --dataset, --data-dir: what every command that trains or captures takes."""
    p.add_argument("--model", default=model, help=f"model name (default: {model})")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset (default: fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="directory of the dataset files")
