"""Training throughput (spectra/s), peak memory and the per-op breakdown of a training step on this machine,
fastspec per kernel backend and precision side by side with spender 0.3 (skipped with a note where spender
does not import), plus a convergence check: from the same initial weights on the same batches, the loss falls
as fast per spectrum seen.

Every case runs in its own process (clean peak memory, no warm caches from another case). A step is
forward + backward + Adam on in-memory batches of mock SDSS spectra, the same batches for every
implementation; no gradient clipping in either. Architecture: spender 0.3's (unconditioned encoder, Speculator
decoder, spender's grids) for the side-by-side rows, so both run the same network; fastspec's paper
configuration (z-conditioned, LeakyReLU) is reported too. Peak memory is the peak resident set of the process
minus its size before the model was built (weights, Adam state, activations, gradients, temporaries). The
breakdown is one extra step under torch.profiler (self time per op category, backward charged to the forward
op, see fastspec.profile). A last row times `fastspec.train.Trainer` itself (loader with 2 thread workers,
clipping, loss logging) to show the whole loop keeps up with the step.

Targets on this CPU (same batch and architecture): ≥ 3× spender's fp32 throughput, ≥ 1.5× spender's bf16
throughput, ≤ half its peak memory, loss falling as fast per spectrum.

On CUDA (`--device cuda`) the batches are moved to the GPU before the timed steps, fastspec runs its Triton
kernels (backend 'triton'), fp16 runs with a GradScaler, peak memory is torch.cuda.max_memory_allocated over the
timed steps minus the memory allocated before the model was built, and there is no per-op breakdown.

    .venv/bin/python bench/bench_train.py [--batches 64 256] [--steps 2] [--converge-steps 12]
    .venv/bin/python bench/bench_train.py --device cuda --batches 1024 --precisions fp32,bf16 --side-by-side-only

`--whole-process` measures what a user sees instead: `fastspec train FILE -o DIR --epochs 1 --batch-size 64` with
every other setting at its default, beside the loop a spender 0.3 user writes (bench/spender_user.py, fp32 as
spender runs by default, and bf16), each a fresh process timed from spawn to exit with its peak RSS
(bench/wholeproc.py), on the same mock file; results in bench/results/train-whole.*.

    .venv/bin/python bench/bench_train.py --whole-process [--n 8192] [--epochs 1] [--repeat 1]
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    machine_info,
    mock_sdss_file,
    peak_mb,
    print_table,
    reset_peak,
    rss_mb,
    spender_sdss_model,
    write_results,
)

Z_MAX = 0.5


def _batches(path: str, batch: int, count: int):
    """`count` batches of (y, w, z) read by the fastspec loader in file order (the same for every impl)."""
    from fastspec.loader import SpectraLoader

    loader = SpectraLoader([path], batch, shuffle=False, num_workers=0, drop_last=True)
    out = [tuple(t.clone() for t in b[:3]) for b in loader]
    if not out:
        raise SystemExit(f"{path} holds fewer than {batch} spectra")
    return [out[i % len(out)] for i in range(count)]


def _build(case: dict):
    """(model, loss_fn(y, w, z) -> scalar) for a case."""
    import torch

    from fastspec.model import ModelConfig, SpectrumAutoencoder

    if case["impl"] == "spender":
        model, inst = spender_sdss_model(0, Z_MAX)
        tr = model.decoder.transform

        def transform(*a, **k):  # a scope so the profiler finds spender's resample (plain torch ops)
            with torch.profiler.record_function("fastspec.resample"):
                return tr(*a, **k)

        model.decoder.transform = transform
        return model, lambda y, w, z: model.loss(y, w, instrument=inst, z=z)
    if case["arch"] == "spender":
        sp, _ = spender_sdss_model(0, Z_MAX) if case.get("same_init") else (None, None)
        if sp is not None:
            model = SpectrumAutoencoder.from_spender(sp.state_dict(), instrument="sdss", z_max=Z_MAX)
        else:
            torch.manual_seed(0)
            model = SpectrumAutoencoder(ModelConfig.spender("sdss", n_latent=10, z_max=Z_MAX))
        return model, lambda y, w, z: model.loss(y, w, z, kind="spender").sum()
    torch.manual_seed(0)
    model = SpectrumAutoencoder(ModelConfig(instrument="sdss", n_latent=10, z_max=Z_MAX))
    return model, lambda y, w, z: model.loss(y, w, z, kind="paper").mean()


def run_case(case: dict, data: str) -> dict:
    """One case in this process: warm-up, timed steps, optionally a profiled step."""
    import torch

    from fastspec import kernels
    from fastspec.memory import retain_freed_cpu_memory
    from fastspec.profile import categorize_events, scoped_kernels

    device = torch.device(case.get("device", "cpu"))
    cuda = device.type == "cuda"
    if case["impl"] == "fastspec" and not cuda:
        retain_freed_cpu_memory()  # as CPU training does by default (TrainConfig.retain_cpu_memory)
    if case.get("backend"):
        kernels.set_backend(case["backend"])
    n_steps = case["warmup"] + case["steps"] + int(case["breakdown"])
    batches = [tuple(t.to(device) for t in b) for b in _batches(data, case["batch"], n_steps)]
    # libraries first (the kernels import lazily), so the baseline holds everything but the training state
    if case["impl"] == "spender":
        import spender  # noqa: F401
    else:
        kernels.resample_loss, kernels.attention_pool  # noqa: B018
    if cuda:
        torch.cuda.synchronize(device)
    mem0 = torch.cuda.memory_allocated(device) / 1e6 if cuda else rss_mb()
    model, loss_fn = _build(case)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=case.get("lr", 1e-3))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=case["precision"] == "fp16")
    losses = []

    def step(y, w, z):
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = loss_fn(y, w, z)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss.float()).backward()
        with torch.profiler.record_function("optimizer"):
            scaler.step(opt)
            scaler.update()
        losses.append(float(loss.detach()))  # synchronises with the GPU

    k = 0
    for _ in range(case["warmup"]):
        step(*batches[k])
        k += 1
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        reset = True
    else:
        reset = reset_peak()  # the peak of the timed steps: steady state, no first-call compilation
    wall, cpu = [], []
    for _ in range(case["steps"]):
        t, c = time.perf_counter(), time.process_time()
        step(*batches[k])
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        k += 1
    peak = torch.cuda.max_memory_allocated(device) / 1e6 if cuda else peak_mb()
    out = {
        "step_s": min(wall),
        "step_cpu_s": min(cpu),
        "spectra_per_s": case["batch"] / min(wall),
        "peak_mb": peak - mem0,
        "peak_since": "timed steps" if reset else "process start",
        "losses": losses,
    }
    if case["breakdown"]:
        from torch.profiler import ProfilerActivity, profile

        with scoped_kernels(), profile(activities=[ProfilerActivity.CPU]) as prof:
            step(*batches[k])
        cats = categorize_events(prof.events())
        out["breakdown_ms"] = {c: round(v / 1e3, 2) for c, v in cats.items()}
    return out


def run_trainer(data: str, batch: int, steps: int) -> dict:
    """The whole `fastspec train` loop (loader with 2 thread workers, clipping, logging), paper architecture."""
    import torch  # noqa: F401

    from fastspec.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=[data], out=out, model={"n_latent": 10, "z_max": Z_MAX}, steps=steps + 1,
                          batch_size=batch, val_fraction=0.0, checkpoint_every=0, progress=False,
                          num_workers=2, log_every=1)
        tr = Trainer(cfg)
        tr.run(max_steps=1, write_files=False)
        waits = []
        orig = tr.train_loader.iterate

        def timed_iterate(*a, **k):
            it = orig(*a, **k)
            while True:
                t = time.perf_counter()
                try:
                    b = next(it)
                except StopIteration:
                    return
                waits.append(time.perf_counter() - t)
                yield b

        tr.train_loader.iterate = timed_iterate
        t = time.perf_counter()
        tr.run(max_steps=steps, write_files=False)
        wall = time.perf_counter() - t
        tr.close()
    return {"spectra_per_s": batch * steps / wall, "step_s": wall / steps, "loader_wait_s": sum(waits) / steps}


def _subprocess(case: dict, data: str, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--run-case", json.dumps(case), "--data", data]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")


def spender_available() -> str | None:
    try:
        import spender  # noqa: F401
    except Exception as err:  # spender needs nflows, GPUtil, humanize, psutil besides torch
        return f"{err.__class__.__name__}: {err}"
    return None


def whole_process(args) -> int:
    """`fastspec train` with its defaults against the loop a spender 0.3 user writes (bench/spender_user.py),
    each a fresh process timed from spawn to exit with its peak RSS; both train --epochs on the same file at the
    same batch size and validate on a tenth of it."""
    import wholeproc as wp
    from common import markdown_table

    data = mock_sdss_file(args.n, args.cache)
    exe = wp.fastspec_exe()
    runs = [("fastspec", wp.default_label(), [], {}), ("fastspec", "fp32", ["--precision", "fp32"], {}),
            ("fastspec", wp.LEAN_LABEL, [], wp.LEAN_ENV),
            ("spender", "default (fp32)", [], {}), ("spender", "bf16", ["--precision", "bf16"], {})]
    if spender_available():
        runs = runs[:3]
    rows = []
    load_before = os.getloadavg()
    for rep in range(args.repeat):
        for impl, label, extra, env in runs:
            with tempfile.TemporaryDirectory(prefix="bench_train_whole_") as tmp:
                if impl == "fastspec":
                    cmd = [exe, "train", data, "-o", os.path.join(tmp, "run"), "--epochs", str(args.epochs),
                           "--batch-size", str(args.whole_batch), "-q", *extra]
                else:
                    cmd = [sys.executable, wp.SPENDER_USER, "train", data, "--epochs", str(args.epochs), "--batch-size",
                           str(args.whole_batch), *extra]
                print(f"[{rep + 1}/{args.repeat}] {impl} {label}: {' '.join(cmd)}", flush=True)
                r = wp.run_measured(cmd, env)
                if impl == "fastspec":
                    with open(os.path.join(tmp, "run", "history.json")) as fh:
                        h = json.load(fh)
                    val, n_spectra = h["val"][-1]["loss"], h["train"][-1]["spectra"]
                    rate = [e["spectra_per_s"] for e in h["train"] if e.get("spectra_per_s")]
                    in_proc = float(np.median(rate)) if rate else None
                    kind = f"fastspec '{h.get('loss_kind', 'paper')}' loss"
                else:
                    val, n_spectra, in_proc = r["result"]["val_loss"], r["result"]["spectra"], None
                    kind = "spender's weighted MSE"
            rows.append({"impl": impl, "settings": label, "repeat": rep + 1, "wall_s": r["wall_s"],
                         "cpu_s": r["cpu_s"], "peak_rss_mb": r["peak_rss_mb"], "spectra": n_spectra,
                         "spectra_per_s_whole": round(n_spectra / r["wall_s"], 1),
                         "spectra_per_s_in_process": round(in_proc, 1) if in_proc else None,
                         "val_loss": round(val, 6), "val_loss_kind": kind, "cmd": r["cmd"]})
            print(f"    {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"val loss {val:.5g}", flush=True)
    best = wp.fastest(rows)
    table = list(best.values())
    fs = best[("fastspec", runs[0][1])]
    ratios = {}
    sp = best.get(("spender", "default (fp32)"))
    spb = best.get(("spender", "bf16"))
    fs32, fsl = best[("fastspec", "fp32")], best[("fastspec", wp.LEAN_LABEL)]
    if sp:
        ratios = {"train_speedup_default_vs_spender_default": round(sp["wall_s"] / fs["wall_s"], 2),
                  "train_speedup_default_vs_spender_bf16": round(spb["wall_s"] / fs["wall_s"], 2) if spb else None,
                  "peak_rss_default_vs_spender_default": round(fs["peak_rss_mb"] / sp["peak_rss_mb"], 2),
                  "fp32_speedup_vs_spender_fp32": round(sp["wall_s"] / fs32["wall_s"], 2),
                  "train_speedup_lean_vs_spender_default": round(sp["wall_s"] / fsl["wall_s"], 2),
                  "peak_rss_lean_vs_spender_default": round(fsl["peak_rss_mb"] / sp["peak_rss_mb"], 2)}
    ratios["val_loss_default_over_fp32"] = round(fs["val_loss"] / fs32["val_loss"], 4)
    cols = ["impl", "settings", "wall_s", "cpu_s", "peak_rss_mb", "spectra_per_s_whole", "spectra_per_s_in_process",
            "val_loss", "val_loss_kind"]
    print_table(table, cols, title=f"whole processes: train {args.epochs} epoch(s) of {args.n} mock SDSS spectra, "
                f"batch {args.whole_batch} (fastest of {args.repeat})")
    print(json.dumps(ratios, indent=1))
    payload = {"machine": machine_info(), "load_average_before": load_before, "load_average_end": os.getloadavg(),
               "n": args.n, "epochs": args.epochs, "batch": args.whole_batch, "repeat": args.repeat,
               "spender": None if spender_available() else "0.3", "rows": rows, "ratios": ratios}
    path = write_results(args.out or "train-whole", payload, table)
    md = markdown_table(table, {"": ("impl", None), "settings": ("settings", None), "wall [s]": ("wall_s", ".1f"),
                                "CPU [s]": ("cpu_s", ".1f"), "peak RSS [MB]": ("peak_rss_mb", ".0f"),
                                "spectra/s (whole process)": ("spectra_per_s_whole", ".1f"),
                                "spectra/s (in the training loop)": ("spectra_per_s_in_process", ".1f"),
                                "held-out loss": ("val_loss", ".5g"), "loss": ("val_loss_kind", None)})
    wp.write_markdown(path.with_suffix(".md"), f"Training as whole processes: {args.epochs} epoch(s) of {args.n} mock "
                   f"SDSS spectra, batch {args.whole_batch}", payload, md, ratios)
    print(f"results: {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per case (best is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--converge-steps", type=int, default=12, help="steps of the convergence check (batch 16)")
    ap.add_argument("--trainer-steps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per case")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precisions", default=None, help="comma-separated (default fp32,bf16)")
    ap.add_argument("--side-by-side-only", action="store_true",
                    help="only fastspec against spender (no torch-backend and paper-architecture rows)")
    ap.add_argument("--out", default=None, help="results name under bench/results (default train / train-cuda)")
    ap.add_argument("--whole-process", action="store_true",
                    help="time `fastspec train` (defaults) and a spender user's loop as whole processes instead")
    ap.add_argument("--n", type=int, default=8192, help="--whole-process: mock spectra in the file (default 8192)")
    ap.add_argument("--epochs", type=int, default=1, help="--whole-process: epochs (default 1)")
    ap.add_argument("--whole-batch", type=int, default=64, help="--whole-process: batch size (default 64)")
    ap.add_argument("--repeat", type=int, default=1, help="--whole-process: runs of each, interleaved (fastest kept)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fastspec-bench"),
                    help="--whole-process: folder for the mock file")
    ap.add_argument("--run-case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run_case:
        res = run_case(json.loads(args.run_case), args.data)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    if args.whole_process:
        return whole_process(args)

    no_spender = spender_available()
    if no_spender:
        print(f"note: spender does not import ({no_spender}); fastspec rows only", flush=True)
    small = min(args.batches)
    cuda = args.device.startswith("cuda")
    backend = "triton" if cuda else "numba"  # fastspec's kernels for this device
    precisions = (args.precisions or "fp32,bf16").split(",")
    extras = not args.side_by_side_only
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        from fastspec.mock import write_mock

        data = os.path.join(tmp, "mock.h5")
        n = max(2 * max(args.batches), 16 * (args.converge_steps + 2))
        print(f"writing {n} mock SDSS spectra …", flush=True)
        write_mock(data, n, instrument="sdss", seed=0, restframe_truth=False, progress=False)

        cases = []
        for batch in args.batches:
            base = dict(batch=batch, warmup=args.warmup, steps=args.steps, device=args.device,
                        breakdown=batch == small and not cuda)
            for prec in precisions:
                cases.append(dict(base, impl="fastspec", arch="spender", backend=backend, precision=prec))
                if not no_spender:
                    cases.append(dict(base, impl="spender", arch="spender", backend=None, precision=prec))
            if batch == small and extras:
                cases.append(dict(base, impl="fastspec", arch="spender", backend="torch", precision="fp32"))
                for prec in precisions:
                    cases.append(dict(base, impl="fastspec", arch="paper", backend=backend, precision=prec))
        rows = []
        for case in cases:
            label = f"{case['impl']:8s} {case['arch']:7s} {case['backend'] or '-':5s} {case['precision']} " \
                    f"batch {case['batch']}"
            print(f"running {label} …", flush=True)
            res = _subprocess(case, data, args.timeout)
            rows.append({"impl": case["impl"], "arch": case["arch"], "backend": case["backend"] or "-",
                         "precision": case["precision"], "batch": case["batch"],
                         "spectra_per_s": round(res["spectra_per_s"], 2), "step_s": round(res["step_s"], 3),
                         "step_cpu_s": round(res["step_cpu_s"], 3), "peak_mb": round(res["peak_mb"], 1),
                         "breakdown_ms": res.get("breakdown_ms")})

        converge = []
        if args.converge_steps:
            impls = ["fastspec"] + ([] if no_spender else ["spender"])
            for impl in impls:
                for prec in precisions:
                    case = dict(impl=impl, arch="spender", backend=backend if impl == "fastspec" else None,
                                precision=prec, batch=16, warmup=0, steps=args.converge_steps, breakdown=False,
                                same_init=True, lr=1e-3, device=args.device)
                    print(f"convergence {impl} {prec} …", flush=True)
                    res = _subprocess(case, data, args.timeout)
                    converge.append({"impl": impl, "precision": prec, "losses": res["losses"]})

        trainer = None
        if args.trainer_steps and not cuda:
            print(f"fastspec train loop, batch {small} …", flush=True)
            trainer = run_trainer(data, small, args.trainer_steps)

    # speed-ups against spender at the same batch
    def find(impl, arch, backend, prec, batch):
        for r in rows:
            if (r["impl"], r["arch"], r["backend"], r["precision"], r["batch"]) == (impl, arch, backend, prec, batch):
                return r
        return None

    targets = []
    for r in rows:
        sp32 = find("spender", "spender", "-", "fp32", r["batch"])
        sp_same = find("spender", "spender", "-", r["precision"], r["batch"])
        r["x_spender_fp32"] = round(r["spectra_per_s"] / sp32["spectra_per_s"], 2) if sp32 else None
        r["x_spender_same_precision"] = (round(r["spectra_per_s"] / sp_same["spectra_per_s"], 2)
                                         if sp_same else None)
        r["mem_vs_spender"] = round(r["peak_mb"] / sp32["peak_mb"], 2) if sp32 else None
    for batch in args.batches:
        f32 = find("fastspec", "spender", backend, "fp32", batch)
        fb16 = find("fastspec", "spender", backend, "bf16", batch)
        sp32 = find("spender", "spender", "-", "fp32", batch)
        spb16 = find("spender", "spender", "-", "bf16", batch)
        if not (f32 and sp32):
            continue
        best = max((f32, fb16), key=lambda r: r["spectra_per_s"] if r else 0)
        targets.append({
            "batch": batch,
            "fastspec_best_vs_spender_fp32": round(best["spectra_per_s"] / sp32["spectra_per_s"], 2),
            "target_3x_met": best["spectra_per_s"] >= 3 * sp32["spectra_per_s"],
            "fastspec_best_vs_spender_bf16": (round(best["spectra_per_s"] / spb16["spectra_per_s"], 2)
                                              if spb16 else None),
            "target_1.5x_bf16_met": bool(spb16) and best["spectra_per_s"] >= 1.5 * spb16["spectra_per_s"],
            "peak_mem_fastspec_fp32_vs_spender_fp32": round(f32["peak_mb"] / sp32["peak_mb"], 2),
            "target_half_memory_met": f32["peak_mb"] <= 0.5 * sp32["peak_mb"],
        })

    cols = ["impl", "arch", "backend", "precision", "batch", "spectra_per_s", "step_s", "step_cpu_s", "peak_mb",
            "x_spender_fp32", "x_spender_same_precision", "mem_vs_spender"]
    print_table(rows, cols, title=f"training step (forward + backward + Adam), SDSS, S=10, {args.device}")
    cats = None
    bd_rows = []
    for r in rows:
        if r["breakdown_ms"]:
            cats = list(r["breakdown_ms"])
            bd_rows.append({"case": f"{r['impl']}/{r['arch']}/{r['backend']}/{r['precision']}",
                            **r["breakdown_ms"]})
    if bd_rows:
        print_table(bd_rows, ["case", *cats], title=f"per-op breakdown of one step at batch {small} (ms, self time)")
    if converge:
        conv_rows = []
        for c in converge:
            ls = c["losses"]
            conv_rows.append({"impl": c["impl"], "precision": c["precision"], "first": round(ls[0], 4),
                              "last": round(ls[-1], 4), "last/first": round(ls[-1] / ls[0], 3),
                              "spectra_seen": 16 * len(ls)})
        print_table(conv_rows, title="convergence: same initial weights, same batches of 16, Adam lr 1e-3")
    if trainer:
        print(f"fastspec train loop (loader 2 thread workers), paper architecture, batch {small}: "
              f"{trainer['spectra_per_s']:.1f} spectra/s, loader wait {trainer['loader_wait_s'] * 1e3:.1f} ms/step")
    for t in targets:
        print(f"batch {t['batch']}: best fastspec {t['fastspec_best_vs_spender_fp32']}x spender fp32 "
              f"(target 3x {'met' if t['target_3x_met'] else 'NOT met'}), "
              f"{t['fastspec_best_vs_spender_bf16']}x spender bf16 "
              f"(target 1.5x {'met' if t['target_1.5x_bf16_met'] else 'NOT met'}), "
              f"peak memory {t['peak_mem_fastspec_fp32_vs_spender_fp32']}x spender's "
              f"(target ≤ 0.5 {'met' if t['target_half_memory_met'] else 'NOT met'})")
    payload = {"machine": machine_info(), "load_average_end": os.getloadavg(), "steps": args.steps,
               "warmup": args.warmup, "device": args.device, "spender": None if no_spender else "0.3",
               "spender_note": no_spender, "rows": rows, "convergence": converge, "trainer_loop": trainer,
               "targets": targets}
    flat = [{k: v for k, v in r.items() if k != "breakdown_ms"} for r in rows]
    path = write_results(args.out or ("train-cuda" if cuda else "train"), payload, flat)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
