"""The survey file formats ingest reads, one module each (the interface is in `fastspec.surveys.base`).

Adding a survey is adding its module and naming it in `SURVEYS`.
"""
from __future__ import annotations

from . import desi, sdss, sdss_dr7

# Asked in this order whether they recognise a file (the first that does reads it). With instrument "auto",
# a tie between grid families goes to the family of the earlier survey.
SURVEYS = (sdss_dr7, sdss, desi)


def survey_of(kind: str):
    """The survey module that reads (or recognises) files of `kind`."""
    for s in SURVEYS:
        if kind in s.KINDS or kind in s.CATALOG_KINDS:
            return s
    raise KeyError(f"no survey reads files of kind {kind!r}")


__all__ = ["SURVEYS", "survey_of"]
