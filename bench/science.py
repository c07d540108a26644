"""Science check (issue 6): `fastspec science` with its results written to bench/results.

    .venv/bin/python bench/science.py --quick          # < 20 min on an idle 2-core CPU
    .venv/bin/python bench/science.py --full           # a GPU: the paper's architecture, 100k mocks

Same options as `fastspec science` (fastspec/commands/science.py); the machine record comes from
bench/common.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, machine_info  # noqa: E402

from fastspec.commands import science as science_cmd  # noqa: E402
from fastspec.commands.common import add_common_options  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/science.py", description=__doc__.split("\n\n")[0])
    science_cmd.add_arguments(p, default_out=str(RESULTS))
    add_common_options(p)  # -q/--quiet, as every fastspec command has
    args = p.parse_args(argv)
    return science_cmd.run(args, machine=machine_info())


if __name__ == "__main__":
    sys.exit(main())
