"""The base class of every error fastspec raises on purpose, so a caller can catch them all in one place.

Each module keeps its own subclass (`SpectraFormatError`, `ModelConfigError`, …) next to the code that raises
it; they also derive from the builtin their callers used to catch (ValueError, RuntimeError), so nothing
that caught those breaks. Messages name the file, row and field where there is one.
"""
from __future__ import annotations


class FastspecError(Exception):
    """Something fastspec refused or could not do; the message says what and where."""


__all__ = ["FastspecError"]
