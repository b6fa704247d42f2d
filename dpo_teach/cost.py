"""What a training run cost: wall time and peak memory, measured the same way for every method.

    with measure_cost(device) as cost:
        history = train_something(...)
    print(cost.seconds, cost.peak_memory_mb)

On a CUDA device the peak is torch.cuda.max_memory_allocated during the block; on a CPU it is the
peak resident memory of this process during the block, sampled every few milliseconds by a
background thread, minus what the process held when the block started (so models loaded before the
block are not counted; memory freed by earlier blocks is first handed back to the system). Counts of models held, tokens generated and forward/backward passes are
properties of each method's loop and are reported by the train functions themselves.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch


@dataclass
class Cost:
    seconds: float = 0.0  # wall-clock time of the block
    peak_memory_mb: float = 0.0  # peak memory above the level at the start of the block, in MiB
    device: str = "cpu"


def _release_free_memory() -> None:
    """Hand memory that earlier work freed back to the operating system (glibc's malloc_trim), so
    that the resident size at the start of a block is what the process really holds, and the peak of
    the block is not hidden below what an earlier, bigger block left behind."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the measurement is then an upper bound
        pass


@contextmanager
def measure_cost(device: str = "cpu", interval: float = 0.005):
    """Measure the wall time and peak extra memory of the `with` block (see the module docstring)."""
    cost = Cost(device=str(device))
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        try:
            yield cost
        finally:
            torch.cuda.synchronize()
            cost.seconds = time.perf_counter() - start
            cost.peak_memory_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    process = psutil.Process()
    _release_free_memory()
    base = process.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - start
        stop.set()
        thread.join()
        peak[0] = max(peak[0], process.memory_info().rss)
        cost.peak_memory_mb = (peak[0] - base) / 2**20
