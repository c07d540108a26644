"""What the `fastspec` subcommands share: the options every command takes (`register_commands` adds them,
so no command defines them itself), finding the data files they are given, where the real spectra of a
source checkout live, and how a command reports a usage error. Commands import this, not each other (except
`demo`, whose job is to run the others through their `register` and `run`)."""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path


def add_common_options(parser) -> None:
    """The options of every command: -q/--quiet (no progress bars or messages on stdout; warnings and errors
    still go to stderr, results still go to their files, the exit code is unchanged)."""
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or messages (warnings and errors still go to stderr)")


def register_commands(subparsers, commands) -> None:
    """Register each command module's subcommand(s) on `subparsers` and give each the common options."""
    for command in commands:
        before = set(subparsers.choices)
        command.register(subparsers)
        for name in sorted(set(subparsers.choices) - before):
            add_common_options(subparsers.choices[name])


def say(args, *parts, **kwargs) -> None:
    """print() unless the command was given -q/--quiet (for messages, not for errors)."""
    if not getattr(args, "quiet", False):
        print(*parts, **kwargs)


def add_data_argument(parser) -> None:
    """The DATA... positional of commands that read spectra files; `expand_data` turns it into files."""
    parser.add_argument("data", nargs="+", help="spectra files (fastspec HDF5 or MMU), or folders of *.h5/*.hdf5")


def expand_data(items) -> list[str]:
    """Files as given; folders expanded to their *.h5 / *.hdf5 files (sorted)."""
    out = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.h5")) + glob.glob(os.path.join(item, "*.hdf5")))
            if not found:
                raise FileNotFoundError(f"{item}: folder holds no *.h5 or *.hdf5 files")
            out.extend(found)
        else:
            out.append(item)
    return out


def default_real_dir() -> Path:
    """The real spectra of a source checkout: $FASTSPEC_SHARED/data/real, else ../shared/data/real beside the
    repository (an installed fastspec ships its own sample: `fastspec.data.sample`)."""
    env = os.environ.get("FASTSPEC_SHARED")
    base = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"
    return base / "data" / "real"


def usage_error(command: str, msg: str) -> int:
    """Print `fastspec COMMAND: error: MSG` to stderr; returns exit code 2."""
    print(f"fastspec {command}: error: {msg}", file=sys.stderr)
    return 2
