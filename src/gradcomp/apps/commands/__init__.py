"""CLI subcommands: every module here defining ``add_parser(subparsers)`` and ``run(args)``
is a ``gradcomp <name>`` subcommand (discovered by ``gradcomp.apps.cli``)."""
