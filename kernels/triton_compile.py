"""Compiling the Triton kernels for real GPUs on a machine without one, and reading their PTX.

`compile_for_target` turns a (kernel, signature, constexprs) spec — what each Triton kernel module returns from
`triton_compile_specs(dtype)` — into PTX for a CUDA compute capability with no GPU present (CI proves every
kernel compiles for sm_70/80/90 this way). `ptx_report` reads the PTX back: vector widths of global loads and
stores, atomics, local-memory (spill) traffic. `python -m fastspec.kernels.triton_compile` prints a summary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Compute capabilities CI compiles for, with the dtypes each supports (V100 has no bf16).
TARGETS = {70: ("fp32", "fp16"), 80: ("fp32", "fp16", "bf16"), 90: ("fp32", "fp16", "bf16")}
# The Triton kernel modules, each with triton_compile_specs(dtype) -> [(name, kernel, signature, constexprs)].
KERNEL_MODULES = ("fastspec.kernels.resample_triton", "fastspec.kernels.attention_triton",
                  "fastspec.kernels.conv_block_triton")


@dataclass
class PtxReport:
    """What the PTX of one compiled kernel says about its memory traffic."""

    name: str
    cc: int
    ptx_lines: int
    global_loads: dict[str, int] = field(default_factory=dict)  # e.g. {'ld.global.v4.b32': 2, ...}
    global_stores: dict[str, int] = field(default_factory=dict)
    atomics: dict[str, int] = field(default_factory=dict)
    local_loads: int = 0  # ld.local: register spills (or local arrays)
    local_stores: int = 0

    def summary(self) -> str:
        loads = ", ".join(f"{k}×{v}" for k, v in sorted(self.global_loads.items()))
        stores = ", ".join(f"{k}×{v}" for k, v in sorted(self.global_stores.items()))
        atom = ", ".join(f"{k}×{v}" for k, v in sorted(self.atomics.items()))
        return (f"{self.name} sm_{self.cc}: loads [{loads}] stores [{stores}]"
                + (f" atomics [{atom}]" if atom else "") + f" ld.local {self.local_loads}")


def _count(pattern: str, text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in re.findall(pattern, text):
        out[m] = out.get(m, 0) + 1
    return out


def ptx_report(name: str, cc: int, ptx: str) -> PtxReport:
    return PtxReport(
        name=name,
        cc=cc,
        ptx_lines=ptx.count("\n"),
        global_loads=_count(r"\bld\.global[\w.]*", ptx),
        global_stores=_count(r"\bst\.global[\w.]*", ptx),
        atomics=_count(r"\b(?:atom|red)\.global[\w.]*", ptx),
        local_loads=len(re.findall(r"\bld\.local", ptx)),
        local_stores=len(re.findall(r"\bst\.local", ptx)),
    )


def compile_for_target(kernel, signature: dict, constexprs: dict, cc: int, aligned=None, num_warps: int = 4):
    """Compile a @triton.jit kernel for CUDA compute capability `cc` (70, 80, 90, ...) without a GPU.

    `signature` maps every argument name to a Triton type ('*fp32', 'i32', 'constexpr', ...), `constexprs`
    gives the constexpr values. `aligned` names the arguments assumed 16-byte aligned / divisible by 16, as the
    JIT specialises them at launch (default: every pointer — torch allocations are aligned). Returns the
    compiled kernel; its PTX is `.asm['ptx']`.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if aligned is None:
        aligned = [k for k, v in signature.items() if isinstance(v, str) and v.startswith("*")]
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})


def compile_specs_report(specs, cc: int) -> list[PtxReport]:
    """Compile each (name, kernel, signature, constexprs) spec for `cc`; one PtxReport per kernel."""
    reports = []
    for name, kernel, signature, constexprs in specs:
        compiled = compile_for_target(kernel, signature, constexprs, cc)
        ptx = compiled.asm["ptx"]
        if ".entry" not in ptx:
            raise RuntimeError(f"{name}: no PTX entry point produced for sm_{cc}")
        reports.append(ptx_report(name, cc, ptx))
    return reports


def compile_modules(modules, targets=None) -> list[dict]:
    """Compile every kernel of each module (its `triton_compile_specs(dtype)`) for each target cc and dtype.

    One dict per (module, cc, dtype): {'module', 'cc', 'dtype', 'status': 'ok' | 'error', 'error',
    'reports': [PtxReport as dict]}. Needs a process where triton.language was imported *without*
    TRITON_INTERPRET (the interpreter turns even tl.sum into an interpreted function); see
    `compile_modules_subprocess` for test processes.
    """
    import dataclasses
    import importlib
    import traceback

    targets = TARGETS if targets is None else targets
    out = []
    for modname in modules:
        mod = importlib.import_module(modname)
        for cc, dts in targets.items():
            for dt in dts:
                rec = dict(module=modname, cc=cc, dtype=dt, status="ok", error="", reports=[])
                try:
                    reps = compile_specs_report(mod.triton_compile_specs(dt), cc)
                    rec["reports"] = [dataclasses.asdict(r) for r in reps]
                except Exception:
                    rec.update(status="error", error=traceback.format_exc(limit=8))
                out.append(rec)
    return out


def compile_modules_subprocess(modules, targets=None, timeout: float = 600, jobs: int = 2) -> list[dict]:
    """`compile_modules` in fresh interpreters with TRITON_INTERPRET unset (for test processes, where the
    Triton interpreter is on for the CPU runs of the kernels); the (cc, dtype) pairs are split over `jobs`
    concurrent subprocesses (CI has 2 cores)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pairs = [(cc, dt) for cc, dts in (targets or TARGETS).items() for dt in dts]
    groups = [pairs[k::jobs] for k in range(max(1, min(jobs, len(pairs))))]
    procs = []
    for group in groups:
        tg: dict[str, list[str]] = {}
        for cc, dt in group:
            tg.setdefault(str(cc), []).append(dt)
        arg = json.dumps({"modules": list(modules), "targets": tg})
        procs.append(subprocess.Popen([sys.executable, "-m", __name__, "--json", arg], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"compile subprocess failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        out += json.loads(stdout.strip().splitlines()[-1])
    return out


def _main(argv=None):
    """`python -m fastspec.kernels.triton_compile [module ...]`: print each kernel's PTX summary."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("modules", nargs="*", default=list(KERNEL_MODULES))
    p.add_argument("--json", help="machine interface: JSON {'modules': [...], 'targets': {cc: [dtypes]}}")
    a = p.parse_args(argv)
    if a.json:
        req = json.loads(a.json)
        res = compile_modules(req["modules"], {int(k): tuple(v) for k, v in req["targets"].items()})
        print(json.dumps(res))
        return 0
    for rec in compile_modules(a.modules):
        if rec["status"] != "ok":
            print(f"{rec['module']} sm_{rec['cc']} {rec['dtype']}: {rec['status']} {rec['error']}")
        for r in rec["reports"]:
            print(rec["dtype"], PtxReport(**r).summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
