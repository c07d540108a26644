"""bench/gpu.py, the one-command GPU check, without a GPU: pytest's summary parsed, card names made file-safe,
stages run under a budget (a hung stage is stopped and the next one runs), the Markdown written from a result,
and the whole script end to end on CPU with tiny sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import gpu  # noqa: E402


@pytest.mark.parametrize("output,expected", [
    ("....s\n3 passed, 1 skipped in 2.10s\n", dict(passed=3, skipped=1, failed=0, errors=0, duration_s=2.10)),
    ("FAILED tests/test_a.py::test_x[triton-cuda] - AssertionError: max error\n"
     "========== 1 failed, 2 passed, 4 warnings in 0.51s ==========\n",
     dict(passed=2, failed=1, warnings=4, duration_s=0.51)),
    ("ERROR tests/test_b.py - ModuleNotFoundError: No module named 'astropy'\n"
     "= 12 passed, 140 deselected, 1 error in 30.00s =\n",
     dict(passed=12, deselected=140, errors=1, failed=0)),
    ("2 errors in 1.2s\n", dict(errors=2, passed=0)),
    ("1 xfailed, 1 xpassed, 1 warning in 0.1s\n", dict(xfailed=1, xpassed=1, warnings=1)),
    ("no tests ran in 0.01s\n", dict(passed=0, failed=0, duration_s=0.01)),
])
def test_parse_pytest_summary(output, expected):
    got = gpu.parse_pytest(output)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v) if isinstance(v, float) else got[k] == v, k
    assert got["summary"] is not None
    if "FAILED" in output or "ERROR" in output:
        assert len(got["problems"]) == 1 and got["problems"][0].split()[0] in ("FAILED", "ERROR")


def test_parse_pytest_without_summary_counts_progress():
    """Killed at the timeout: no summary line, the progress characters say what finished."""
    got = gpu.parse_pytest("..F.s.                         [ 40%]\n.E.x\n")
    assert got["summary"] is None and got["duration_s"] is None
    assert (got["passed"], got["failed"], got["skipped"], got["errors"], got["xfailed"]) == (6, 1, 1, 1, 1)
    # a warning summary line that only looks like counts is not mistaken for the result
    assert gpu.parse_pytest("tests/x.py:3: DeprecationWarning: 2 passed in\n")["passed"] == 0


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb"),
    ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "nvidia-a100-sxm4-40gb-mig-1g-5gb"),
    ("CPU Intel(R) Xeon(R) Processor", "cpu-intel-r-xeon-r-processor"),
    ("  ", "unknown"),
])
def test_slug(name, expected):
    assert gpu.slug(name) == expected


@pytest.mark.parametrize("v,text", [(1834.5678, "1835"), (78.12, "78.1"), (2.9, "2.90"), (0.0123456, "0.0123"),
                                    (0.6090, "0.609"), (100.0, "100"), (0, "0")])
def test_sig(v, text):
    assert gpu.sig(v) == text


def test_card_name():
    assert gpu.card_name({"gpu": "NVIDIA H200", "cpu": "x"}, "cuda") == "NVIDIA H200"
    assert gpu.card_name({"gpu": "NVIDIA H200", "cpu": "AMD EPYC"}, "cpu") == "CPU AMD EPYC"
    assert gpu.card_name({}, "cpu") == "CPU unknown"


def test_stage_past_its_timeout_is_stopped_and_the_next_runs(tmp_path):
    marker = tmp_path / "child-alive"
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import pathlib, time\ntime.sleep(3)\npathlib.Path({str(marker)!r}).write_text('x')\n")
    # the hung stage starts a grandchild: stopping the stage must stop the whole process group
    hang = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(grandchild)!r}]); "
            "print('started', flush=True); time.sleep(60)")
    stages = [gpu.Stage("hang", [sys.executable, "-c", hang], share=1.0),
              gpu.Stage("fails", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], share=1.0),
              gpu.Stage("quick", [sys.executable, "-c", "print('3 passed in 0.01s')"], share=1.0,
                        parse=gpu.parse_pytest)]
    t0 = time.monotonic()
    out = gpu.run_stages(stages, budget_s=6.0, echo=False, min_stage_s=0.5)
    elapsed = time.monotonic() - t0
    assert out["hang"]["status"] == "timeout" and "started" in out["hang"]["tail"]
    assert out["hang"]["timeout_s"] == pytest.approx(2.0, abs=0.3)  # a third of the budget
    assert out["fails"]["status"] == "failed" and out["fails"]["returncode"] == 3 and "boom" in out["fails"]["tail"]
    assert out["quick"]["status"] == "ok" and out["quick"]["data"]["passed"] == 3
    assert elapsed < 15
    time.sleep(3.5)
    assert not marker.exists(), "the stage's grandchild outlived the timeout"
    assert gpu.exit_code(out) == 0  # no tests stage among them; one stage ran to the end


def test_budget_spent_skips_the_remaining_stages():
    stages = [gpu.Stage("slow", [sys.executable, "-c", "import time; time.sleep(30)"], share=100.0),
              gpu.Stage("tests", [sys.executable, "-c", "print('1 passed in 0.1s')"], share=1.0,
                        parse=gpu.parse_pytest)]
    out = gpu.run_stages(stages, budget_s=3.0, echo=False, min_stage_s=0.5)
    assert out["slow"]["status"] == "timeout"
    assert out["tests"]["status"] == "skipped" and "budget" in out["tests"]["tail"]
    assert gpu.exit_code(out) == 2  # nothing ran to the end


def test_exit_code():
    ok = {"status": "ok", "data": {"passed": 3, "failed": 0, "errors": 0}}
    bench_failed = {"status": "failed", "data": None}
    assert gpu.exit_code({"tests": ok, "kernels": bench_failed}) == 0
    assert gpu.exit_code({"tests": dict(ok, status="failed", data={"passed": 2, "failed": 1, "errors": 0}),
                          "kernels": {"status": "ok"}}) == 1
    assert gpu.exit_code({"tests": dict(ok, status="timeout"), "kernels": {"status": "ok"}}) == 1
    assert gpu.exit_code({"tests": dict(ok, data={"passed": 0, "failed": 0, "errors": 0})}) == 1  # none selected
    assert gpu.exit_code({"tests": {"status": "skipped"}, "kernels": {"status": "ok"}}) == 0
    assert gpu.exit_code({"kernels": bench_failed}) == 2


def synthetic_result():
    stage = dict(status="ok", seconds=12.0, timeout_s=100.0, returncode=0, tail="", command="pytest -m cuda")
    return {
        "card": "NVIDIA H100 80GB HBM3", "date": "2026-12-01T00:00:00+00:00", "device": "cuda", "quick": False,
        "budget_s": 480, "wall_s": 401.7, "exit_code": 1, "command": "python bench/gpu.py",
        "machine": {"hostname": "gpu1", "torch": "2.13.0+cu130", "triton": "3.7.1", "gpu": "NVIDIA H100 80GB HBM3",
                    "cuda": "13.0", "gpu_driver": "580.159.04", "gpu_capability": "9.0", "gpu_multiprocessors": 132,
                    "gpu_memory_GB": 85.0, "cpu": "AMD EPYC", "cpu_count": 16, "python": "3.12.3"},
        "stages": {
            "tests": dict(stage, status="failed", returncode=1, data=gpu.parse_pytest(
                "FAILED tests/test_resample.py::test_opcheck[triton-cuda] - RuntimeError: bad\n"
                "1 failed, 150 passed, 3 skipped in 95.20s\n")),
            "kernels": dict(stage, data={"copy_GBps": 3012.34, "errors": ["conv blocks fp16: RuntimeError: no"],
                                         "rows": [
                dict(op="resample", mode="fwd+bwd", dtype="bf16", N=4096, method="triton", time_ms=0.123456,
                     GBps=1834.5678, frac_copy=0.6090, x_torch_ref=7.891, x_spender=23.456),
                dict(op="resample", mode="fwd+bwd", dtype="bf16", N=4096, method="searchsorted", time_ms=2.9,
                     GBps=78.1, frac_copy=0.026, x_torch_ref=0.33, x_spender=1.0)]}),
            "encode": dict(stage, data={"n": 16384, "batch_size": 4096, "loader_workers": 6, "rows": [
                dict(impl="fastspec", precision="bf16", spectra_per_s=123456.7, compute_s=0.0812,
                     x_spender_fp32=5.4321, x_spender_same_precision=3.21),
                dict(impl="spender 0.3", precision="bf16", spectra_per_s=38459.1, compute_s=0.3,
                     x_spender_fp32=None, x_spender_same_precision=1.0)]}),
            "train": dict(stage, status="timeout", returncode=-15, tail="running spender fp32 batch 1024 …\n",
                          data=None),
        },
    }


def test_markdown_names_the_card_and_formats_the_numbers():
    md = gpu.markdown(synthetic_result())
    lines = md.splitlines()
    assert lines[0] == "# fastspec GPU check: NVIDIA H100 80GB HBM3"
    assert "driver 580.159.04" in md and "compute capability 9.0" in md and "torch 2.13.0+cu130" in md
    assert "| tests | failed | 12 | 100 |" in md
    assert "| train | timeout | 12 | 100 | running spender fp32 batch 1024 … |" in md
    assert "1 failed, 150 passed, 3 skipped in 95.20s" in md
    assert "- FAILED tests/test_resample.py::test_opcheck[triton-cuda] - RuntimeError: bad" in md
    assert "3012.3 GB/s" in md
    assert "| resample | fwd+bwd | bf16 | 4096 | triton | 0.123 | 1835 | 0.609 | 7.89 | 23.46 |" in lines
    assert not any("| searchsorted |" in ln for ln in lines)  # the references' rows stay in the JSON
    assert "- conv blocks fp16: RuntimeError: no" in md
    assert "| fastspec | bf16 | 123,457 | 0.0812 | 5.43 | 3.21 |" in lines
    assert "| spender 0.3 | bf16 | 38,459 | 0.300 | – | 1.00 |" in lines
    assert "## Training" not in md  # the stage did not finish: no table, its output instead
    assert "train (timeout):" in md and "```" in md
    res = synthetic_result()
    res["stages"]["tests"].update(status="timeout", data=gpu.parse_pytest("...F.s\n"))
    assert "stopped before pytest's summary; finished: 4 passed, 1 failed, 1 skipped." in gpu.markdown(res)


def test_cpu_run_end_to_end(tmp_path):
    """The script as a user runs it, on CPU with tiny sizes: every stage runs, and the JSON and Markdown it
    writes agree with each other."""
    cmd = [sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--quick", "--dtypes", "fp32,bf16",
           "--results", str(tmp_path), "--budget-s", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    js, mds = list(tmp_path.glob("gpu-cpu-*.json")), list(tmp_path.glob("gpu-cpu-*.md"))
    assert len(js) == 1 and len(mds) == 1 and js[0].stem == mds[0].stem
    res = json.loads(js[0].read_text())
    md = mds[0].read_text()
    assert res["device"] == "cpu" and res["quick"] and res["exit_code"] == 0
    assert md.splitlines()[0] == f"# fastspec GPU check: {res['card']}"
    assert {n: s["status"] for n, s in res["stages"].items()} == dict.fromkeys(gpu.STAGES, "ok")
    tests = res["stages"]["tests"]["data"]
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    assert f"{tests['passed']} passed" in md
    k = res["stages"]["kernels"]["data"]
    assert k["errors"] == [] and k["copy_GBps"] > 0
    fused = [r for r in k["rows"] if r["method"] in gpu.FUSED]
    ops = {(r["op"], r["mode"], r["dtype"]) for r in fused}
    for dtype in ("fp32", "bf16"):
        for op, mode in [("resample", "fwd"), ("resample", "fwd+bwd"), ("resample_loss", "fwd"),
                         ("resample_loss", "fwd+bwd"), ("redshift_observed", "fwd"), ("attention_pool", "fwd"),
                         ("attention_pool", "fwd+bwd"), ("conv_block1", "fwd+bwd"), ("conv_block3", "fwd")]:
            assert (op, mode, dtype) in ops
    for r in fused:  # each fused row of the table, as formatted from the JSON
        assert r["x_torch_ref"] and r["x_spender"] and r["frac_copy"] == pytest.approx(r["GBps"] / k["copy_GBps"])
        assert (f"| {r['op']} | {r['mode']} | {r['dtype']} | {r['N']} | {r['method']} | {gpu.sig(r['time_ms'])} | "
                f"{gpu.sig(r['GBps'])} | {gpu.sig(r['frac_copy'])} |") in md
    enc = res["stages"]["encode"]["data"]
    assert {r["precision"] for r in enc["rows"] if r["impl"] == "fastspec"} == {"fp32", "bf16"}
    for r in enc["rows"]:
        assert f"| {r['impl']} | {r['precision']} | {r['spectra_per_s']:,.0f} |" in md
    train = res["stages"]["train"]["data"]
    fs = [r for r in train["rows"] if r["impl"] == "fastspec"]
    assert fs and all(r["spectra_per_s"] > 0 and r["peak_mb"] > 0 for r in fs)
    assert f"| fastspec | numba | fp32 | 8 | {fs[0]['spectra_per_s']:,.0f} |" in md


def test_cuda_marker_selects_the_kernel_tests_on_cuda(tmp_path):
    """`pytest -m cuda` (the tests stage) selects the kernel tests that run on the GPU: collected here with
    torch.cuda.is_available() faked to True before the conftest reads it (collection runs no kernel)."""
    (tmp_path / "fakecuda.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    repo = BENCH.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    files = ["tests/test_attention.py", "tests/test_conv_block.py"]

    def collect(*extra):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                               "-m", "cuda", *extra, *files], capture_output=True, text=True, cwd=repo, env=env,
                              timeout=120)
        return [ln for ln in proc.stdout.splitlines() if "::" in ln]

    ids = collect("-p", "fakecuda")
    assert len(ids) >= 20
    assert all("cuda" in i or "::test_triton_" in i for i in ids), ids
    assert any("test_triton_block_edges" in i for i in ids) and not any("numba" in i for i in ids)
    import torch

    if not torch.cuda.is_available():
        assert collect() == []  # nothing runs on CUDA without one
