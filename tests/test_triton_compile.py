"""Every Triton kernel compiles for the GPUs users train on — sm_70 (V100: fp32, fp16; no bf16), sm_80 and
sm_90 (fp32, fp16, bf16) — on a machine without a GPU, and its PTX is sane: an entry point, no local-memory
spills, atomics only where a kernel is meant to have them, inputs read at their own width.

The compiles run in one subprocess without TRITON_INTERPRET (this process has the interpreter on, which turns
even tl.sum into an interpreted function that cannot be compiled).
"""
import pytest

pytest.importorskip("triton")

from fastspec.kernels.triton_compile import (  # noqa: E402
    KERNEL_MODULES,
    TARGETS,
    PtxReport,
    compile_modules_subprocess,
)

MODULES = list(KERNEL_MODULES)
CASES = [(mod, cc, dtype) for mod in MODULES for cc, dtypes in TARGETS.items() for dtype in dtypes]
WIDTH = {"fp32": "b32", "fp16": "b16", "bf16": "b16"}


@pytest.fixture(scope="module")
def compiled():
    return {(r["module"], r["cc"], r["dtype"]): r for r in compile_modules_subprocess(MODULES)}


@pytest.mark.parametrize("modname,cc,dtype", CASES, ids=[f"{m.rsplit('.', 1)[1].removesuffix('_triton')}-sm{c}-{d}" for m, c, d in CASES])
def test_kernels_compile(compiled, modname, cc, dtype):
    rec = compiled[(modname, cc, dtype)]
    assert rec["status"] == "ok", f"{modname} sm_{cc} {dtype} failed to compile:\n{rec['error']}"
    assert rec["reports"], f"{modname}.triton_compile_specs({dtype!r}) returned no kernels"
    for r in map(lambda d: PtxReport(**d), rec["reports"]):
        print(dtype, r.summary())
        assert r.global_loads, f"{r.name}: no global loads in the PTX"
        assert r.local_loads == 0 and r.local_stores == 0, f"{r.name}: local-memory traffic (spills) on sm_{cc}"
        if modname.endswith("resample_triton"):
            # Inputs are loaded at their storage width and upcast in registers.
            assert any(WIDTH[dtype] in k for k in r.global_loads), f"{r.name}: no {WIDTH[dtype]} loads"
            if "gather" in r.name or "fwd" in r.name:
                assert not r.atomics, f"{r.name}: atomics in a kernel meant to be deterministic"
            if "scatter" in r.name:
                assert r.atomics, f"{r.name}: the scatter backward lost its atomics"


def test_bf16_is_not_a_v100_target():
    assert "bf16" not in TARGETS[70] and set(TARGETS[80]) == set(TARGETS[90]) == {"fp32", "fp16", "bf16"}
