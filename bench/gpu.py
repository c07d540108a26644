"""One command for a GPU: the CUDA tests, the kernel benchmarks, encode and training throughput against spender
0.3, within a time budget, written to bench/results/gpu-<card>.json and .md.

    bench/gpu.sh                          # fresh machine: installs into .venv-gpu, then runs this script
    python bench/gpu.py                   # where fastspec, its test extra and spender are installed
    python bench/gpu.py --device cpu --quick --results /tmp/check     # the same machinery on CPU, tiny sizes

Stages, in this order, each in its own subprocess with its own timeout (a stage that fails or hangs is recorded
with the end of its output and the next one runs):
  tests    pytest -m cuda: every kernel test body on the CUDA device (tests/conftest.py marks them);
           on CPU the same bodies through the Triton interpreter (tests/test_attention.py -k triton)
  kernels  resample, resample_loss, redshift_observed (bench_resample.measure_case), attention_pool
           (bench_attention.run_case), the three conv blocks (bench_conv_block.measure); forward and
           forward+backward; fp32, bf16, fp16; GB/s over each op's minimal traffic as a fraction of a copy
           kernel's bandwidth measured in the same stage; speed-ups over the torch reference and over spender's
           formulation (searchsorted + gathers; softmax pooling; nn.InstanceNorm1d → PReLU → MaxPool1d)
  encode   bench_encode: file → latents, spectra/s at batch 4096, fp32/bf16/fp16, against spender 0.3
  train    bench_train --device cuda: a training step's spectra/s and peak memory against spender 0.3
The budget (--budget-s, default 8 minutes) is shared out as it goes: each stage gets its share of what is left,
so time a stage does not use passes to the later ones. Exit status: 1 if the tests failed, 2 if nothing ran,
else 0 (a failed benchmark stage is recorded, not fatal).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import RESULTS, markdown_table  # noqa: E402

STAGES = ("tests", "kernels", "encode", "train")
SHARE = {"tests": 0.3, "kernels": 0.25, "encode": 0.2, "train": 0.25}  # of the budget left when a stage starts
MIN_STAGE_S = 5.0  # a stage is skipped when less than this is left for it
DTYPES = ("fp32", "bf16", "fp16")

# sizes per (device, quick): large batches on the GPU, tiny ones for a check of the machinery on CPU
SIZES = {
    ("cuda", False): dict(resample_n=4096, attention_n=4096, conv_n=512, repeat=5, encode_n=16384,
                          encode_batch=4096, encode_precisions="fp32,bf16,fp16", train_batches="1024",
                          train_steps=5, train_warmup=2, train_precisions="fp32,bf16"),
    ("cuda", True): dict(resample_n=256, attention_n=256, conv_n=32, repeat=2, encode_n=1024, encode_batch=512,
                         encode_precisions="fp32,bf16", train_batches="64", train_steps=2, train_warmup=1,
                         train_precisions="fp32"),
    ("cpu", False): dict(resample_n=256, attention_n=256, conv_n=16, repeat=3, encode_n=1024, encode_batch=128,
                         encode_precisions="fp32,bf16", train_batches="64", train_steps=2, train_warmup=1,
                         train_precisions="fp32,bf16"),
    ("cpu", True): dict(resample_n=4, attention_n=4, conv_n=2, repeat=1, encode_n=64, encode_batch=32,
                        encode_precisions="fp32,bf16", train_batches="8", train_steps=1, train_warmup=1,
                        train_precisions="fp32"),
}


# ---- pieces the tests exercise: pytest's summary, card names, stages under a budget, the Markdown ---------


PROGRESS = {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "xfailed", "X": "xpassed"}


def parse_pytest(output: str) -> dict:
    """Counts from pytest's final summary line ("3 passed, 1 skipped in 2.10s", "1 failed, 2 passed, 1 error"),
    the run's duration and the FAILED / ERROR lines of its short summary. Without a summary line (pytest was
    killed at the stage's timeout, or crashed) `summary` is None and the counts are read from the progress
    characters of -q ("..F.s  [ 40%]"): the tests that finished."""
    counts = {k: 0 for k in ("passed", "failed", "errors", "skipped", "deselected", "xfailed", "xpassed",
                             "warnings")}
    summary = None
    for line in reversed(output.splitlines()):
        text = line.strip().strip("=").strip()
        if re.search(r"\bin [\d.]+s\b", text) and re.search(r"\d+ \w+|no tests ran", text):
            summary = text
            break
    if summary:
        for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b",
                                  summary):
            key = {"error": "errors", "warning": "warnings"}.get(word, word)
            counts[key] += int(n)
    else:
        for line in output.splitlines():
            m = re.fullmatch(r"([.FEsxX]+)\s*(\[\s*\d+%\])?", line.strip())
            if m:
                for ch in m.group(1):
                    counts[PROGRESS[ch]] += 1
    m = re.search(r"\bin ([\d.]+)s\b", summary or "")
    problems = [line.strip() for line in output.splitlines() if re.match(r"(FAILED|ERROR) \S", line.strip())]
    return dict(counts, summary=summary, duration_s=float(m.group(1)) if m else None, problems=problems)


def card_name(info: dict, device: str) -> str:
    """What the results are named after: the GPU's name, or the CPU's on a CPU run."""
    if device == "cuda" and info.get("gpu"):
        return info["gpu"]
    return "CPU " + info.get("cpu", "unknown")


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (file-name safe)."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


@dataclass
class Stage:
    """A command run in its own process group; parse(output) -> data, called when it exits 0."""
    name: str
    cmd: list
    share: float = 1.0
    parse: object = None
    env: dict = field(default_factory=dict)


def run_stage(stage: Stage, timeout: float, echo=True) -> dict:
    """Run one stage with a timeout; its output is echoed line by line (prefixed with the stage name) and kept.
    On timeout the whole process group is terminated (then killed), so children of the stage go too."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **stage.env)
    t0 = time.perf_counter()
    proc = subprocess.Popen(stage.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", cwd=REPO, env=env, start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(f"[{stage.name}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.returncode
    reader.join(timeout=5)
    output = "".join(lines)
    res = {"status": "timeout" if timed_out else ("ok" if rc == 0 else "failed"), "returncode": rc,
           "seconds": round(time.perf_counter() - t0, 1), "timeout_s": round(timeout, 1),
           "command": shlex.join(str(c) for c in stage.cmd), "tail": output[-3000:]}
    if stage.parse is not None:
        try:
            res["data"] = stage.parse(output)
        except Exception as err:  # noqa: BLE001 - a finished stage whose results cannot be read has failed
            res["data"] = None
            if res["status"] == "ok":
                res["status"] = "failed"
                res["tail"] += f"\n(could not read the stage's results: {err.__class__.__name__}: {err})"
    return res


def run_stages(stages: list[Stage], budget_s: float, echo=True, min_stage_s: float = MIN_STAGE_S) -> dict:
    """Run the stages in order within budget_s seconds: each gets its share of the time left (share over
    the shares of the stages still to run); a stage with under min_stage_s left is skipped."""
    deadline = time.monotonic() + budget_s
    out = {}
    for i, stage in enumerate(stages):
        left = deadline - time.monotonic()
        timeout = left * stage.share / sum(s.share for s in stages[i:])
        if timeout < min_stage_s:
            out[stage.name] = {"status": "skipped", "seconds": 0.0, "timeout_s": round(max(timeout, 0.0), 1),
                               "tail": f"skipped: {max(left, 0):.0f} s of the {budget_s:.0f} s budget left"}
        else:
            if echo:
                print(f"== {stage.name}: up to {timeout:.0f} s ({left:.0f} s of the budget left)", flush=True)
            out[stage.name] = run_stage(stage, timeout, echo)
        if echo:
            print(f"== {stage.name}: {out[stage.name]['status']} in {out[stage.name]['seconds']:.0f} s", flush=True)
    return out


def exit_code(stages: dict) -> int:
    """1 if the tests ran and failed (or did not finish), 2 if no stage ran to the end, else 0."""
    if not any(s["status"] == "ok" for s in stages.values()):
        return 2
    t = stages.get("tests")
    if t is not None and t["status"] != "skipped":
        d = t.get("data") or {}
        if t["status"] != "ok" or d.get("failed") or d.get("errors") or not d.get("passed"):
            return 1
    return 0


def sig(v: float) -> str:
    """Three significant digits without an exponent: 1834.6 -> '1835', 78.1 -> '78.1', 0.0123456 -> '0.0123'."""
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}"


def _num(spec):
    return lambda v: format(v, spec)


def markdown(res: dict) -> str:
    """The results as a Markdown page naming the card."""
    m = res["machine"]
    gpu = ""
    if m.get("gpu"):
        gpu = (f"; CUDA {m.get('cuda', '?')}, driver {m.get('gpu_driver', '?')}, compute capability "
               f"{m.get('gpu_capability', '?')}, {m.get('gpu_multiprocessors', '?')} SMs, "
               f"{m.get('gpu_memory_GB', '?')} GB")
    L = [f"# fastspec GPU check: {res['card']}", "",
         f"{res['date']}, `{res['command']}` on {m.get('hostname', '?')} (device {res['device']}"
         f"{', quick sizes' if res['quick'] else ''}): torch {m.get('torch', '?')}, triton "
         f"{m.get('triton', '–')}, numba {m.get('numba', '–')}, Python {m.get('python', '?')}{gpu}; "
         f"CPU {m.get('cpu', '?')} × {m.get('cpu_count', '?')}. Budget {res['budget_s']:.0f} s, "
         f"wall {res['wall_s']:.0f} s, exit status {res['exit_code']}."
         + (" Quick sizes: the numbers check the machinery and measure nothing." if res["quick"] else ""), "",
         "## Stages", ""]
    rows = []
    for name, s in res["stages"].items():
        note = ""
        if s["status"] != "ok":
            tail = [ln for ln in s.get("tail", "").splitlines() if ln.strip()]
            note = tail[-1][:160].replace("|", "/") if tail else ""
        rows.append({"stage": name, **s, "note": note})
    L += markdown_table(rows, {"stage": ("stage", None), "status": ("status", None), "seconds": ("seconds", ".0f"),
                               "timeout s": ("timeout_s", ".0f"), "note": ("note", None)})
    tests = res["stages"].get("tests", {})
    if tests.get("data"):
        d = tests["data"]
        done = ", ".join(f"{d[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if d[k]) or "none"
        L += ["", "## Tests", "", f"`{tests['command']}`: "
              + (d["summary"] or f"stopped before pytest's summary; finished: {done}") + "."]
        if d["problems"]:
            L += [""] + [f"- {p}" for p in d["problems"][:30]]
    k = (res["stages"].get("kernels") or {}).get("data")
    if k:
        L += ["", "## Kernels", "",
              f"Copy bandwidth measured in this run: {k['copy_GBps']:.1f} GB/s (bytes read + written). GB/s counts "
              "each op's minimal traffic; 'of copy' is that over the copy bandwidth. × torch ref: speed-up over "
              "fastspec's plain-torch reference; × spender: over spender's formulation (resample: searchsorted + "
              "gathers; attention: softmax pooling; conv blocks: nn.InstanceNorm1d → PReLU → MaxPool1d). All "
              "methods' rows are in the JSON.", ""]
        fused = [r for r in k["rows"] if r["method"] in FUSED]
        L += markdown_table(fused, {"op": ("op", None), "pass": ("mode", None), "dtype": ("dtype", None),
                                    "N": ("N", "d"), "method": ("method", None), "ms": ("time_ms", sig),
                                    "GB/s": ("GBps", sig), "of copy": ("frac_copy", sig),
                                    "× torch ref": ("x_torch_ref", ".2f"), "× spender": ("x_spender", ".2f")})
        if k.get("errors"):
            L += ["", "Errors:", ""] + [f"- {e[:300]}" for e in k["errors"]]
    e = (res["stages"].get("encode") or {}).get("data")
    if e:
        L += ["", "## Encode", "", f"{e['n']} mock SDSS spectra, file → latents on file, batch {e['batch_size']}, "
              f"loader workers {e['loader_workers']}; 'stages alone' is the encoder on a batch already on the "
              "device.", ""]
        L += markdown_table(e["rows"], {"impl": ("impl", None), "precision": ("precision", None),
                                        "spectra/s": ("spectra_per_s", _num(",.0f")),
                                        "compute s": ("compute_s", sig),
                                        "× spender fp32": ("x_spender_fp32", ".2f"),
                                        "× spender same precision": ("x_spender_same_precision", ".2f")})
        if e.get("spender_note"):
            L += ["", f"spender: {e['spender_note']}"]
    t = (res["stages"].get("train") or {}).get("data")
    if t:
        L += ["", "## Training", "", f"Forward + backward + Adam on mock SDSS batches, spender 0.3's architecture "
              f"(S = 10); {t['steps']} timed steps after {t['warmup']} warm-up; peak = "
              f"{'max_memory_allocated' if t.get('device', 'cpu').startswith('cuda') else 'resident set'} above "
              "the memory before the model was built." + (f" spender: {t['spender_note']}"
                                                         if t.get("spender_note") else ""), ""]
        L += markdown_table(t["rows"], {"impl": ("impl", None), "backend": ("backend", None),
                                        "precision": ("precision", None), "batch": ("batch", "d"),
                                        "spectra/s": ("spectra_per_s", _num(",.0f")),
                                        "step ms": ("step_s", lambda v: sig(1e3 * v)),
                                        "peak MB": ("peak_mb", ".0f"), "× spender fp32": ("x_spender_fp32", ".2f"),
                                        "× spender same precision": ("x_spender_same_precision", ".2f"),
                                        "memory / spender fp32": ("mem_vs_spender", ".2f")})
    failed = {n: s for n, s in res["stages"].items() if s["status"] not in ("ok", "skipped")}
    if failed:
        L += ["", "## Output of the stages that did not finish", ""]
        for n, s in failed.items():
            L += [f"{n} ({s['status']}):", "", "```", *s.get("tail", "").splitlines()[-15:], "```", ""]
    return "\n".join(L).rstrip() + "\n"


# ---- stages' own processes: `gpu.py --stage NAME` runs one benchmark stage and writes its JSON ------------

FUSED = ("triton", "triton-det", "numba", "fused")
RESAMPLE_OPS = {"resample_fwd": ("resample", "fwd"), "resample_fwd_bwd": ("resample", "fwd+bwd"),
                "loss_fwd": ("resample_loss", "fwd"), "loss_fwd_bwd": ("resample_loss", "fwd+bwd"),
                "redshift_observed_fwd": ("redshift_observed", "fwd")}


def kernel_rows(rows: list[dict], dtype: str, op_mode, method: str, gbps: str, torch_ref: str, spender: str,
                bw: float) -> list[dict]:
    """The rows of one kernel benchmark in the common schema (op, mode, dtype, N, method, time_ms, GBps,
    frac_copy, x_torch_ref, x_spender); op_mode(row) -> (op, mode); speed-ups over the rows of the methods
    `torch_ref` and `spender` with the same op, mode and N."""
    out = []
    for r in rows:
        o, m = op_mode(r)
        out.append({"op": o, "mode": m, "dtype": dtype, "N": r["N"], "method": r[method], "time_ms": r["time_ms"],
                    "GBps": r[gbps], "frac_copy": r[gbps] / bw})
    for r in out:
        peers = {q["method"]: q["time_ms"] for q in out if (q["op"], q["mode"], q["N"]) == (r["op"], r["mode"], r["N"])}
        r["x_torch_ref"] = peers[torch_ref] / r["time_ms"] if torch_ref in peers else None
        r["x_spender"] = peers[spender] / r["time_ms"] if spender in peers else None
    return out


def stage_kernels(device: str, sz: dict, dtypes) -> dict:
    import bench_attention
    import bench_conv_block
    import bench_resample
    import torch
    from common import bandwidth_floor

    bw = bandwidth_floor(device)
    print(f"copy bandwidth {bw:.1f} GB/s ({device})", flush=True)
    rows, errors = [], []
    for name in dtypes:
        dtype = bench_attention.DTYPES[name]
        try:
            d = bench_resample.make_inputs(sz["resample_n"], device, dtype=dtype)
            res = []
            for op in RESAMPLE_OPS:  # spender's own transform is searchsorted's formulation: left out here
                methods = [m for m in bench_resample.methods_for(device, op) if m != "spender"]
                res += bench_resample.measure_case(op, d, methods, sz["repeat"], bw, device)
            del d
            rows += kernel_rows(res, name, lambda r: RESAMPLE_OPS[r["op"]], "method", "GBps", "torch-index",
                                "searchsorted", bw)
        except Exception as err:  # noqa: BLE001 - recorded; the other ops still run
            errors.append(f"resample {name}: {err.__class__.__name__}: {err}")
        try:
            att = [bench_attention.run_case(impl, mode, sz["attention_n"], dtype, device, sz["repeat"], bw)
                   for mode in ("fwd", "fwd+bwd") for impl in bench_attention.IMPLS]
            rows += kernel_rows(att, name, lambda r: ("attention_pool", r["mode"]), "impl", "GB_per_s",
                                "torch_ref", "torch_softmax", bw)
        except Exception as err:  # noqa: BLE001
            errors.append(f"attention_pool {name}: {err.__class__.__name__}: {err}")
        try:
            conv = bench_conv_block.measure(sz["conv_n"], dtype, device, sz["repeat"], bw)
            rows += kernel_rows(conv, name, lambda r: (f"conv_{r['block']}", r["mode"]), "impl", "GB_per_s",
                                "torch_ref", "torch_modules", bw)
        except Exception as err:  # noqa: BLE001
            errors.append(f"conv blocks {name}: {err.__class__.__name__}: {err}")
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: {sum(r['dtype'] == name for r in rows)} rows, {len(errors)} errors so far", flush=True)
    for e in errors:
        print("error:", e, flush=True)
    return {"copy_GBps": bw, "rows": rows, "errors": errors}


def _bench_main(module: str, argv: list[str], name: str, raw: Path) -> dict:
    """Run a benchmark script's main() with its results file redirected into `raw`; its JSON payload."""
    import importlib

    import common

    common.RESULTS = raw
    rc = importlib.import_module(module).main(argv + ["--out", name])
    if rc:
        raise SystemExit(f"{module} exited with {rc}")
    return json.loads((raw / f"{name}.json").read_text())


def stage_encode(device: str, sz: dict, raw: Path) -> dict:
    res = _bench_main("bench_encode", ["--device", device, "--n", str(sz["encode_n"]), "--batch-size",
                                       str(sz["encode_batch"]), "--precisions", sz["encode_precisions"],
                                       "--repeat", "1"], "bench-encode", raw)
    res.pop("machine", None)
    res.pop("table", None)
    from bench_train import spender_available

    res["spender_note"] = spender_available()
    return res


def stage_train(device: str, sz: dict, case_timeout: float, raw: Path) -> dict:
    res = _bench_main("bench_train", ["--device", device, "--batches", *sz["train_batches"].split(","),
                                      "--steps", str(sz["train_steps"]), "--warmup", str(sz["train_warmup"]),
                                      "--precisions", sz["train_precisions"], "--side-by-side-only",
                                      "--converge-steps", "0", "--trainer-steps", "0",
                                      "--timeout", str(max(10, int(case_timeout)))],
                      "bench-train", raw)
    res.pop("machine", None)
    for r in res["rows"]:
        r.pop("breakdown_ms", None)
    return res


def run_stage_child(a) -> int:
    sz = SIZES[(a.device, a.quick)]
    raw = Path(a.stage_out).parent  # the parent's scratch folder: the benchmarks' own results files go there
    if a.stage == "kernels":
        data = stage_kernels(a.device, sz, a.dtypes.split(","))
    elif a.stage == "encode":
        data = stage_encode(a.device, sz, raw)
    elif a.stage == "train":
        data = stage_train(a.device, sz, a.budget_s, raw)  # the stage's own timeout stops it sooner
    else:
        raise SystemExit(f"unknown stage {a.stage!r}")
    Path(a.stage_out).write_text(json.dumps(data, default=str))
    return 0


# ---- main -------------------------------------------------------------------------------------------------


def build_stages(a, raw: Path) -> list[Stage]:
    py = sys.executable
    stages = []
    for name in a.stages.split(","):
        if name == "tests":
            if a.pytest_args is not None:
                sel = shlex.split(a.pytest_args)
            elif a.device == "cuda":
                sel = ["-m", "cuda", "--continue-on-collection-errors", "tests"]
            else:
                sel = ["tests/test_attention.py", "-k", "triton"]
            stages.append(Stage("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sel],
                                SHARE["tests"], parse_pytest))
        elif name in SHARE:
            out = raw / f"{name}.json"
            cmd = [py, str(Path(__file__).resolve()), "--stage", name, "--device", a.device, "--stage-out", str(out),
                   "--dtypes", a.dtypes, "--budget-s", str(a.budget_s)]
            if a.quick:
                cmd.append("--quick")

            def parse(_output, out=out):
                return json.loads(out.read_text())

            stages.append(Stage(name, cmd, SHARE[name], parse))
        else:
            raise SystemExit(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
    return stages


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery, measures nothing")
    p.add_argument("--budget-s", type=float, default=480, help="seconds for all stages together (default 480)")
    p.add_argument("--results", default=str(RESULTS), help="where gpu-<card>.json and .md go (bench/results)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--dtypes", default=",".join(DTYPES), help="kernel benchmark dtypes (default fp32,bf16,fp16)")
    p.add_argument("--pytest-args", default=None, help="the tests stage's pytest selection instead of the default")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stage:
        return run_stage_child(a)

    import torch
    from common import machine_info

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device visible (torch.cuda.is_available() is False); "
              "`--device cpu --quick` checks the script on CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    info = machine_info()
    card = card_name(info, a.device)
    print(f"fastspec GPU check on {card}: stages {a.stages}, budget {a.budget_s:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastspec-gpu-") as raw:
        stages = build_stages(a, Path(raw))
        done = run_stages(stages, a.budget_s)
    res = {"benchmark": "fastspec GPU check (bench/gpu.py)", "card": card, "slug": slug(card),
           "date": info["date"], "device": a.device, "quick": a.quick, "budget_s": a.budget_s,
           "command": shlex.join(["python", "bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
           "machine": info, "stages": done, "wall_s": round(time.perf_counter() - t0, 1)}
    res["exit_code"] = exit_code(done)
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"gpu-{slug(card)}"
    for suffix, text in ((".json", json.dumps(res, indent=1, default=str)), (".md", markdown(res))):
        tmp = base.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, base.with_suffix(suffix))
    print("\n" + markdown(res))
    print(f"wrote {base}.json and {base}.md; exit status {res['exit_code']}", flush=True)
    return res["exit_code"]


if __name__ == "__main__":
    raise SystemExit(main())
