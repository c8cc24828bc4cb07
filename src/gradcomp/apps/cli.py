"""``gradcomp`` command line: one subcommand per module in ``gradcomp.apps.commands``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from gradcomp import __version__
from gradcomp.apps import commands
from gradcomp.apps.distributed import EXIT_INTERRUPTED
from gradcomp.apps.train import PeerTimeoutError


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcomp",
        description="Training with compressed gradients: analysis, formats, sparsity, training.",
    )
    parser.add_argument("--version", action="version", version=f"gradcomp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _command_modules():
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args._run(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Bad input (unknown names, missing data, out-of-range options): one clear line.
        print(f"gradcomp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PeerTimeoutError as exc:  # a data-parallel peer stopped answering (torchrun)
        print(f"gradcomp {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a Ctrl-C outside the training loop (loading, evaluation)
        print(f"gradcomp {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
