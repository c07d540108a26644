"""The backend switch: which implementation the kernel ops run, 'auto', 'triton', 'numba' or 'torch'.

'auto' picks Triton for CUDA tensors and numba for CPU tensors. 'triton' on CPU tensors runs the Triton
interpreter (only when TRITON_INTERPRET=1 was set before the kernels were imported) — that is how the
tests hold the Triton kernels to the same reference without a GPU. 'torch' runs the plain-torch reference.
The ops ask `core.backend_for(device)`, which reads this switch (once, at trace time, under torch.compile).
"""
from __future__ import annotations

import contextlib
import contextvars
import os

BACKENDS = ("auto", "triton", "numba", "torch")

_default = os.environ.get("FASTSPEC_BACKEND", "auto")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastspec_backend", default=None)


def _check(name: str) -> str:
    name = str(name).lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Set the backend for the whole process (overridden inside `use_backend`)."""
    global _default
    _default = _check(name)


def get_backend() -> str:
    """The backend in force: the innermost `use_backend`, else the global one."""
    cur = _current.get()
    return cur if cur is not None else _check(_default)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the kernel ops with backend `name` inside the block."""
    token = _current.set(_check(name))
    try:
        yield name
    finally:
        _current.reset(token)


def triton_interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set: @triton.jit reads it when a kernel is defined."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve(device) -> str:
    """The concrete backend ('triton', 'numba' or 'torch') for tensors on `device` (a torch.device or str)."""
    name = get_backend()
    is_cuda = (device if isinstance(device, str) else device.type).startswith("cuda")
    if name == "auto":
        if is_cuda:
            return "triton" if triton_available() else "torch"
        return "numba"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed (pip install triton==3.7.1)")
        if not is_cuda and not triton_interpreting():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                "importing fastspec.kernels"
            )
        return "triton"
    if name == "numba" and is_cuda:
        raise RuntimeError("backend 'numba' runs on CPU tensors only; these are on " + str(device))
    return name
