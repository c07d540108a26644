"""Where training time goes: a short training run under the torch profiler, per kernel backend.

`profile_training` runs a few warm-up steps, then `steps` profiled steps of the real training loop
(`fastspec.train.Trainer`), sums the self time of every recorded op into categories — convolutions, norms,
activations, pooling, fastspec's fused norm/activation/pool blocks, the MLPs, resample, attention, dtype casts,
optimizer, loader wait, other — and writes a Chrome trace per backend (open it in chrome://tracing or
https://ui.perfetto.dev).

How an op is assigned: inside the `loader_wait` or `optimizer` scopes (record_function in the training loop)
it belongs to those; otherwise the innermost op whose name matches a category decides (so aten::mul inside
`PreluKernelBackward0` counts as activation). Backward work is charged to the forward op that recorded it
(autograd's sequence numbers), and the public kernel ops get record_function scopes while profiling, so the
'torch' reference backend's plain gathers still count as resample.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time

from .atomic import atomic_path

CATEGORIES = ("conv", "norm", "activation", "pool", "fused block", "mlp", "resample", "attention", "cast",
              "optimizer", "loader wait", "other")

_SCOPES = (
    (re.compile(r"^loader_wait$"), "loader wait"),
    (re.compile(r"^optimizer$|^optimizer\.|#adam\.|zero_grad"), "optimizer"),
)
_OPS = (
    # fastspec's fused InstanceNorm → PReLU → MaxPool (and the first block with its conv in front)
    (re.compile(r"instance_norm_prelu_pool|spectrum_block|spectrum_conv_block|_eager(conv|spectrum)block"),
     "fused block"),
    (re.compile(r"resample|redshift_observed"), "resample"),
    (re.compile(r"attention|softmax"), "attention"),
    (re.compile(r"conv"), "conv"),
    (re.compile(r"(instance|batch|group|layer)_?norm"), "norm"),
    (re.compile(r"prelu|leaky_?relu|\brelu|sigmoid|tanh|gelu|silu|speculator"), "activation"),
    (re.compile(r"pool"), "pool"),
    (re.compile(r"addmm|aten::mm\b|\bmmbackward|matmul|linear|aten::bmm"), "mlp"),
    (re.compile(r"aten::to\b|_to_copy|aten::copy_|tocopybackward"), "cast"),
)


def _first_match(table, name: str) -> str | None:
    n = name.lower()
    return next((cat for rx, cat in table if rx.search(n)), None)


def categorize_name(name: str) -> str | None:
    """The category an op's name says it belongs to (None: no telling name)."""
    return _first_match(_OPS, name)


def _outer_scope(name: str) -> str | None:
    return _first_match(_SCOPES, name)


def _scope(name: str) -> str | None:
    n = name.lower()
    cat = _outer_scope(n)
    if cat:
        return cat
    if n.startswith("fastspec."):  # the kernel-op scopes `scoped_kernels` adds
        return categorize_name(n)
    return None


def _chain(ev) -> list:
    out = []
    while ev is not None:
        out.append(ev)
        ev = ev.cpu_parent
    return out


def _category_of_chain(chain) -> str | None:
    for e in reversed(chain):  # outermost scope wins
        cat = _scope(e.name)
        if cat:
            return cat
    for e in chain:  # then the innermost op that names a category
        cat = categorize_name(e.name)
        if cat:
            return cat
    return None


def categorize_events(events, device_time: bool = False) -> dict[str, float]:
    """Self time (µs) per category over profiler FunctionEvents (`prof.events()`).

    Backward work is charged to the forward op that recorded it: autograd's `evaluate_function: XBackward`
    events carry the forward op's sequence number, so the backward of the resample reference (plain gathers
    and multiplies) counts as resample, not as 'other'."""
    events = sorted(events, key=lambda e: e.time_range.start)
    chains = {id(e): _chain(e) for e in events}
    forward = {}
    for e in events:
        if e.sequence_nr >= 0 and not any("evaluate_function" in a.name for a in chains[id(e)]):
            forward[(e.thread, e.sequence_nr)] = e  # the last op with this number made the autograd node
    out = dict.fromkeys(CATEGORIES, 0.0)
    for ev in events:
        t = ev.self_device_time_total if device_time else ev.self_cpu_time_total
        if not t:
            continue
        chain = chains[id(ev)]
        cat = None
        for e in reversed(chain):
            cat = _outer_scope(e.name)
            if cat:
                break
        if cat is None:
            bw = next((a for a in chain if "evaluate_function" in a.name and a.sequence_nr >= 0), None)
            fw = forward.get((bw.fwd_thread, bw.sequence_nr)) if bw is not None else None
            if fw is not None:
                cat = _category_of_chain(chains[id(fw)])
            if cat is None:
                cat = _category_of_chain(chain)
        out[cat or "other"] += t
    return out


@contextlib.contextmanager
def scoped_kernels():
    """Wrap the public kernel ops in record_function scopes while profiling, so their time is found whatever
    the backend (the 'torch' backend runs plain torch ops with no telling names)."""
    import torch

    from . import kernels

    names = ("resample", "resample_loss", "redshift_observed", "attention_pool")
    saved = {n: kernels.__dict__.get(n) for n in names}

    def wrap(name, fn):
        def scoped(*args, **kw):
            with torch.profiler.record_function(f"fastspec.{name}"):
                return fn(*args, **kw)
        return scoped

    for n in names:
        setattr(kernels, n, wrap(n, getattr(kernels, n)))
    try:
        yield
    finally:
        for n, fn in saved.items():
            if fn is None:
                delattr(kernels, n)  # back to the lazy import
            else:
                setattr(kernels, n, fn)


def profile_training(data, out: str, backends=("numba", "torch"), steps: int = 10, warmup: int = 3,
                     batch_size: int = 64, precision: str = "fp32", model: dict | None = None,
                     num_workers: int = 2, device: str = "auto", seed: int = 0, progress: bool = True) -> dict:
    """Profile `steps` training steps per backend; returns {backend: {"ms_per_step", "spectra_per_s",
    "categories_ms": {category: ms per step}, "trace": path}} and writes the traces to `out`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .train import TrainConfig, Trainer

    os.makedirs(out, exist_ok=True)
    results = {}
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="fastspec-profile-") as rundir:
            cfg = TrainConfig(data=list(data), out=rundir, model=dict(model or {}), steps=warmup + steps,
                              batch_size=batch_size, precision=precision, seed=seed, val_fraction=0.0,
                              checkpoint_every=0, log_every=max(1, steps), backend=backend, device=device,
                              num_workers=num_workers, progress=False, exclude_bad=True)
            trainer = Trainer(cfg)
            try:
                if warmup:
                    trainer.run(max_steps=warmup, write_files=False)  # compile numba / Triton, fill caches
                acts = [ProfilerActivity.CPU]
                on_cuda = trainer.device.type == "cuda"
                if on_cuda:
                    acts.append(ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                with scoped_kernels(), profile(activities=acts) as prof:
                    t0 = time.perf_counter()
                    trainer.run(max_steps=steps, write_files=False)
                    if on_cuda:
                        torch.cuda.synchronize()
                    wall = time.perf_counter() - t0
            finally:
                trainer.close()
        trace = os.path.join(out, f"trace-{backend}.json")
        with atomic_path(trace, sync=False) as tmp:
            prof.export_chrome_trace(str(tmp))
        events = prof.events()
        cats = categorize_events(events)
        entry = {
            "ms_per_step": 1e3 * wall / steps,
            "spectra_per_s": batch_size * steps / wall,
            "categories_ms": {k: v / 1e3 / steps for k, v in cats.items()},
            "trace": trace,
        }
        if on_cuda:
            dev = categorize_events(events, device_time=True)
            entry["device_categories_ms"] = {k: v / 1e3 / steps for k, v in dev.items()}
        results[backend] = entry
    return results


def format_table(results: dict) -> str:
    """Per-category ms/step and share of the profiled (self) time, one column per backend."""
    backends = list(results)
    head = f"{'category':<12}" + "".join(f"{b:>22}" for b in backends)
    lines = [head, "-" * len(head)]
    for cat in CATEGORIES:
        row = f"{cat:<12}"
        for b in backends:
            c = results[b]["categories_ms"]
            total = sum(c.values()) or 1.0
            row += f"{c[cat]:>12.2f} ms {100 * c[cat] / total:>5.1f}%"
        lines.append(row)
    lines.append("-" * len(head))
    lines.append(f"{'wall/step':<12}" + "".join(f"{results[b]['ms_per_step']:>12.2f} ms {'':>6}" for b in backends))
    lines.append(f"{'spectra/s':<12}" + "".join(f"{results[b]['spectra_per_s']:>15.1f} {'':>6}" for b in backends))
    return "\n".join(lines)
