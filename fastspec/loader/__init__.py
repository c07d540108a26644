"""Streaming loader: spectra files → batches of (y, w, z) tensors for training and encoding (DESIGN §2, Data).

Rows are read in contiguous blocks, shuffled by blocks and within chunks of blocks in memory, read ahead by
background threads (or processes) into reused (or pinned) memory and copied to the GPU on a side stream. One
module per concern:

    plan       the epoch plan: blocks, shards and chunks of every epoch — what exact resume depends on
    hashing    stable seeds and the validation split by object_id
    reader     reading one chunk of the plan (memory map, h5py or any spectra reader) into output tensors
    mapped     reading an uncompressed fastspec file in place through a memory map
    fill       the fused pass: weights, masked flux zeroed, finiteness check, scatter to shuffled rows
    memory     the pool of reused output buffers, shared-memory tensors for process workers
    workers    background reader threads, or a DataLoader of worker processes
    prefetch   the host→device copy on a side stream
    stream     `SpectraLoader`, which puts them together, and its `Batch`
"""
from .hashing import stable_fraction, stable_seed, validation_mask
from .stream import Batch, SpectraLoader

__all__ = ["Batch", "SpectraLoader", "stable_fraction", "stable_seed", "validation_mask"]
