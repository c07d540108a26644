"""Bulk encoding: latents equal the model's own encoding of each spectrum (rows in input order, columns
copied from the inputs as plain h5py reads them), χ² against a float64 numpy reference, resume after
`kill -9` bitwise equal to an uninterrupted run, sharding over two processes merged in order, and the
errors users see."""
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from fastspec.kernels import use_backend

from fastspec import encode as E
from fastspec.h5format import SpectraFormatError, SpectraWriter
from fastspec.instruments import get_instrument
from fastspec.model import ModelConfig, SpectrumAutoencoder, load_model

SDSS = get_instrument("sdss")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small conv stacks keep CPU tests fast; the pipeline does not depend on the layer sizes.
TINY = dict(instrument="sdss", n_latent=5, encoder_channels=(8, 16, 32), encoder_hidden=(16,),
            decoder_hidden=(16, 64))


def write_spectra(path, n, seed, id0, instrument="sdss", nan_row=None):
    """Continuum + redshifted emission lines + noise, with masked pixels and an empty blue edge."""
    inst = get_instrument(instrument)
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.02, 0.45, n)
    wave = inst.wave_obs[None, :] / (1 + z[:, None])
    flux = 1 + 0.3 * np.sin(wave / 700.0 + rng.uniform(0, 6, (n, 1)))
    for line in (3727.0, 4861.0, 5007.0, 6563.0):
        flux += rng.uniform(0, 3, (n, 1)) * np.exp(-0.5 * ((wave - line) / 3.0) ** 2)
    ivar = np.full((n, inst.L), 400.0)
    flux += rng.standard_normal((n, inst.L)) / 20.0
    mask = rng.random((n, inst.L)) < 0.03
    ivar[:, :9] = 0.0
    flux[mask] = 1e6  # garbage under the mask: must never reach the encoder
    if nan_row is not None:
        flux[nan_row, 1234] = np.nan
    with SpectraWriter(path, instrument) as w:
        w.write(flux, ivar, mask, z, np.full(n, 1e-4), np.arange(id0, id0 + n))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("encode")
    torch.manual_seed(0)
    model = SpectrumAutoencoder(ModelConfig(**TINY)).eval()
    model.save(d / "model.pt")
    files = [write_spectra(d / "a.h5", 61, seed=1, id0=100), write_spectra(d / "b.h5", 37, seed=2, id0=9000)]
    return d, str(d / "model.pt"), files


def read_inputs(paths):
    """(y, w, z, object_id, source_file, source_row) with plain h5py, masked pixels zeroed as in training."""
    cols = {k: [] for k in ("y", "w", "Z", "object_id", "source_file", "source_row")}
    for i, p in enumerate(paths):
        with h5py.File(p, "r") as h:
            flux, ivar, mask = h["spectrum_flux"][:], h["spectrum_ivar"][:], h["spectrum_mask"][:]
            w = np.where(mask | (ivar <= 0), 0.0, ivar).astype(np.float64)
            cols["y"].append(np.where(w > 0, flux, 0.0).astype(np.float64))
            cols["w"].append(w)
            cols["Z"].append(h["Z"][:])
            cols["object_id"].append(h["object_id"][:])
            cols["source_file"].append(np.full(len(w), i))
            cols["source_row"].append(np.arange(len(w)))
    return {k: np.concatenate(v) for k, v in cols.items()}


def read_latents(path):
    with E.LatentsFile(path) as lf:
        return {k: lf[k] for k in lf.h5 if k != "source_files"}, lf.attrs, lf.source_files


def test_latents_and_chi2_match_references(data):
    d, model_path, files = data
    model = load_model(model_path)
    out = d / "full.h5"
    with use_backend("torch"):
        stats = E.encode_files(model, files, out, batch_size=16, flush_rows=32, chi2=True, restframe=True,
                               progress=False)
    assert stats.n == 98 and not os.path.exists(E.partial_path(out))
    got, attrs, sources = read_latents(out)
    ref = read_inputs(files)
    assert attrs["complete"] and attrs["rows_done"] == 98 and attrs["n_latent"] == 5
    assert sources == files
    for k in ("Z", "object_id", "source_file", "source_row"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert got["object_id"].dtype == np.uint64

    # latents: the model on each spectrum alone, in float64 (rows in order, masked garbage never seen)
    m64 = SpectrumAutoencoder.load(model_path).double().eval()
    with torch.no_grad(), use_backend("torch"):
        s_ref = m64.encode(torch.from_numpy(ref["y"]), torch.from_numpy(ref["Z"])).numpy()
        x_ref = m64.decode(torch.from_numpy(s_ref)).numpy()
    np.testing.assert_allclose(got["latents"], s_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["spec_rest"], x_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["wave_rest"], model.wave_rest.double().numpy())

    np.testing.assert_allclose(got["chi2"], chi2_reference(model_path, ref, s_ref), rtol=1e-3)
    assert "reduced chi2" in attrs["chi2_definition"]


def chi2_reference(model_path, ref, latents):
    """Reduced χ² of latents: numpy interpolation of the float64 restframe model (the linear-grid TINY
    model), valid where λ/(1+z) lies on wave_rest."""
    m64 = SpectrumAutoencoder.load(model_path).double().eval()
    with torch.no_grad():
        x_ref = m64.decode(torch.as_tensor(latents, dtype=torch.float64)).numpy()
    wave_rest = m64.wave_rest.double().numpy()
    chi2 = np.empty(len(latents))
    for n in range(len(latents)):
        lam = SDSS.wave_obs / (1 + ref["Z"][n])
        valid = (lam >= wave_rest[0]) & (lam <= wave_rest[-1])
        y_model = np.interp(lam, wave_rest, x_ref[n])
        dof = np.sum(valid & (ref["w"][n] > 0)) - m64.n_latent
        chi2[n] = np.sum(ref["w"][n] * valid * (ref["y"][n] - y_model) ** 2) / dof
    return chi2


def test_refine_writes_refined_latents_and_resumes(data):
    d, model_path, files = data
    model = load_model(model_path)
    ref = read_inputs(files)
    kw = dict(batch_size=16, flush_rows=32, progress=False)
    with use_backend("torch"):
        E.encode_files(model, files, d / "onepass.h5", chi2=True, **kw)
        E.encode_files(model, files, d / "refined.h5", chi2=True, refine=20, **kw)
    one, got = read_latents(d / "onepass.h5")[0], read_latents(d / "refined.h5")[0]
    np.testing.assert_allclose(got["chi2_before"], one["chi2"], rtol=1e-5)
    # χ² of the latents written, by the float64 reference; `chi2` describes the same latents
    np.testing.assert_allclose(got["chi2_after"], chi2_reference(model_path, ref, got["latents"]), rtol=1e-3)
    np.testing.assert_allclose(got["chi2"], got["chi2_after"], rtol=1e-5)
    assert np.all(got["chi2_after"] <= got["chi2_before"] * (1 + 1e-5))
    assert np.mean(got["chi2_after"] < got["chi2_before"] * 0.999) > 0.9  # (an untrained model gains little)
    assert got["refine_steps"].dtype == np.int32 and 0 < got["refine_steps"].max() <= 20
    assert not np.allclose(got["latents"], one["latents"])

    # interrupted after 48 rows: resumes to the same numbers; another step budget is another job
    out = d / "refined-resumed.h5"
    with use_backend("torch"):
        E.encode_files(model, files, out, refine=20, **kw)
        os.replace(out, E.partial_path(out))
        with h5py.File(E.partial_path(out), "r+") as h:
            h.attrs.modify("complete", False)
            h.attrs.modify("rows_done", np.int64(48))
            h["chi2_after"][48:] = np.nan
        assert E.encode_files(model, files, out, refine=20, **kw).rows_skipped == 48
        np.testing.assert_array_equal(read_latents(out)[0]["chi2_after"], got["chi2_after"])
        assert E.encode_files(model, files, out, refine=5, **kw).rows_skipped == 0
        with pytest.raises(E.EncodeError, match="refine steps must be ≥ 0"):
            E.encode_files(model, files, out, refine=-1, **kw)


def test_bf16_close_to_fp32_and_fp16_needs_cuda(data):
    d, model_path, files = data
    model = load_model(model_path)
    with use_backend("torch"):
        E.encode_files(model, files[:1], d / "fp32.h5", batch_size=32, progress=False)
        E.encode_files(model, files[:1], d / "bf16.h5", batch_size=32, precision="bf16", progress=False)
    a, b = read_latents(d / "fp32.h5")[0]["latents"], read_latents(d / "bf16.h5")[0]["latents"]
    # bf16 keeps 8 significant bits: a few per cent of the latents' size
    np.testing.assert_allclose(b, a, rtol=0, atol=0.03 * np.abs(a).max())
    assert not np.array_equal(a, b)  # autocast really ran in bf16
    with pytest.raises(E.EncodeError, match="fp16 needs a CUDA device"):
        E.encode_files(model, files[:1], d / "fp16.h5", precision="fp16", progress=False)


def test_resume_from_partial_equals_uninterrupted(data):
    """In-process resume: a partial file with rows past rows_done garbled is finished to the same bytes;
    a partial file of another model is discarded and redone."""
    d, model_path, files = data
    model = load_model(model_path)
    kw = dict(batch_size=8, flush_rows=16, chi2=True, progress=False)
    with use_backend("torch"):
        E.encode_files(model, files, d / "ref.h5", **kw)
        out = d / "resumed.h5"
        E.encode_files(model, files, out, **kw)
        os.replace(out, E.partial_path(out))
        with h5py.File(E.partial_path(out), "r+") as h:  # as if killed after 48 rows
            h.attrs.modify("complete", False)
            h.attrs.modify("rows_done", np.int64(48))
            h["latents"][48:] = np.nan
            h["chi2"][60:] = -1
        with pytest.raises(E.EncodeError, match="incomplete output .48 of 98 rows"):
            E.LatentsFile(E.partial_path(out))
        stats = E.encode_files(model, files, out, **kw)
        assert stats.rows_skipped == 48 and stats.n == 50
        ref, got = read_latents(d / "ref.h5")[0], read_latents(out)[0]
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)

        # a different model's partial output is not resumed
        other = SpectrumAutoencoder(ModelConfig(**TINY)).eval()
        os.replace(out, E.partial_path(out))
        with h5py.File(E.partial_path(out), "r+") as h:
            h.attrs.modify("complete", False)
        stats = E.encode_files(other, files, out, **kw)
        assert stats.rows_skipped == 0 and stats.n == 98
        assert not np.allclose(read_latents(out)[0]["latents"], ref["latents"])


def _cli(*args, env=None):
    # fp32: these runs are compared bit for bit with fp32 references (the default, auto, is tested on its own)
    extra = [] if "--precision" in args else ["--precision", "fp32"]
    return [sys.executable, "-m", "fastspec", "encode", *map(str, args), *extra], {**os.environ, **(env or {})}


def test_default_precision_is_bf16_where_the_cpu_has_it(data, tmp_path):
    from fastspec import cli
    from fastspec.train import resolve_precision

    d, model_path, files = data
    out = tmp_path / "auto.h5"
    assert cli.main(["encode", model_path, files[0], "-o", str(out), "--backend", "torch", "-q"]) == 0
    want = resolve_precision("auto", torch.device("cpu"))
    with E.LatentsFile(out) as f:
        assert f.attrs["precision"] == want
    ref = tmp_path / "ref.h5"
    with use_backend("torch"):
        E.encode_files(load_model(model_path), files[:1], ref, batch_size=64, precision=want, progress=False)
    np.testing.assert_allclose(read_latents(out)[0]["latents"], read_latents(ref)[0]["latents"], rtol=1e-6, atol=1e-6)


def _rows_done(path):
    try:  # the writer holds the file: read without HDF5's lock, retry on a torn read
        with h5py.File(path, "r", locking=False) as h:
            return int(h.attrs["rows_done"])
    except Exception:
        return -1


def test_kill9_then_rerun_equals_uninterrupted(data, tmp_path):
    d, model_path, _ = data
    n_total = 300  # 150 flushed blocks: a wide window to kill in, even on a fast machine
    files = [write_spectra(tmp_path / "kill.h5", n_total, seed=5, id0=7)]
    out = tmp_path / "latents.h5"
    args = [model_path, *files, "-o", out, "--batch-size", 2, "--flush-rows", 2, "--backend", "torch",
            "--threads", 1, "--chi2", "-q"]
    cmd, env = _cli(*args)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = E.partial_path(out)
    killed_at = -1
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        done = _rows_done(partial) if os.path.exists(partial) else -1
        if done >= 4:
            proc.send_signal(signal.SIGKILL)
            killed_at = done
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert killed_at >= 4, f"encode finished or failed before it could be killed: {proc.stderr.read().decode()}"
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out), "a killed run must not leave a file under the final name"
    with pytest.raises(E.EncodeError, match="incomplete output"):
        E.LatentsFile(partial)
    assert _rows_done(partial) < n_total

    cmd, env = _cli(*args[:-1])  # with messages this time
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    resumed = re.search(rf"resuming after (\d+) of {n_total} spectra", res.stderr)
    assert resumed and int(resumed.group(1)) >= killed_at, res.stderr
    assert not os.path.exists(partial)

    model = load_model(model_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_backend("torch"):
            E.encode_files(model, files, tmp_path / "ref.h5", batch_size=2, flush_rows=2, chi2=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    ref, got = read_latents(tmp_path / "ref.h5")[0], read_latents(out)[0]
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_two_processes_torchrun_env_then_rank0_merges(data, tmp_path):
    d, model_path, files = data
    out = tmp_path / "sharded.h5"
    procs = []
    for rank in range(2):
        cmd, env = _cli(model_path, *files, "-o", out, "--batch-size", 8, "--backend", "torch", "--threads", 1,
                        "--restframe", "-q", env={"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        p.wait(timeout=120)
        assert p.returncode == 0, p.stderr.read().decode()
    assert E.find_shards(out) == [], "rank 0 removes the shards after merging"
    got, attrs, _ = read_latents(out)
    assert attrs["merged_from"] == 2 and attrs["row_start"] == 0 and attrs["row_stop"] == 98

    model = load_model(model_path)
    with use_backend("torch"):
        E.encode_files(model, files, tmp_path / "single.h5", batch_size=8, restframe=True, progress=False)
    ref, ref_attrs, _ = read_latents(tmp_path / "single.h5")
    assert attrs["fingerprint"] == ref_attrs["fingerprint"]
    for k in ("Z", "object_id", "source_file", "source_row", "wave_rest"):
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # shard boundaries change batch composition, so only rounding may differ
    np.testing.assert_allclose(got["latents"], ref["latents"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["spec_rest"], ref["spec_rest"], rtol=1e-5, atol=1e-6)


def test_explicit_shards_merge_and_merge_errors(data, tmp_path):
    d, model_path, files = data
    model = load_model(model_path)
    out = tmp_path / "lat.h5"
    with use_backend("torch"):
        for i in (0, 2):
            E.encode_files(model, files, out, shard=(i, 3), batch_size=16, progress=False)
        with pytest.raises(E.EncodeError, match=r"1 of 3 shards not finished: .*lat\.h5\.shard-1-of-3"):
            E.merge_shards(out, progress=False)
        E.encode_files(model, files, out, shard=(1, 3), batch_size=16, progress=False)
    assert E.merge_shards(out, progress=False) == str(out)
    got = read_latents(out)[0]
    np.testing.assert_array_equal(got["object_id"], read_inputs(files)["object_id"])
    with use_backend("torch"):  # the merged file is this job's output: nothing to redo
        assert E.encode_files(model, files, out, shard=(1, 3), batch_size=16, progress=False).already_complete

        # a shard of another job (different options) is refused
        E.encode_files(model, files, tmp_path / "mix.h5", shard=(0, 2), batch_size=16, progress=False)
        E.encode_files(model, files, tmp_path / "mix.h5", shard=(1, 2), batch_size=16, chi2=True, progress=False)
    with pytest.raises(E.EncodeError, match="shard of a different job"):
        E.merge_shards(tmp_path / "mix.h5", progress=False)
    with pytest.raises(E.EncodeError, match="no finished shard files"):
        E.merge_shards(tmp_path / "none.h5", progress=False)


def test_input_errors_name_file_row_and_field(data, tmp_path):
    d, model_path, files = data
    model = load_model(model_path)
    bad = write_spectra(tmp_path / "bad.h5", 12, seed=3, id0=0, nan_row=7)
    with use_backend("torch"), pytest.raises(SpectraFormatError, match=r"bad\.h5: row 7, field spectrum_flux"):
        E.encode_files(model, [files[1], bad], tmp_path / "o.h5", batch_size=4, progress=False)
    nan_z = write_spectra(tmp_path / "nan_z.h5", 6, seed=4, id0=0)
    with h5py.File(nan_z, "r+") as h:
        h["Z"][3] = np.nan
    with use_backend("torch"), pytest.raises(E.EncodeError, match=r"nan_z\.h5: row 3, field Z: not a finite"):
        E.encode_files(model, [files[1], nan_z], tmp_path / "o.h5", batch_size=4, progress=False)
    desi = tmp_path / "desi.h5"
    with SpectraWriter(desi, "desi") as w:
        L = get_instrument("desi").L
        w.write(np.ones((2, L)), np.ones((2, L)), np.zeros((2, L), bool), [0.1, 0.2], [0, 0], [1, 2])
    with pytest.raises(E.EncodeError, match=r"desi\.h5: spectra of instrument 'desi', but the model was trained"):
        E.encode_files(model, [desi], tmp_path / "o.h5", progress=False)
    with pytest.raises(E.EncodeError, match="missing.h5: input file not found"):
        E.encode_files(model, [tmp_path / "missing.h5"], tmp_path / "o.h5", progress=False)
    assert not os.path.exists(tmp_path / "o.h5")


def test_cli_errors(data, tmp_path, capsys):
    from fastspec import cli

    d, model_path, files = data
    assert cli.main(["encode", str(tmp_path / "nope.pt"), files[0], "-o", str(tmp_path / "o.h5"), "-q"]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert cli.main(["encode", model_path, files[0], "-o", str(tmp_path / "o.h5"), "--precision", "fp16",
                     "--device", "cpu", "-q"]) == 1
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert cli.main(["encode", model_path, files[0], "-o", str(tmp_path / "o.h5"), "--shard", "2/2"]) == 2
    assert "need 0 <= i < n" in capsys.readouterr().err
    assert cli.main(["encode", "--merge", model_path, "-o", str(tmp_path / "o.h5")]) == 2
    assert "--merge takes only -o OUT" in capsys.readouterr().err
