"""Overlapping the host→device copy with compute: batch t+1 goes to the GPU on a side stream while batch t is used."""
from __future__ import annotations

import torch


def cuda_prefetch(batches, device):
    """Copy batch t+1 (a tuple of tensors, rebuilt as its own type) to `device` on a side stream while batch t
    is in use."""
    stream = torch.cuda.Stream(device=device)
    it = iter(batches)

    def load():
        try:
            b = next(it)
        except StopIteration:
            return None
        with torch.cuda.stream(stream):
            return type(b)(*(t.to(device, non_blocking=True) for t in b))

    nxt = load()
    while nxt is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        cur = nxt
        for t in cur:
            t.record_stream(torch.cuda.current_stream(device))
        nxt = load()
        yield cur
