"""The `fastspec` command line: one parser with a subcommand per module of `fastspec.commands`.

Each command module has `register(subparsers)` and `run(args)`, and imports what is heavy (torch, h5py)
only inside `run`, so `--help` stays fast. The options every command takes (-q/--quiet) are added once, by
`fastspec.commands.common.register_commands`.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import (
    demo,
    download,
    encode,
    ingest,
    mock,
    outliers,
    profile,
    redshift,
    report,
    science,
    train,
    validate,
)
from .commands.common import register_commands

# Order shown in --help; the pipeline order (files → HDF5 → model → outputs).
COMMANDS = [mock, download, ingest, validate, train, encode, redshift, outliers, report, profile, science, demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastspec",
        description="Galaxy-spectrum autoencoder with fused redshift-resample kernels.",
    )
    parser.add_argument("--version", action="version", version=f"fastspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_commands(sub, COMMANDS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
