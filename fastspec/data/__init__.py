"""Data shipped inside the package, found through importlib.resources (so it works from a wheel, a zip or
an editable install alike).

`sample(name)` returns the path of a bundled spectra file in the fastspec HDF5 layout:

    sdss   ~100 real SDSS DR14 galaxy spectra (spec-lite, SDSS-I/II spectrograph) on the SDSS grid,
           gzip-compressed; provenance and the SDSS acknowledgement are in the file's attributes and in
           README.md beside it. Rebuilt by bench/build_sample.py from ../shared/data/real/sdss-dr14.
"""
from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path

from ..errors import FastspecError

# name -> (file in this package, one line on what it is)
SAMPLES = {
    "sdss": ("sdss_sample.h5", "real SDSS DR14 galaxy spectra on the SDSS grid (bench/build_sample.py)"),
}


# What SDSS asks publications using its data to include (classic.sdss.org/collaboration/credits.html, for the
# SDSS-I/II spectra in the sample; they were distributed with DR14, whose SDSS-IV acknowledgement is at
# www.sdss.org/collaboration/citing-sdss).
SDSS_ACKNOWLEDGEMENT = (
    "Funding for the SDSS and SDSS-II has been provided by the Alfred P. Sloan Foundation, the Participating "
    "Institutions, the National Science Foundation, the U.S. Department of Energy, the National Aeronautics and "
    "Space Administration, the Japanese Monbukagakusho, the Max Planck Society, and the Higher Education Funding "
    "Council for England. The SDSS Web Site is http://www.sdss.org/.\n\n"
    "The SDSS is managed by the Astrophysical Research Consortium for the Participating Institutions. The "
    "Participating Institutions are the American Museum of Natural History, Astrophysical Institute Potsdam, "
    "University of Basel, University of Cambridge, Case Western Reserve University, University of Chicago, Drexel "
    "University, Fermilab, the Institute for Advanced Study, the Japan Participation Group, Johns Hopkins "
    "University, the Joint Institute for Nuclear Astrophysics, the Kavli Institute for Particle Astrophysics and "
    "Cosmology, the Korean Scientist Group, the Chinese Academy of Sciences (LAMOST), Los Alamos National "
    "Laboratory, the Max-Planck-Institute for Astronomy (MPIA), the Max-Planck-Institute for Astrophysics (MPA), "
    "New Mexico State University, Ohio State University, University of Pittsburgh, University of Portsmouth, "
    "Princeton University, the United States Naval Observatory, and the University of Washington.\n\n"
    "The spectra were distributed with SDSS Data Release 14 (SDSS-IV); publications should also include the "
    "SDSS-IV acknowledgement given at https://www.sdss.org/collaboration/citing-sdss/."
)


class SampleError(FastspecError, LookupError):
    """An unknown sample name, or a bundled file missing from this installation."""


def sample(name: str = "sdss") -> Path:
    """Path of the bundled spectra file `name` (see SAMPLES); open it with fastspec.spectra_io.open_spectra."""
    key = str(name).strip().lower()
    if key not in SAMPLES:
        known = ", ".join(f"{k!r} ({what})" for k, (_, what) in SAMPLES.items())
        raise SampleError(f"unknown sample {name!r}; known samples: {known}")
    filename = SAMPLES[key][0]
    path = resources.files(__name__) / filename
    if not path.is_file():
        raise SampleError(f"sample {key!r}: {filename} is missing from this fastspec installation "
                          f"({resources.files(__name__)}); reinstall fastspec, or rebuild it with "
                          "bench/build_sample.py in a source checkout")
    if isinstance(path, Path):  # installed on disk (wheel, folder, editable): the usual case
        return path
    # Imported from a zip: h5py needs a real file, extracted once for the life of the process.
    return Path(_EXTRACTED.enter_context(resources.as_file(path)))


_EXTRACTED = contextlib.ExitStack()
atexit.register(_EXTRACTED.close)
