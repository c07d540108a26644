"""The `fastspec` subcommands, one module each with `register(subparsers)` and `run(args)`; what they share
is in `common`. The CLI (fastspec.cli) lists them."""
