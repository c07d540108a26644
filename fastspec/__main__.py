"""`python -m fastspec`: the command line (fastspec.cli), as the `fastspec` script runs it."""
import sys

from .cli import main

sys.exit(main())
