"""-q/--quiet, the option every command takes (fastspec.commands.common.register_commands adds it): no progress
bars or messages, results still written, warnings and errors still on stderr, exit codes unchanged. The demo
run here also checks that `fastspec demo` reports on the real sample shipped with the package by default."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fastspec import cli
from fastspec.h5format import SpectraWriter


def _subcommands():
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_command_takes_quiet_once():
    commands = _subcommands()
    assert set(commands) == {"mock", "download", "ingest", "validate", "train", "encode", "report", "profile",
                             "science", "demo", "redshift", "outliers"}
    for name, sub in commands.items():
        assert "-q, --quiet" in sub.format_help(), name
        assert sub.get_default("quiet") is False, name


def test_mock_quiet_prints_nothing(tmp_path, capfd):
    assert cli.main(["mock", "-n", "8", "-o", str(tmp_path / "loud.h5")]) == 0
    loud = capfd.readouterr()
    assert "wrote 8 sdss mock spectra" in loud.out
    assert cli.main(["mock", "-n", "8", "-o", str(tmp_path / "m.h5"), "-q"]) == 0
    assert capfd.readouterr() == ("", "")
    assert (tmp_path / "m.h5").stat().st_size > 0


def test_ingest_quiet_keeps_the_warning_about_skipped_files(real_data_dir, tmp_path, capfd):
    files = sorted((real_data_dir / "sdss").glob("spec-0266-*.fits"))[:2]
    bad = tmp_path / "notes.fits"
    bad.write_bytes(b"not a FITS file at all" * 200)
    out = tmp_path / "i.h5"
    assert cli.main(["ingest", *map(str, files), "-o", str(out), "-j", "1", "-q"]) == 0
    assert capfd.readouterr() == ("", "")
    assert out.stat().st_size > 0
    out2 = tmp_path / "i2.h5"
    assert cli.main(["ingest", *map(str, files), str(bad), "-o", str(out2), "-j", "1", "-q"]) == 0
    cap = capfd.readouterr()
    assert cap.out == "" and "1 file(s) not read" in cap.err
    # nothing ingested: the reasons (the summary) are the error, so they reach stderr
    assert cli.main(["ingest", str(bad), "-o", str(tmp_path / "none.h5"), "-q"]) == 1
    cap = capfd.readouterr()
    assert cap.out == "" and "notes.fits" in cap.err and "nothing could be ingested" in cap.err


def test_validate_quiet_reports_only_problems_on_stderr(tmp_path, capfd):
    rng = np.random.default_rng(0)
    n, L = 4, 3921

    def write(path, z):
        with SpectraWriter(path, "sdss") as w:
            w.write(rng.normal(1, 0.1, (n, L)), np.ones((n, L)), np.zeros((n, L), bool), z, np.full(n, 1e-4),
                    np.arange(n))

    write(tmp_path / "ok.h5", [0.1, 0.2, 0.3, 0.4])
    write(tmp_path / "bad.h5", [0.1, 0.2, 0.9, 0.4])
    assert cli.main(["validate", str(tmp_path / "ok.h5"), "--z-max", "0.5", "-q"]) == 0
    assert capfd.readouterr() == ("", "")
    assert cli.main(["validate", str(tmp_path / "ok.h5"), str(tmp_path / "bad.h5"), "--z-max", "0.5", "-q"]) == 1
    cap = capfd.readouterr()
    assert cap.out == "" and "bad.h5" in cap.err and "ok.h5" not in cap.err


def test_profile_quiet(tmp_path, capfd):
    data = tmp_path / "m.h5"
    assert cli.main(["mock", "-n", "16", "-o", str(data), "-q"]) == 0
    rc = cli.main(["profile", str(data), "-o", str(tmp_path / "prof"), "--steps", "1", "--warmup", "0",
                   "--backend", "numba", "--batch-size", "8", "--workers", "0", "-q"])
    assert rc == 0
    assert capfd.readouterr().out == ""
    assert "numba" in json.loads((tmp_path / "prof" / "profile.json").read_text())


def test_demo_without_real_dir_fails_loudly_on_an_empty_one(tmp_path, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["demo", "-o", str(tmp_path / "d"), "--real-dir", str(empty)]) == 2
    assert "found no sdss/spec-*.fits or desi/coadd-*.fits" in capfd.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before any work


@pytest.mark.slow
def test_demo_quiet_uses_the_bundled_sample(tmp_path, capfd):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "-o", str(out), "-n", "48", "--steps", "2", "--batch-size", "16", "--precision", "fp32",
                   "-q"])
    assert rc == 0
    assert capfd.readouterr().out == ""
    summary = json.loads((out / "report-real" / "summary.json").read_text())
    assert "sdss_sample.h5" in json.dumps(summary)
    assert (out / "latents-real.h5").stat().st_size > 0
    assert not (out / "real-sdss.h5").exists()  # nothing ingested: the sample is already a spectra file
    shutil.rmtree(out)
