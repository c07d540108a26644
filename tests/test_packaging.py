"""What a user of an installed fastspec sees: the package built from this tree (pip, not editable) holds every
subpackage, the kernels under fastspec.kernels, the bundled real sample and the README beside it, and finds
them from outside the source tree; the sample holds the source FITS files' values (read here with astropy) and
is what bench/build_sample.py rebuilds. `.ci/wheel-check` does the same with a wheel in a fresh venv plus a
smoke run (CI and `make test` run it)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_ingest import check_sdss_row, read_h5, sdss_expected

from fastspec.data import SAMPLES, SampleError, sample
from fastspec.spectra_io import open_spectra
from fastspec.validate import validate_file

REPO = Path(__file__).resolve().parents[1]
# Everything that goes into the package; bench/, tests/ and the docs around them do not.
SOURCES = ("fastspec", "kernels", "pyproject.toml", "setup.py", "README.md", "LICENSE")

INSTALLED_CHECK = r"""
import importlib, json, sys
from pathlib import Path
import fastspec, fastspec.cli
from fastspec.data import sample
from fastspec.mock import stellar_templates
wave, flux, _ = stellar_templates()  # kcorrect's template file, found through importlib.resources
out = {"fastspec": fastspec.__file__, "sample": str(sample("sdss")), "templates": list(flux.shape)}
for name in ("fastspec.commands", "fastspec.commands.demo", "fastspec.kernels", "fastspec.kernels.resampling",
             "fastspec.loader", "fastspec.surveys", "fastspec.surveys.sdss_dr7", "fastspec.data",
             "fastspec.science", "fastspec.science.experiments.fidelity"):
    out[name] = importlib.import_module(name).__file__
out["readme"] = (Path(out["sample"]).parent / "README.md").read_text()
out["n_commands"] = len(fastspec.cli.build_parser()._subparsers._group_actions[0].choices)
print(json.dumps(out))
"""


def _setuptools_recent() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --no-deps --target` of a copy of the package sources (no build/ or egg-info leftovers)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        p = REPO / name
        (shutil.copytree(p, src / name, ignore=ignore) if p.is_dir() else shutil.copy(p, src / name))
    target = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target),
           str(src)]
    if _setuptools_recent():  # no network needed, and seconds faster
        cmd.insert(4, "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def test_installed_package_has_commands_kernels_sample_and_templates(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    # run from an empty folder: neither the checkout nor its editable install may answer the imports
    proc = subprocess.run([sys.executable, "-c", INSTALLED_CHECK], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("fastspec", "sample", "fastspec.commands", "fastspec.commands.demo", "fastspec.kernels",
                 "fastspec.kernels.resampling", "fastspec.loader", "fastspec.surveys", "fastspec.surveys.sdss_dr7",
                 "fastspec.data", "fastspec.science", "fastspec.science.experiments.fidelity"):
        assert Path(got[name]).resolve().is_relative_to(installed.resolve()), (name, got[name])
    assert Path(got["sample"]).name == SAMPLES["sdss"][0] and Path(got["sample"]).stat().st_size > 1e6
    assert "Funding for the SDSS" in got["readme"]
    assert got["templates"][0] == 5  # the mock templates come from the installed kcorrect package
    from fastspec import cli  # the source tree's parser: the installed copy has every command it has

    assert got["n_commands"] == len(cli.build_parser()._subparsers._group_actions[0].choices) >= 12
    # only the package (and the console script): no tests, bench or top-level kernels module beside it
    assert sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "fastspec"]
    assert (installed / "bin" / "fastspec").is_file()
    meta = next(installed.glob("fastspec-*.dist-info")) / "METADATA"
    text = meta.read_text()
    assert "License-Expression: MIT" in text  # SPDX string, not the deprecated table form
    # the command line runs from the installed copy too
    proc = subprocess.run([sys.executable, "-m", "fastspec", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- the sample


def test_sample_accessor_and_unknown_names():
    path = sample("sdss")
    assert path.is_file() and path == sample("SDSS ")
    with pytest.raises(SampleError, match=r"unknown sample 'desi'; known samples: 'sdss'"):
        sample("desi")
    with pytest.raises(LookupError):  # SampleError is a LookupError (and a FastspecError)
        sample("")


def test_sample_is_a_clean_compressed_fastspec_file_with_provenance():
    path = sample("sdss")
    assert 1 << 20 < path.stat().st_size < 5 << 20  # "a few MB"
    with h5py.File(path, "r") as h:
        assert h["spectrum_flux"].compression == "gzip" and h["spectrum_flux"].shuffle
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h.attrs.items()}
        files = [f.decode() for f in h["source/file"][:]]
        groups = h["source/object_group"][:]
    assert attrs["instrument"] == "sdss" and attrs["sample"] == "sdss"
    assert "Funding for the SDSS and SDSS-II" in attrs["acknowledgement"]
    assert "ed-ortizm/uRF_SDSS" in attrs["provenance_source"] and "object_group" in attrs["provenance_selection"]
    assert attrs["provenance_date"][:2] == "20"
    assert attrs["provenance_files"].split("\n") == [f.split("/")[-1] for f in files]
    assert 90 <= len(files) <= 110 and len(set(files)) == len(files)
    assert len(set(groups)) < len(groups)  # repeat observations of some galaxies are in
    rep = validate_file(str(path), z_max=0.5)
    assert rep.ok, rep.summary()
    readme = (path.parent / "README.md").read_text()
    assert "Funding for the SDSS and SDSS-II" in readme and "bench/build_sample.py" in readme


def test_sample_rows_match_the_source_fits_files_read_with_astropy(real_data_dir):
    path = sample("sdss")
    h5 = read_h5(path)
    with h5py.File(path, "r") as h:
        groups = h["source/object_group"][:]
    repeat = int(np.flatnonzero(np.bincount(np.unique(groups, return_inverse=True)[1]) > 1)[0])
    first_of_repeat = int(np.flatnonzero(np.unique(groups, return_inverse=True)[1] == repeat)[0])
    rows = sorted({0, first_of_repeat, len(h5["Z"]) - 1})
    for i in rows:
        fits_path = real_data_dir / h5["file"][i]
        check_sdss_row(h5, i, sdss_expected(fits_path, "sdss"), "sdss")
    with open_spectra(path) as f:  # and through fastspec's own reader, the loader's path
        s = f.read(rows[0], rows[0] + 1)
        np.testing.assert_array_equal(s.flux[0], h5["spectrum_flux"][rows[0]])


def test_build_script_rebuilds_the_bundled_sample(real_data_dir, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import build_sample
    finally:
        sys.path.remove(str(REPO / "bench"))
    with h5py.File(sample("sdss"), "r") as h:
        date = h.attrs["provenance_date"]
        date = date.decode() if isinstance(date, bytes) else date
    out = build_sample.build(real_data_dir.parent.parent, tmp_path, date=date)
    with h5py.File(out, "r") as new, h5py.File(sample("sdss"), "r") as old:
        assert sorted(new) == sorted(old) and dict(new.attrs).keys() == dict(old.attrs).keys()
        for k in new.attrs:
            if k != "provenance_builder":  # names the fastspec version that built it
                assert new.attrs[k] == old.attrs[k], k
        names = []
        new.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for n in names:
            np.testing.assert_array_equal(new[n][()], old[n][()], err_msg=n)
        n_rows = new["Z"].shape[0]
    readme = (tmp_path / "README.md").read_text()
    assert "Funding for the SDSS and SDSS-II" in readme and f"{n_rows} spectra of" in readme
