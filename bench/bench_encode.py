"""Encoding throughput, file → latents on file: `fastspec encode` side by side with spender 0.3's encoder.

Both encode the same mock SDSS file with the same weights (spender's architecture: `ModelConfig.spender`,
weights copied with `SpectrumAutoencoder.from_spender`), and both write latents + Z + object_id to HDF5:

* fastspec: `fastspec.encode.encode_files` as `fastspec encode` runs it — the streaming loader (block reads,
  background workers on CUDA, pinned memory, copy on a side stream), inference mode, optional autocast, the
  model's fused conv blocks, a writer thread, and on CPU freed memory kept in the process between batches.
* spender: what a spender user writes around `SpectrumAutoencoder.encode` (spender has no file pipeline):
  read a block with h5py, zero the masked pixels, copy to the device, `encode` under `torch.no_grad()`
  (optionally inside `torch.autocast`), write the latents with h5py — one step after the other; timed in a
  fresh process, with the default allocator a spender user has.

The table says where the time goes. spender's steps add up to its total. fastspec's overlap: "read" is the time
the compute thread waited for the loader (reading not hidden by prefetch), "write" is the writer thread's busy
time (hidden), and the "alone" rows time each stage by itself (loader without compute; encoder on a batch
already on the device).

    python bench/bench_encode.py                 # CPU: 1024 spectra, fp32 and bf16
    python bench/bench_encode.py --n 20000       # on a GPU machine: cuda, batch 4096 (file in page cache)

`--whole-process` measures what a user sees instead: `fastspec encode MODEL FILE -o OUT` with its defaults beside
the loop a spender 0.3 user writes (bench/spender_user.py), each a fresh process timed from spawn to exit with its
peak RSS (bench/wholeproc.py), on 8192 mock spectra; plus the start-up cost and the held-out χ² with fp32 and bf16.

Results: bench/results/encode.json (CPU) or encode-cuda.json, with machine info; encode-whole.* for --whole-process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mock_split  # noqa: E402
from common import machine_info, mock_sdss_file, print_table, spender_sdss_model, write_results  # noqa: E402

from fastspec import encode as E  # noqa: E402
from fastspec.h5format import SpectraFile  # noqa: E402
from fastspec.model import ModelConfig, SpectrumAutoencoder  # noqa: E402

Z_MAX = 0.5


def spender_model(device):
    """spender 0.3's SDSS autoencoder as its train_sdss.py builds it; None if spender does not import."""
    try:
        model, _ = spender_sdss_model(0, Z_MAX)
    except Exception as err:  # spender needs nflows etc.; the benchmark runs without it
        print(f"spender not importable ({err.__class__.__name__}: {err}); fastspec rows only", flush=True)
        return None
    return model.to(device).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spender_encode_file(model, path: str, out: str, batch_size: int, device, dtype=None) -> dict:
    """The plain sequential loop around spender's `encode`; returns seconds per step."""
    t = dict(read=0.0, copy=0.0, compute=0.0, write=0.0)
    t_all = time.perf_counter()
    tmp = out + ".tmp"
    with SpectraFile(path) as sf, h5py.File(tmp, "w") as h:
        n = len(sf)
        lat = h.create_dataset("latents", (n, model.encoder.n_latent), np.float32)
        zs = h.create_dataset("Z", (n,), np.float64)
        ids = h.create_dataset("object_id", (n,), np.uint64)
        for a in range(0, n, batch_size):
            t0 = time.perf_counter()
            b = sf.read(a, a + batch_size)
            y, w, z = E.prepare(b)
            t1 = time.perf_counter()
            yt = torch.from_numpy(y).to(device)
            _sync(device)
            t2 = time.perf_counter()
            with torch.no_grad(), (torch.autocast(device.type, dtype=dtype) if dtype else _null()):
                s = model.encode(yt)
            s = s.float().cpu().numpy()
            t3 = time.perf_counter()
            lat[a:a + len(s)] = s
            zs[a:a + len(s)] = b.z
            ids[a:a + len(s)] = b.object_id
            t4 = time.perf_counter()
            t["read"] += t1 - t0
            t["copy"] += t2 - t1
            t["compute"] += t3 - t2
            t["write"] += t4 - t3
    os.replace(tmp, out)
    t["total"] = time.perf_counter() - t_all
    return t


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def spender_child(args, path, out_dir, precisions, batch_size) -> dict:
    """Time spender in a fresh process: its allocator as a spender user has it (fastspec encode keeps freed
    memory in the process, which would speed spender up too if it ran here)."""
    cmd = [sys.executable, __file__, "--spender-child", path, "--out-dir", str(out_dir), "--device", args.device,
           "--batch-size", str(batch_size), "--precisions", ",".join(precisions)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"spender child failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_spender_child(args) -> int:
    device = torch.device(args.device)
    sp = spender_model(device)
    times = {}
    for precision in [s.strip() for s in args.precisions.split(",") if s.strip()]:
        dtype = E.PRECISIONS[precision]
        with torch.no_grad(), (torch.autocast(device.type, dtype=dtype) if dtype else _null()):
            sp.encode(torch.zeros(2, 3921, device=device))  # warm-up
        times[precision] = spender_encode_file(sp, args.spender_child, str(Path(args.out_dir) /
                                               f"spender-{precision}.h5"), args.batch_size, device, dtype)
    print(json.dumps(times))
    return 0


def loader_alone(path: str, batch_size: int, device, workers: int) -> float:
    """Seconds for the loader alone (read + prepare + copy to the device), as encode_files configures it."""
    from fastspec.loader import SpectraLoader

    t0 = time.perf_counter()
    loader = SpectraLoader([path], batch_size=batch_size, block_rows=min(1024, batch_size),
                           shuffle_blocks=max(1, -(-batch_size // 1024)), shuffle=False, num_workers=workers,
                           prefetch=2, device=device, drop_last=False, persistent_workers=False)
    n = 0
    for b in loader:
        n += len(b.z)
    _sync(device)
    loader.close()
    return time.perf_counter() - t0


def compute_alone(model, path: str, n: int, batch_size: int, device, precision: str) -> float:
    """Seconds to encode n spectra from a batch already on the device (the encoder's own speed)."""
    with SpectraFile(path) as sf:
        y, w, z = E.prepare(sf.read(0, batch_size))
    y, w, z = (torch.from_numpy(a).to(device) for a in (y, w, z))
    E.encode_batch(model, y, w, z, precision)  # warm-up (kernels compile, caches fill)
    _sync(device)
    reps = max(1, round(n / batch_size))
    t0 = time.perf_counter()
    for _ in range(reps):
        E.encode_batch(model, y, w, z, precision)
    _sync(device)
    return (time.perf_counter() - t0) * n / (reps * len(z))


MOCK = mock_split.paths()  # bench/mock_split.py's trained model and held-out mocks, when they have been made


def _median_chi2(path: str) -> float:
    with h5py.File(path, "r") as h:
        return float(np.nanmedian(h["chi2"][()]))


def whole_process(args) -> int:
    """`fastspec encode MODEL FILE -o OUT` with its defaults against the loop a spender 0.3 user writes
    (bench/spender_user.py encode), each a fresh process timed from spawn to exit with its peak RSS; plus the
    start-up cost (64 spectra) and the held-out χ² of fp32 against bf16 latents."""
    import wholeproc as wp
    from common import markdown_table

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = mock_sdss_file(args.n or 8192, cache)
    small = mock_sdss_file(64, cache)
    model_path = cache / "model-default-sdss.pt"
    if not model_path.exists():  # fastspec's default architecture (`fastspec train`'s), untrained: speed only
        torch.manual_seed(0)
        SpectrumAutoencoder(ModelConfig(instrument="sdss", n_latent=10, z_max=Z_MAX)).save(model_path)
    exe = wp.fastspec_exe()
    have_spender = spender_model(torch.device("cpu")) is not None
    default = wp.default_label()
    runs = [("fastspec", default, data, [], {}), ("fastspec", "fp32", data, ["--precision", "fp32"], {}),
            ("fastspec", wp.LEAN_LABEL, data, [], wp.LEAN_ENV)]
    if have_spender:  # spender has no file pipeline, so no default batch: fastspec's CPU default and 256
        runs += [("spender", "default (fp32), batch 64", data, ["--batch-size", "64"], {}),
                 ("spender", "bf16, batch 64", data, ["--batch-size", "64", "--precision", "bf16"], {}),
                 ("spender", "fp32, batch 256", data, ["--batch-size", "256"], {})]
    runs += [("fastspec", "default, 64 spectra (start-up)", small, [], {}),
             ("python", "import torch only", None, [], {})]
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-encode-whole-", dir=cache) as tmp:
        for rep in range(args.repeat):
            for impl, label, path, extra, env in runs:
                out = os.path.join(tmp, f"{impl}-{len(rows)}.h5")
                if impl == "fastspec":
                    cmd = [exe, "encode", str(model_path), path, "-o", out, "-q", *extra]
                elif impl == "spender":
                    cmd = [sys.executable, wp.SPENDER_USER, "encode", path, "-o", out, *extra]
                else:
                    cmd = [sys.executable, "-c", "import torch"]
                print(f"[{rep + 1}/{args.repeat}] {impl} {label}: {' '.join(cmd)}", flush=True)
                r = wp.run_measured(cmd, env)
                n = 0 if path is None else (64 if path == small else (args.n or 8192))
                rows.append({"impl": impl, "settings": label, "repeat": rep + 1, "spectra": n, "wall_s": r["wall_s"],
                             "cpu_s": r["cpu_s"], "peak_rss_mb": r["peak_rss_mb"],
                             "spectra_per_s_whole": round(n / r["wall_s"], 1) if n else None, "cmd": r["cmd"]})
                print(f"    {r['wall_s']:.2f} s wall, {r['cpu_s']:.1f} s CPU, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        accuracy = None
        acc_model, acc_data = args.accuracy_model, args.accuracy_data
        if acc_model and acc_data and os.path.exists(acc_model) and os.path.exists(acc_data):
            accuracy = {}
            for precision in ("fp32", "bf16"):
                out = os.path.join(tmp, f"chi2-{precision}.h5")
                wp.run_measured([exe, "encode", acc_model, acc_data, "-o", out, "--chi2", "-q", "--precision", precision])
                accuracy[precision] = _median_chi2(out)
            print(f"held-out median χ² (trained model {acc_model}, {acc_data}): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()), flush=True)
    best = wp.fastest(rows)
    table = list(best.values())
    fs, fs32, fsl = best[("fastspec", default)], best[("fastspec", "fp32")], best[("fastspec", wp.LEAN_LABEL)]
    ratios = {}
    if have_spender:
        sp, spb = best[("spender", "default (fp32), batch 64")], best[("spender", "bf16, batch 64")]
        sp256 = best[("spender", "fp32, batch 256")]
        ratios = {"encode_speedup_default_vs_spender_default": round(sp["wall_s"] / fs["wall_s"], 2),
                  "encode_speedup_default_vs_spender_bf16": round(spb["wall_s"] / fs["wall_s"], 2),
                  "encode_speedup_fp32_vs_spender_fp32": round(sp["wall_s"] / fs32["wall_s"], 2),
                  "encode_speedup_default_vs_spender_fp32_batch_256": round(sp256["wall_s"] / fs["wall_s"], 2),
                  "peak_rss_default_vs_spender_default": round(fs["peak_rss_mb"] / sp["peak_rss_mb"], 2),
                  "peak_rss_default_vs_spender_fp32_batch_256": round(fs["peak_rss_mb"] / sp256["peak_rss_mb"], 2),
                  "encode_speedup_lean_vs_spender_default": round(sp["wall_s"] / fsl["wall_s"], 2),
                  "peak_rss_lean_vs_spender_default": round(fsl["peak_rss_mb"] / sp["peak_rss_mb"], 2)}
    ratios["startup_64_spectra_s"] = best[("fastspec", "default, 64 spectra (start-up)")]["wall_s"]
    ratios["import_torch_s"] = best[("python", "import torch only")]["wall_s"]
    print_table(table, ["impl", "settings", "spectra", "wall_s", "cpu_s", "peak_rss_mb", "spectra_per_s_whole"],
                title=f"whole processes: encode {args.n or 8192} mock SDSS spectra file → latents on file "
                f"(fastest of {args.repeat})")
    print(json.dumps(ratios, indent=1))
    payload = {"benchmark": "encode as whole processes with default settings",
               "machine": machine_info(), "load_average_start_end": [load0, os.getloadavg()], "n": args.n or 8192,
               "model": "fastspec: ModelConfig(instrument='sdss') as `fastspec train` builds it; spender: its SDSS model",
               "heldout_median_chi2": accuracy, "accuracy_model": args.accuracy_model, "ratios": ratios, "rows": rows}
    path_json = write_results(args.out or "encode-whole", payload, table)
    md = markdown_table(table, {"": ("impl", None), "settings": ("settings", None), "spectra": ("spectra", "d"),
                                "wall [s]": ("wall_s", ".2f"), "CPU [s]": ("cpu_s", ".1f"),
                                "peak RSS [MB]": ("peak_rss_mb", ".0f"),
                                "spectra/s (whole process)": ("spectra_per_s_whole", ".1f")})
    extra = [f"held-out median χ² of a trained model ({Path(args.accuracy_data).name}): "
             + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items())] if accuracy else []
    wp.write_markdown(path_json.with_suffix(".md"), f"Encoding as whole processes: {args.n or 8192} mock SDSS spectra, "
                   "file → latents on file", payload, md, ratios, extra)
    print(f"results: {path_json}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=None, help="spectra in the mock file (default 1024 CPU, 20000 CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 on CPU, 4096 on CUDA")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 0 CPU, 6 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fastspec-bench"),
                   help="where the mock file is kept between runs")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs of each, interleaved; the fastest is kept (default 2; 1 with --whole-process)")
    p.add_argument("--no-spender", action="store_true")
    p.add_argument("--out", default=None, help="results name in bench/results (default encode / encode-cuda)")
    p.add_argument("--whole-process", action="store_true",
                   help="time `fastspec encode` (defaults) and a spender user's loop as whole processes (default "
                   "--n 8192, --repeat 1)")
    p.add_argument("--accuracy-model", default=str(MOCK["model"]),
                   help="--whole-process: a trained model whose held-out χ² is compared in fp32 and bf16 (default "
                   "bench/mock_split.py's; '' to skip)")
    p.add_argument("--accuracy-data", default=str(MOCK["test"]), help="--whole-process: its held-out spectra")
    p.add_argument("--spender-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.spender_child:
        return run_spender_child(args)
    if args.whole_process:
        args.repeat = args.repeat or 1
        return whole_process(args)
    args.repeat = args.repeat or 2

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        from fastspec.memory import retain_freed_cpu_memory

        retain_freed_cpu_memory()  # as `fastspec encode` does on CPU
    n = args.n or (20000 if cuda else 1024)
    batch_size = args.batch_size or (4096 if cuda else 128)
    workers = args.workers if args.workers is not None else (6 if cuda else 0)
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = mock_sdss_file(n, cache)
    with open(path, "rb") as f:  # page cache: time the pipeline, not the disk
        while f.read(64 << 20):
            pass

    sp = None if args.no_spender else spender_model(device)
    if sp is not None:
        ours = SpectrumAutoencoder.from_spender(sp.state_dict(), instrument="sdss").to(device).eval()
    else:
        torch.manual_seed(0)
        ours = SpectrumAutoencoder(ModelConfig.spender("sdss", n_latent=10, z_max=Z_MAX)).to(device).eval()
    info = machine_info()
    load0 = os.getloadavg()  # shared machines: other work running beside the benchmark shows here
    print(f"{n} SDSS spectra, batch {batch_size}, {device}, torch threads {torch.get_num_threads()}, "
          f"loader workers {workers}", flush=True)

    rows, check = [], {}
    out_dir = Path(tempfile.mkdtemp(prefix="bench-encode-", dir=cache))
    precisions = [p_ for p_ in precisions if p_ != "fp16" or cuda]
    for precision in precisions:  # one-time costs (numba/Triton compilation, cuDNN autotune) stay out
        E.encode_batch(ours, *(torch.zeros(2, 3921, device=device),) * 2, torch.zeros(2, device=device), precision)
    best: dict = {}
    for _ in range(args.repeat):  # interleaved; the fastest of each (other jobs share this machine)
        for precision in precisions:
            out = str(out_dir / f"fastspec-{precision}.h5")
            if os.path.exists(out):
                os.remove(out)  # else encode_files finds the job done
            stats = E.encode_files(ours, [path], out, batch_size=batch_size, precision=precision,
                                   workers=workers, progress=False, resume=False)
            if precision not in best or stats.seconds < best[precision].seconds:
                best[precision] = stats
        if sp is not None:
            for precision, t in spender_child(args, path, out_dir, precisions, batch_size).items():
                key = "spender-" + precision
                if key not in best or t["total"] < best[key]["total"]:
                    best[key] = t
    for precision in precisions:
        stats = best[precision]
        rows.append({"impl": "fastspec", "precision": precision, "spectra_per_s": stats.n / stats.seconds,
                     "total_s": stats.seconds, "read_s": stats.wait_s, "copy_s": float("nan"),
                     "compute_s": stats.compute_s, "write_s": stats.write_s})
        t_read = loader_alone(path, batch_size, device, workers)
        t_comp = compute_alone(ours, path, n, batch_size, device, precision)
        rows.append({"impl": "fastspec (stages alone)", "precision": precision,
                     "spectra_per_s": n / max(t_read, t_comp), "total_s": float("nan"),
                     "read_s": t_read, "copy_s": float("nan"), "compute_s": t_comp, "write_s": float("nan")})
        if sp is not None:
            t = best["spender-" + precision]
            rows.append({"impl": "spender 0.3", "precision": precision, "spectra_per_s": n / t["total"],
                         "total_s": t["total"], "read_s": t["read"], "copy_s": t["copy"],
                         "compute_s": t["compute"], "write_s": t["write"]})
            with E.LatentsFile(out_dir / f"fastspec-{precision}.h5") as a, \
                    h5py.File(out_dir / f"spender-{precision}.h5", "r") as b:
                la, lb = a["latents"], b["latents"][()]
                check[precision] = float(np.max(np.abs(la - lb)) / np.max(np.abs(lb)))
                assert np.array_equal(a["object_id"], b["object_id"][()])
    ref = {r["precision"]: r["spectra_per_s"] for r in rows if r["impl"] == "spender 0.3"}
    for r in rows:
        if "fp32" in ref and not np.isnan(r["total_s"]):
            r["x_spender_fp32"] = r["spectra_per_s"] / ref["fp32"]
        if r["precision"] in ref and not np.isnan(r["total_s"]):
            r["x_spender_same_precision"] = r["spectra_per_s"] / ref[r["precision"]]
    cols = ["impl", "precision", "spectra_per_s", "total_s", "read_s", "copy_s", "compute_s", "write_s",
            "x_spender_fp32", "x_spender_same_precision"]
    text = print_table(rows, cols, title=f"encode, file → latents on file: {n} SDSS spectra, {device}, "
                                          f"batch {batch_size} (seconds; fastspec stages overlap)")
    if check:
        print("max |latents fastspec − spender| / max |latents spender|: "
              + ", ".join(f"{k} {v:.2e}" for k, v in check.items()))
    for f in out_dir.iterdir():
        f.unlink()
    out_dir.rmdir()
    top = max((r for r in rows if r["impl"] == "fastspec"), key=lambda r: r["spectra_per_s"])
    verdict = {"best_fastspec": f"{top['precision']}: {top['spectra_per_s']:.1f} spectra/s"}
    if "fp32" in ref:
        verdict["x_spender_fp32 (target >= 4)"] = top["spectra_per_s"] / ref["fp32"]
    if "bf16" in ref:
        verdict["x_spender_bf16_autocast (target >= 2)"] = top["spectra_per_s"] / ref["bf16"]
    if cuda:
        verdict["target (H100, SDSS)"] = ">= 100000 spectra/s"
    print("; ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in verdict.items()))
    for r in rows:  # strict JSON has no NaN
        for k, v in r.items():
            if isinstance(v, float) and not np.isfinite(v):
                r[k] = None
    name = args.out or ("encode" if not cuda else "encode-cuda")
    path_json = write_results(name, {
        "benchmark": "encode: spectra/s from a spectra HDF5 file to latents on file",
        "machine": info, "n": n, "batch_size": batch_size, "device": str(device), "loader_workers": workers,
        "model": "spender 0.3 SDSS architecture (S=10, unconditioned, Speculator), same weights in both",
        "spender_loop": "h5py block read → mask → torch → encode under no_grad (± autocast) → h5py write",
        "latents_rel_diff_vs_spender": check, "verdict": verdict, "rows": rows, "table": text,
        "load_average_start_end": [load0, os.getloadavg()],
    }, rows)
    print(f"results: {path_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
