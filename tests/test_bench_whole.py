"""Whole-process benchmarks (bench/wholeproc.py, bench_train.py / bench_encode.py --whole-process and the spender
user's loop in bench/spender_user.py): the measurement against processes with a known peak memory and CPU time,
the spender loop's data preparation against fastspec's loader, and both modes end to end on a tiny file."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module", autouse=True)
def bench_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def _spender_imports() -> bool:
    try:
        import spender  # noqa: F401
    except Exception:
        return False
    return True


def test_run_measured_reports_peak_rss_cpu_and_the_json_result():
    from wholeproc import run_measured

    # 400 MB touched page by page, then half a second of pure-Python CPU, then a JSON line
    code = ("import json, time\nb = bytearray(400 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
            "t = time.process_time()\nwhile time.process_time() - t < 0.5: pass\nprint('log line')\n"
            "print(json.dumps({'ok': 1}))")
    r = run_measured([sys.executable, "-c", code])
    assert 400 <= r["peak_rss_mb"] < 400 + 200, r
    assert r["cpu_s"] >= 0.5 and r["wall_s"] >= 0.5 and r["result"] == {"ok": 1}
    small = run_measured([sys.executable, "-c", "pass"])
    assert small["peak_rss_mb"] < 100 and small["result"] is None


def test_run_measured_names_the_failing_command_and_its_stderr():
    from wholeproc import run_measured

    with pytest.raises(RuntimeError, match=r"exited with 3:\n.*went wrong"):
        run_measured([sys.executable, "-c", "import sys; sys.stderr.write('went wrong'); sys.exit(3)"])


def test_spender_user_reads_rows_as_fastspec_prepares_them(tmp_path):
    import h5py
    import spender_user

    from fastspec.encode import prepare
    from fastspec.h5format import SpectraFile
    from fastspec.mock import write_mock

    path = tmp_path / "m.h5"
    write_mock(path, 12, instrument="sdss", seed=3, restframe_truth=False, progress=False)
    with h5py.File(path, "r") as h, SpectraFile(str(path)) as sf:
        y, w, z = spender_user.read_rows(h, 2, 9)
        ry, rw, rz = prepare(sf.read(2, 9))
    assert (w.numpy() == 0).any()  # the mock masks sky lines: the zeroing is exercised
    np.testing.assert_array_equal(y.numpy(), ry)
    np.testing.assert_array_equal(w.numpy(), rw)
    np.testing.assert_array_equal(z.numpy(), rz)


def test_train_whole_process_mode_end_to_end(tmp_path):
    import bench_train

    out = tmp_path / "train-whole"
    assert bench_train.main(["--whole-process", "--n", "48", "--whole-batch", "16", "--cache", str(tmp_path),
                             "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    have = {(r["impl"], r["settings"]) for r in saved["rows"]}
    from wholeproc import LEAN_LABEL, default_label

    default = default_label()
    want = {("fastspec", default), ("fastspec", "fp32"), ("fastspec", LEAN_LABEL)}
    if _spender_imports():  # CI installs spender 0.3: its rows and the ratios must be there
        want |= {("spender", "default (fp32)"), ("spender", "bf16")}
        r = saved["ratios"]
        by = {(x["impl"], x["settings"]): x for x in saved["rows"]}
        sp, fs = by[("spender", "default (fp32)")], by[("fastspec", default)]
        assert r["train_speedup_default_vs_spender_default"] == pytest.approx(sp["wall_s"] / fs["wall_s"], abs=0.01)
        assert r["peak_rss_default_vs_spender_default"] == pytest.approx(fs["peak_rss_mb"] / sp["peak_rss_mb"], abs=0.01)
        lean = by[("fastspec", LEAN_LABEL)]
        assert r["peak_rss_lean_vs_spender_default"] == pytest.approx(lean["peak_rss_mb"] / sp["peak_rss_mb"], abs=0.01)
        assert sp["spectra"] == 48 - round(48 * 0.1)
    assert have == want
    for row in saved["rows"]:
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 100 and np.isfinite(row["val_loss"])
    md = out.with_suffix(".md").read_text()
    assert "peak RSS [MB]" in md and "load average" in md and "val loss default over fp32" in md


def test_encode_whole_process_mode_end_to_end(tmp_path):
    import bench_encode

    out = tmp_path / "encode-whole"
    assert bench_encode.main(["--whole-process", "--n", "40", "--cache", str(tmp_path), "--out", str(out),
                              "--accuracy-model", ""]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    by = {(r["impl"], r["settings"]): r for r in saved["rows"]}
    from wholeproc import LEAN_LABEL, default_label

    default = default_label()
    assert by[("fastspec", default)]["spectra"] == by[("fastspec", "fp32")]["spectra"] == 40
    assert by[("fastspec", LEAN_LABEL)]["spectra"] == 40
    assert by[("fastspec", "default, 64 spectra (start-up)")]["spectra"] == 64
    assert saved["ratios"]["import_torch_s"] == by[("python", "import torch only")]["wall_s"]
    assert (("spender", "default (fp32), batch 64") in by) == _spender_imports()
    assert saved["heldout_median_chi2"] is None
    assert "start-up" in out.with_suffix(".md").read_text()
