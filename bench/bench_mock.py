"""Mock generation throughput (spectra/s): in memory and written to HDF5, SDSS with and without the restframe
truth, and DESI. Prints a table and writes bench/results/mock.json (+ .csv) with the machine description.

    .venv/bin/python bench/bench_mock.py [-n 10000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, print_table, write_results  # noqa: E402


def _generate(gen, n: int) -> None:
    for _ in gen.rows(0, n):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10_000, help="spectra per case (default 10000)")
    args = ap.parse_args(argv)

    import numba

    from fastspec.mock import CHUNK, MockGenerator, write_mock

    t0 = time.perf_counter()
    MockGenerator("sdss").chunk(0, 8)  # templates, basis, numba (cache) load: the one-time cost
    setup_s = time.perf_counter() - t0

    cases = [("sdss", True), ("sdss", False), ("desi", True), ("desi", False)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_mock_") as tmp:
        for inst, rest in cases:
            gen = MockGenerator(inst, seed=1, restframe_truth=rest)
            gen.chunk(0, 8)  # this instrument's basis
            t, c = time.perf_counter(), time.process_time()
            _generate(gen, args.n)
            mem_s, mem_cpu = time.perf_counter() - t, time.process_time() - c
            path = os.path.join(tmp, f"{inst}-{rest}.h5")
            t = time.perf_counter()
            info = write_mock(path, args.n, instrument=inst, seed=1, restframe_truth=rest, progress=False)
            file_s = time.perf_counter() - t
            rows.append({
                "instrument": inst,
                "restframe_truth": rest,
                "n": args.n,
                "memory_s": round(mem_s, 3),
                "memory_spectra_per_s": round(args.n / mem_s),
                "memory_cpu_s": round(mem_cpu, 3),  # all threads: spectra per CPU-second, whatever the load
                "spectra_per_cpu_s": round(args.n / mem_cpu),
                "file_s": round(file_s, 3),
                "file_spectra_per_s": round(args.n / file_s),
                "file_MiB": round(info["bytes"] / 2**20, 1),
                "s_per_100k_file": round(file_s * 100_000 / args.n, 1),
            })
            os.remove(path)
    print_table(rows, title=f"mock generation, N = {args.n} per case (chunks of {CHUNK}); "
                            f"one-time setup {setup_s:.2f} s")
    info = machine_info()
    info["numba_threads"] = numba.get_num_threads()
    info["loadavg_1min"] = os.getloadavg()[0]
    path = write_results("mock", {"machine": info, "setup_s": setup_s, "chunk": CHUNK, "results": rows}, rows)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
