"""Whole-process measurements, as `/usr/bin/time -v` makes them: wall time from spawn to exit, user + system CPU
time and the peak resident set size of the process (and of any children it waited for), read from wait4's rusage.
bench_train.py and bench_encode.py use it to time `fastspec train` / `fastspec encode` with their default settings
beside the loop a spender 0.3 user writes (bench/spender_user.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fastspec.memory import LEAN_GLIBC_TUNABLES

SPENDER_USER = str(Path(__file__).resolve().parent / "spender_user.py")


def fastspec_exe() -> str:
    """The `fastspec` command of this interpreter's environment (what a user of that venv runs)."""
    return os.path.join(os.path.dirname(sys.executable), "fastspec")


# fastspec's defaults in a process started with fastspec.memory.LEAN_GLIBC_TUNABLES (freed memory returned)
LEAN_LABEL = "default, GLIBC_TUNABLES=LEAN_GLIBC_TUNABLES"
LEAN_ENV = {"GLIBC_TUNABLES": LEAN_GLIBC_TUNABLES}


def default_label() -> str:
    """How the tables name fastspec's default settings: `auto` precision, resolved for this CPU."""
    import torch

    from fastspec.train import resolve_precision

    return f"default (auto → {resolve_precision('auto', torch.device('cpu'))} on this CPU)"


# A child's peak RSS (ru_maxrss) includes the memory of the process it was forked or vfork-ed from: at exec the
# kernel folds the old address space's high-water mark into it. Spawned straight from a benchmark that has
# imported torch, `python -c pass` would report ~250 MB. So a bare Python launcher (~10 MB) spawns the command,
# times it from spawn to exit and reports wait4's rusage.
_LAUNCHER = """
import json, os, sys, time
t = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
with open(sys.argv[1], "w") as fh:
    json.dump({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss,
               "rc": os.waitstatus_to_exitcode(status)}, fh)
"""


def run_measured(cmd: list[str], extra_env: dict | None = None, cwd: str | None = None) -> dict:
    """Run cmd to completion, in this environment plus `extra_env`; {cmd, wall_s, cpu_s, peak_rss_mb, result (its
    last stdout line, if JSON), stderr_tail}. Raises RuntimeError with the command's stderr when it fails."""
    env = {**os.environ, **extra_env} if extra_env else None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".json") as usage:
        subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, usage.name, *cmd], stdin=subprocess.DEVNULL,
                       stdout=out, stderr=err, env=env, cwd=cwd, check=False)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        try:
            ru = json.load(usage)
        except ValueError:
            raise RuntimeError(f"{' '.join(cmd)} could not be launched:\n{stderr[-3000:]}") from None
    if ru["rc"]:
        raise RuntimeError(f"{' '.join(cmd)} exited with {ru['rc']}:\n{stderr[-3000:]}")
    lines = stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    return {"cmd": " ".join(cmd), "wall_s": round(ru["wall_s"], 2), "cpu_s": round(ru["cpu_s"], 2),
            "peak_rss_mb": round(ru["maxrss_kb"] / 1024, 1), "result": result, "stderr_tail": stderr[-1500:]}


def fastest(rows: list[dict]) -> dict:
    """{(impl, settings): the row with the shortest wall time} over the repeats."""
    best: dict = {}
    for r in rows:
        k = (r["impl"], r["settings"])
        if k not in best or r["wall_s"] < best[k]["wall_s"]:
            best[k] = r
    return best


def write_markdown(path, title: str, payload: dict, table: list[str], ratios: dict, extra: tuple = ()) -> None:
    """bench/results/<name>.md: what ran, where, under which load, the table, the ratios and any extra findings."""
    findings = [*(f"{k.replace('_', ' ')}: {v}" for k, v in ratios.items()), *extra]
    m = payload["machine"]
    load = payload.get("load_average_start_end") or [payload.get("load_average_before"), payload.get("load_average_end")]
    fmt_load = [" ".join(f"{v:.2f}" for v in x) if x else "?" for x in load]
    lines = [f"# {title}", "",
             f"{m.get('cpu', '?')}, {m['cpu_count']} cores, torch {m['torch']}, {m['date']}; load average (1/5/15 min) "
             f"{fmt_load[0]} before, {fmt_load[1]} after. Whole processes, each timed from spawn to exit (wall), "
             "with its user + system CPU time and peak resident set (wait4's rusage, as /usr/bin/time reports it); "
             "interleaved, the fastest repeat of each shown.", "", *table, "", *[f"* {f}" for f in findings], ""]
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, path)
