"""Batch workers: one batch of independent rows split into chunks that CPU threads run at once.

A small UNet (the classroom model) runs on one torch thread per process
(:mod:`impus_lite.threads`): its layers are too small for torch's intra-op threads to share
without hand-offs that cost more than they save. The rows of a render pass (frames, each a
DDIM trajectory of its own) need no hand-offs at all: split into contiguous chunks, each chunk
runs its whole computation in a Python thread of its own on one torch thread, and since torch
releases the GIL inside its kernels the chunks run on separate cores. The Python between the
kernels still holds the GIL, so a chunk needs enough rows for the kernels to dominate.

Measured with the classroom UNet on a 2-core AMD EPYC (one torch thread per Python thread, the
median of nine forward passes): 18 latents 138 ms as one batch, 73 ms as two chunks of 9;
8 latents 64 -> 41 ms; 4 latents 34 -> 26 ms; 2 latents 21.6 -> 20.3 ms. Hence
:data:`MIN_ROWS_PER_WORKER`. The chunks' results agree with one batch's to float rounding.

On a shared machine the chunks would compete with other processes for the same cores (the load
test with two workers per morph on 2 cores: two morphs at once took 30.6 s where one worker each
took 25.4 s), so :func:`free_workers` lets a call split only onto cores that are idle when it
starts.

This module does not import torch.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

#: A chunk needs at least this many UNet rows (latents per call) to be worth a thread of its own.
MIN_ROWS_PER_WORKER = 2

Result = TypeVar("Result")
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_IN_WORKER = threading.local()   # set in pool threads: a chunk that splits again runs its parts itself


def chunk_bounds(count: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous (start, stop) ranges covering ``range(count)``, sizes differing by at
    most one (the first ones larger), none empty: ``chunk_bounds(9, 2) == [(0, 5), (5, 9)]``."""
    chunks = max(1, min(int(chunks), int(count)))
    size, extra = divmod(int(count), chunks)
    bounds, start = [], 0
    for i in range(chunks):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def useful_workers(workers: int, items: int, rows_per_item: int = 1,
                   min_rows: int = MIN_ROWS_PER_WORKER) -> int:
    """How many chunks ``items`` items of ``rows_per_item`` UNet rows each are split into with
    ``workers`` workers available: as many as keep ``min_rows`` rows in every chunk, at least 1."""
    rows = int(items) * int(rows_per_item)
    return max(1, min(int(workers), int(items), rows // max(1, int(min_rows))))


def free_workers(workers: int, loadavg: Path = Path("/proc/loadavg")) -> int:
    """At most ``workers``, and no more than this thread plus the CPUs idle right now.

    Idle CPUs are ``os.cpu_count()`` minus the runnable threads of the whole machine that are
    not this one (the fourth field of ``/proc/loadavg``, "running/total", counts this thread
    too). Where that file cannot be read, ``workers``. A container sees its host's count, so on
    a busy host this gives 1: the one-thread-per-morph behaviour that shares a machine well.
    """
    workers = max(1, int(workers))
    if workers == 1:
        return 1
    try:
        running = int(loadavg.read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return workers
    idle = (os.cpu_count() or 1) - running
    return max(1, min(workers, 1 + idle))


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="impus-lite-worker")
        return pool


def map_chunks(run_chunk: Callable[[int, int], Result], count: int, workers: int) -> list[Result]:
    """``[run_chunk(start, stop) for (start, stop) in chunk_bounds(count, workers)]``, the chunks
    run at once: the first in the calling thread, the others in a shared pool of worker threads.

    ``run_chunk`` must be safe to call from several threads at once, and set the thread-local
    torch state it needs (grad mode, autocast) itself: a worker thread starts with torch's
    defaults. An exception in any chunk is raised here once every chunk has finished. Called
    from inside a worker, the chunks run one after another in that worker (a pool never waits
    on itself).
    """
    bounds = chunk_bounds(count, workers)
    if len(bounds) == 1 or getattr(_IN_WORKER, "active", False):
        return [run_chunk(start, stop) for start, stop in bounds]

    def in_worker(start: int, stop: int) -> Result:
        _IN_WORKER.active = True
        return run_chunk(start, stop)

    pool = _pool(len(bounds) - 1)
    futures = [pool.submit(in_worker, start, stop) for start, stop in bounds[1:]]
    try:
        first = run_chunk(*bounds[0])
    finally:
        others = [future.exception() for future in futures]  # waits for every chunk
    for error in others:
        if error is not None:
            raise error
    return [first] + [future.result() for future in futures]
