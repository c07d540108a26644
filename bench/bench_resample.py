"""Benchmark of the redshift-resample ops on the SDSS grid (L = 3921 observed, R = 5882 restframe pixels).

Side by side in one process, the calls of all methods interleaved round-robin: the fused ops (numba on CPU;
Triton with atomics and the deterministic gather on CUDA), the plain-torch index-arithmetic reference (backend
'torch') and spender's searchsorted formulation (resample_ref; the targets are set against it), plus — where
spender imports (the dev venv, not CI) — spender 0.3's own SpectrumDecoder.transform for context.
Cases: resample forward, resample forward+backward (gradients to spec_rest and z), the training loss
Σ w·valid·(y−ŷ)² forward and forward+backward (fused `resample_loss` vs resample + torch arithmetic).

Reported per case: the minimum wall time over the repeats (and the median; on a shared machine the rest
is the neighbours), the minimum process CPU time (preemption-proof for --threads 1), spectra/s, achieved GB/s
over the minimal traffic of the op (every input read once, every output written once — the same byte count
for every method, so GB/s compares equal work), that as a fraction of this machine's memory-bandwidth floor
measured in the same run (bench/common.bandwidth_floor; above 1 where the working set of a small N stays in
cache), the speed-up over searchsorted from the minima and as the median of the per-round ratios (paired:
the two calls of a round ran seconds apart), and the peak extra memory of the case next to the size of its
outputs (CPU: RSS high-water in a fresh subprocess per case, after resetting VmHWM; CUDA:
torch.cuda.max_memory_allocated).

    .venv/bin/python bench/bench_resample.py                 # default: N = 64 … 4096, memory at N = 1024
    .venv/bin/python bench/bench_resample.py --sizes 256 --no-memory
    .venv/bin/python bench/bench_resample.py --retain-memory --no-memory   # allocator as in CPU training
Writes bench/results/resample.json and .csv (resample-retain.* with --retain-memory).

--retain-memory: glibc serves each output of a few MB with a fresh mmap and unmaps it on free, so every call
page-faults its outputs in again (0–20% of the fused op's time at N = 256 in our runs). Training on CPU switches
that off (fastspec.memory.retain_freed_cpu_memory); the flag does the same for every method of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bandwidth_floor, machine_info, print_table, write_results  # noqa: E402
from fastspec.kernels import redshift_observed, resample, resample_loss, use_backend  # noqa: E402
from fastspec.kernels import resample_ref as ref  # noqa: E402

from fastspec.instruments import get_instrument  # noqa: E402

OPS = ["resample_fwd", "resample_fwd_bwd", "loss_fwd", "loss_fwd_bwd", "redshift_observed_fwd"]


def methods_for(device: str, op: str) -> list[str]:
    methods = ["triton", "triton-det"] if device == "cuda" else ["numba"]
    methods += ["torch-index", "searchsorted"]
    if op != "redshift_observed_fwd" and _spender_transform is not None:
        methods.append("spender")  # spender's own SpectrumDecoder.transform, for context (not in CI)
    return methods


def _spender_transform_or_none():
    """spender 0.3's SpectrumDecoder.transform(x, instrument, z, return_valid) when spender imports, else None.

    Its formulation is resample_searchsorted's, except that it zeroes invalid pixels by masked assignment
    (`spectrum[~valid] = 0`) and its mask excludes both grid ends."""
    try:
        import spender
        from spender.model import SpectrumDecoder
    except Exception:  # noqa: BLE001 - any import failure just drops the row
        return None
    cache = {}

    def transform(x, z, wave_rest32, wave_obs32):
        key = (tuple(wave_rest32[[0, -1]].tolist()), len(wave_rest32), tuple(wave_obs32[[0, -1]].tolist()),
               len(wave_obs32), str(x.device))
        if key not in cache:  # built once (outside the memory measurement); a tiny MLP: transform does not use it
            cache[key] = (SpectrumDecoder(wave_rest32, n_latent=2, n_hidden=(4,)).to(x.device),
                          spender.Instrument(wave_obs32).to(x.device))
        dec, inst = cache[key]
        return dec.transform(x, instrument=inst, z=z, return_valid=True)

    return transform


_spender_transform = _spender_transform_or_none()


def times_round_robin(fns: dict, repeats: dict, warmups: dict, sync=None) -> dict:
    """{name: {round: (wall, process CPU time)}} in seconds, the calls interleaved round-robin.

    The calls of each method are spread evenly over the rounds (a method with fewer repeats skips rounds), so
    the slow drifts of a shared VM's speed (±30% over minutes here) fall on all methods alike instead of on
    whichever ran during a slow spell, and calls of the same round can be compared pairwise. CPU time (all
    threads of this process) is what a single-threaded run costs regardless of how often a busy machine
    preempts it; with several threads it also counts any spinning at barriers.
    """
    for name, fn in fns.items():
        for _ in range(warmups[name]):
            fn()
    if sync:
        sync()
    out = {name: {} for name in fns}
    rounds = max(repeats.values())
    for r in range(rounds):
        for name, fn in fns.items():
            if (r + 1) * repeats[name] // rounds == r * repeats[name] // rounds:
                continue  # this method's calls fall on other rounds
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            out[name][r] = (time.perf_counter() - t0, time.process_time() - c0)
    return out


def paired_speedup(base: dict, other: dict) -> float:
    """Median over the rounds both ran in of base time / other time (robust to the machine's drift)."""
    ratios = [base[r][0] / other[r][0] for r in base if r in other]
    return statistics.median(ratios) if ratios else float("nan")


def make_inputs(N: int, device: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """SDSS-grid inputs; the spectra, the observed fluxes and weights and the output gradient in `dtype`
    (redshifts and grids stay float32 / the instrument's)."""
    inst = get_instrument("sdss")
    wave_rest = torch.as_tensor(inst.wave_rest(0.5), device=device)
    wave_obs = torch.as_tensor(inst.wave_obs, device=device)
    R, L = wave_rest.numel(), wave_obs.numel()
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, R, generator=g, device=device).add_(1.0).to(dtype)  # in place: no freed temporaries
    z = torch.rand(N, generator=g, device=device).mul_(0.5)
    y = torch.randn(N, L, generator=g, device=device).add_(1.0).to(dtype)
    w = torch.rand(N, L, generator=g, device=device).to(dtype)
    grad = torch.randn(N, L, generator=g, device=device).to(dtype)
    z_new = torch.rand(N, generator=g, device=device).mul_(0.5)
    return dict(x=x, z=z, y=y, w=w, grad=grad, z_new=z_new, wave_rest=wave_rest, wave_obs=wave_obs, R=R, L=L,
                loglinear=inst.loglinear)


def _unfused_loss(y_hat, valid, y, w):
    return (w * valid * (y - y_hat) ** 2).sum(1)


def make_case(op: str, method: str, d: dict):
    """A zero-argument callable running one case, and the byte count of its outputs."""
    x, z, y, w, grad = d["x"], d["z"], d["y"], d["w"], d["grad"]
    wr, wo = d["wave_rest"], d["wave_obs"]
    N, R, L = x.shape[0], d["R"], d["L"]
    es = x.element_size()
    backend = {"numba": "numba", "triton": "triton", "triton-det": "triton", "torch-index": "torch"}.get(method)
    det = method == "triton-det"
    bwd = op.endswith("_bwd")
    xg = x.detach().requires_grad_(bwd)
    zg = z.detach().requires_grad_(bwd)

    # spender keeps its grids in float32 (module buffers); so does the searchsorted reference here
    wr32, wo32 = wr.float(), wo.float()

    def fwd_resample():
        if method == "searchsorted":
            return ref.resample_searchsorted(xg, zg, wr32, wo32)
        if method == "spender":
            return _spender_transform(xg, zg, wr32, wo32)
        with use_backend(backend):
            return resample(xg, zg, wr, wo, deterministic=det)

    def fwd_loss():
        if method in ("searchsorted", "spender"):
            return _unfused_loss(*fwd_resample(), y, w)
        with use_backend(backend):
            return resample_loss(xg, zg, wr, wo, y, w, deterministic=det)

    if op == "resample_fwd":
        def run():
            with torch.no_grad():
                return fwd_resample()
        out_bytes = N * L * (es + 1)
    elif op == "resample_fwd_bwd":
        def run():
            y_hat, _ = fwd_resample()
            return torch.autograd.grad(y_hat, (xg, zg), grad)  # runs on the forward's backend
        out_bytes = N * L * (es + 1) + N * R * es
    elif op == "loss_fwd":
        def run():
            with torch.no_grad():
                return fwd_loss()
        out_bytes = N * 4
    elif op == "loss_fwd_bwd":
        def run():
            return torch.autograd.grad(fwd_loss().sum(), (xg, zg))
        out_bytes = N * 4 + N * R * es
    elif op == "redshift_observed_fwd":
        def run():
            with torch.no_grad():
                if method == "searchsorted":
                    return ref.redshift_observed_searchsorted(y, z, d["z_new"], wo32, loglinear=True)
                with use_backend(backend):
                    return redshift_observed(y, z, d["z_new"], wo, loglinear=d["loglinear"], deterministic=det)
        out_bytes = N * L * (es + 1)
    else:
        raise ValueError(op)
    return run, out_bytes


def traffic_bytes(op: str, N: int, R: int, L: int, es: int = 4) -> int:
    """Minimal bytes moved: each input read once, each output written once."""
    fwd = N * R * es + N * L * (es + 1)  # x in; ŷ and valid out
    if op == "resample_fwd":
        return fwd
    if op == "resample_fwd_bwd":
        return fwd + N * L * es + N * R * es + N * R * es  # g and x in; ∂x out
    if op == "loss_fwd":
        return N * R * es + 2 * N * L * es  # x, y, w in
    if op == "loss_fwd_bwd":
        return 2 * (N * R * es + 2 * N * L * es) + N * R * es  # twice x, y, w in; ∂x out
    if op == "redshift_observed_fwd":
        return N * L * es + N * L * (es + 1)
    raise ValueError(op)


def measure_case(op: str, d: dict, methods: list[str], repeat: int, floor: float, device: str) -> list[dict]:
    """One row per method for `op` on the inputs `d` (make_inputs), the calls interleaved round-robin:
    minimum and median wall time, CPU time, spectra/s, GB/s over the minimal traffic and as a fraction of the
    copy bandwidth `floor`, and the speed-ups over searchsorted (from the minima, and paired per round)."""
    N, R, L = d["x"].shape[0], d["R"], d["L"]
    nbytes = traffic_bytes(op, N, R, L, d["x"].element_size())
    sync = torch.cuda.synchronize if device == "cuda" else None
    made = {method: make_case(op, method, d) for method in methods}  # (callable, output bytes)
    # the references are slow at large N; the kernels are cheap to repeat (and compile on the first call)
    slow = {m: m in ("torch-index", "searchsorted", "spender") for m in methods}
    ref_rep = repeat if N < 1024 else max(2, repeat // 2)
    measured = times_round_robin({m: made[m][0] for m in methods},
                                 {m: ref_rep if slow[m] else 3 * repeat for m in methods},
                                 {m: 1 if slow[m] else 2 for m in methods}, sync=sync)
    rows = []
    base_t = base_c = None
    for method in methods:
        ts = sorted(w for w, _ in measured[method].values())
        cs = sorted(c for _, c in measured[method].values())
        t = ts[0]  # the minimum: on a shared machine the rest measures the neighbours
        if method == "searchsorted":
            base_t, base_c = t, cs[0]
        rows.append(dict(op=op, N=N, method=method, device=device, dtype=str(d["x"].dtype).replace("torch.", ""),
                         time_ms=t * 1e3, median_ms=statistics.median(ts) * 1e3, cpu_ms=cs[0] * 1e3,
                         spectra_per_s=N / t, GBps=nbytes / t / 1e9, frac_floor=nbytes / t / 1e9 / floor,
                         out_MB=made[method][1] / 1e6,
                         paired_speedup_vs_searchsorted=paired_speedup(measured["searchsorted"], measured[method])))
    for r in rows:
        r["speedup_vs_searchsorted"] = base_t / (r["time_ms"] / 1e3) if base_t else float("nan")
        r["cpu_speedup_vs_searchsorted"] = base_c / (r["cpu_ms"] / 1e3) if base_c else float("nan")
    return rows


# ---- memory: one fresh subprocess per case (CPU) ---------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def set_threads(n: int) -> None:
    import numba

    # numba first: starting its OpenMP threading layer resets the libgomp thread count torch uses
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(n)
    if torch.get_num_threads() != n:
        raise RuntimeError(f"could not set {n} torch threads (have {torch.get_num_threads()})")


def _exact_rss_allocations() -> None:
    """Make every large allocation a fresh mmap that is unmapped on free (glibc), so that RSS high-water
    counts each allocation of a case instead of reusing memory freed earlier but still resident."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, which also stops its dynamic growth
    libc.malloc_trim(0)


def _memory_child(op: str, method: str, N: int, threads: int) -> dict:
    _exact_rss_allocations()
    set_threads(threads)
    d = make_inputs(N, "cpu")
    small = make_inputs(8, "cpu")
    make_case(op, method, small)[0]()  # compile / warm up at a tiny size
    run, out_bytes = make_case(op, method, d)
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    result = run()  # keep the outputs alive while the high-water mark is read
    peak = _rss_kib("VmHWM")
    del result
    return dict(extra_MB=(peak - base) * 1024 / 1e6, output_MB=out_bytes / 1e6)


def measure_memory_cpu(op: str, method: str, N: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", json.dumps([op, method, N, threads])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return dict(extra_MB=float("nan"), output_MB=float("nan"), error=proc.stderr[-500:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory_cuda(run, out_bytes) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return dict(extra_MB=(peak - base) / 1e6, output_MB=out_bytes / 1e6)


# ---- main ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=5,
                   help="repeats of the references (half that from N = 1024; kernels: 3×)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads for torch and numba alike (default: torch's default)")
    p.add_argument("--memory-n", type=int, default=1024, help="N of the memory measurements (0: none)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--retain-memory", action="store_true",
                   help="keep freed memory in the process (fastspec.memory.retain_freed_cpu_memory, what training on "
                        "CPU does): no page faults on fresh outputs, for every method alike")
    p.add_argument("--out", default=None, help="results name under bench/results/ (default resample, or "
                                                "resample-retain with --retain-memory)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_child:
        print(json.dumps(_memory_child(*json.loads(a.memory_child))))
        return 0

    device = a.device
    set_threads(a.threads)
    retained = False
    if a.retain_memory and device == "cpu":
        from fastspec.memory import retain_freed_cpu_memory

        retained = retain_freed_cpu_memory()
        if not retained:
            raise SystemExit("--retain-memory: glibc's mallopt is not available here")
    out_name = a.out or ("resample-retain" if retained else "resample")
    info = machine_info()
    floor = bandwidth_floor(device)
    print(f"device {device}; memory-bandwidth floor (copy) {floor:.1f} GB/s; threads {a.threads}; "
          f"load average {os.getloadavg()[0]:.1f}; allocator {'retains freed memory' if retained else 'default'}",
          flush=True)
    rows = []
    for op in a.ops:
        methods = methods_for(device, op)
        for N in a.sizes:
            d = make_inputs(N, device)
            R, L = d["R"], d["L"]
            rows += measure_case(op, d, methods, a.repeat, floor, device)
        print_table([r for r in rows if r["op"] == op],
                    ["op", "N", "method", "time_ms", "median_ms", "cpu_ms", "spectra_per_s", "GBps", "frac_floor",
                     "speedup_vs_searchsorted", "paired_speedup_vs_searchsorted", "cpu_speedup_vs_searchsorted"],
                    title=f"\n{op} (L={L}, R={R})")

    mem_rows = []
    if not a.no_memory and a.memory_n:
        N = a.memory_n
        for op in a.ops:
            for method in methods_for(device, op):
                if device == "cuda":
                    run, out_bytes = make_case(op, method, make_inputs(N, device))
                    run()
                    m = measure_memory_cuda(run, out_bytes)
                else:
                    m = measure_memory_cpu(op, method, N, a.threads)
                mem_rows.append(dict(op=op, N=N, method=method, **m))
        print_table(mem_rows, ["op", "N", "method", "extra_MB", "output_MB"],
                    title="\npeak extra memory (CPU: RSS high-water per subprocess; CUDA: max_memory_allocated)")

    summary = {}
    for r in rows:
        if r["op"] == "resample_fwd_bwd" and r["N"] == 256 and r["method"] in ("numba", "triton"):
            summary["resample_fwd_bwd_N256_speedup_vs_searchsorted"] = r["speedup_vs_searchsorted"]
            summary["resample_fwd_bwd_N256_paired_speedup_vs_searchsorted"] = r["paired_speedup_vs_searchsorted"]
            if device == "cpu":
                summary["resample_fwd_bwd_N256_cpu_time_speedup_vs_searchsorted"] = r["cpu_speedup_vs_searchsorted"]
    inst = get_instrument("sdss")
    payload = dict(benchmark="resample", machine=info, device=device, threads=a.threads,
                   allocator="retains freed memory (glibc mmap/trim thresholds raised, as in fastspec training)"
                   if retained else "default",
                   load_average=os.getloadavg(), bandwidth_floor_GBps=floor,
                   grid=dict(instrument="sdss", L=inst.L, R=inst.n_rest(0.5), z_max=0.5),
                   traffic_model="each input read once, each output written once (fp32 values, 1-byte mask)",
                   timing="time_ms = minimum wall time over repeats (GB/s, spectra/s, speed-up from it), median_ms; "
                          "cpu_ms = minimum process CPU time (robust to preemption on a shared machine)",
                   summary=summary, rows=rows, memory=mem_rows)
    path = write_results(out_name, payload, rows + mem_rows)
    print(f"\nsummary: {summary}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
