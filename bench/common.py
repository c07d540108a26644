"""Shared benchmark helpers: machine description, the memory-bandwidth floor, timing, tables, results files."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except Exception:
        pass
    try:
        import numba

        info["numba"] = numba.__version__
    except Exception:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_GB"] = round(props.total_memory / 1e9, 1)
        info["gpu_multiprocessors"] = props.multi_processor_count
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.split()
            if out:
                info["gpu_driver"] = out[0]
        except Exception:
            pass
    return info


# ---- resident memory of this process (Linux /proc; peak falls back to getrusage elsewhere) ----------------


def rss_mb() -> float:
    """Current resident set size in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0), so a later peak_mb() reads the peak from here on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak resident set size in MB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e3  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux


def timeit(fn, repeat: int = 5, warmup: int = 1, sync=None) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth_floor(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Measured copy bandwidth in GB/s (bytes read + bytes written per second) of a large tensor copy."""
    import torch

    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = timeit(lambda: dst.copy_(src), repeat=7, warmup=2, sync=sync)
    return 2 * n * 4 / t / 1e9


def print_table(rows: list[dict], columns: list[str] | None = None, title: str | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.rjust(widths[c]) for c in columns))
    lines.append("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        lines.append("  ".join(fmt(r.get(c, "")).rjust(widths[c]) for c in columns))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def markdown_table(rows: list[dict], columns: dict) -> list[str]:
    """A Markdown table as lines: `columns` maps each header to (key, format spec or callable); a missing,
    None or NaN value shows as '–'."""

    def cell(row, key, fmt):
        v = row.get(key)
        if v is None or (isinstance(v, float) and v != v):
            return "–"
        if callable(fmt):
            return fmt(v)
        return format(v, fmt) if fmt else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, key, fmt) for key, fmt in columns.values()) + " |" for r in rows]
    return lines


def write_results(name: str, payload: dict, rows: list[dict] | None = None) -> Path:
    """Write bench/results/<name>.json (and .csv of `rows`) atomically; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    if rows:
        import csv

        cpath = RESULTS / f"{name}.csv"
        ctmp = cpath.with_suffix(".csv.tmp")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(ctmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(ctmp, cpath)
    return path


def mock_sdss_file(n: int, cache) -> str:
    """n mock SDSS spectra (seed 0, no restframe truth) in the cache folder as mock-sdss-<n>.h5, written once."""
    path = Path(cache) / f"mock-sdss-{n}.h5"
    if not path.exists():
        from fastspec.mock import write_mock

        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {n} mock SDSS spectra to {path} …", flush=True)
        write_mock(path, n, instrument="sdss", seed=0, restframe_truth=False, progress=False)
    return str(path)


def spender_sdss_model(seed: int = 0, z_max: float = 0.5):
    """spender 0.3's SDSS SpectrumAutoencoder (S=10) built as its train_sdss.py does; returns (model, instrument)."""
    import spender
    import torch

    wave_obs = 10 ** torch.arange(3.578, 3.97, 0.0001)
    inst = spender.Instrument(wave_obs)
    L = wave_obs.shape[0]
    wave_rest = torch.linspace(wave_obs.min() / (1 + z_max), wave_obs.max(), int(L * (1 + z_max)),
                               dtype=torch.float32)
    torch.manual_seed(seed)
    return spender.SpectrumAutoencoder(inst, wave_rest, n_latent=10), inst
