"""Output memory for the loader: a pool of reused buffers (fresh memory page-faults on first touch, which costs
more than the whole fill pass) and shared-memory tensors for process workers.
"""
from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np
import torch


def shared_empty(shape, dtype) -> torch.Tensor:
    """An output tensor in shared memory (process workers): handing it to the main process sends a handle
    instead of copying the data."""
    numel = int(np.prod(shape)) if shape else 1
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    try:
        storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    except (AttributeError, RuntimeError, TypeError):  # older torch
        return torch.empty(shape, dtype=dtype).share_memory_()


class BufferPool:
    """Output memory that is reused once every tensor viewing it is gone.

    Freshly allocated memory costs a page fault per 4 KiB on first touch — measured here as 9× the cost of the
    fused pass itself, which would make the loader far slower than a raw read. Buffers are anonymous mmaps
    (transparent huge pages where the kernel allows), handed out as numpy arrays; a weakref finalizer puts a
    buffer back when its array (and with it every tensor and batch view of it) is collected.
    """

    def __init__(self, keep: int = 8):
        self.keep = keep
        self.free: dict[int, list] = {}
        self.lock = threading.Lock()

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        count = int(np.prod(shape)) if shape else 1
        size = max(count * np_dtype.itemsize, 1)
        size = -(-size // (1 << 21)) << 21 if size >= (1 << 20) else size  # whole huge pages
        buf = None
        with self.lock:
            # best fit within 25%: chunk sizes vary a little with the row selection
            fits = [k for k, v in self.free.items() if v and size <= k <= size + size // 4]
            if fits:
                buf = self.free[min(fits)].pop()
                size = len(buf)
        if buf is None:
            buf = mmap.mmap(-1, size)
            if size >= (1 << 21) and hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    buf.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass
        arr = np.frombuffer(buf, dtype=np_dtype, count=count).reshape(shape)
        weakref.finalize(arr, self._release, size, buf)
        return torch.from_numpy(arr)

    def _release(self, size: int, buf) -> None:
        with self.lock:
            stack = self.free.setdefault(size, [])
            if len(stack) < self.keep:
                stack.append(buf)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
