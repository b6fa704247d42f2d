"""What a training run cost: wall time and peak memory, measured the same way for every method.

    with measure_cost(device) as cost:
        history = train_something(...)
    print(cost.seconds, cost.peak_memory_mb)

What is counted, the same way for every method, from one common baseline (the process before the
block, less the models the block uses): the parameters and buffers of every model the method holds
during the block (`held`, loaded before it), plus the peak of what the block itself adds on top
(optimizer state, gradients, activations, sampling buffers, copies made inside the block). On a
CUDA device that addition is torch.cuda.max_memory_allocated during the block above the allocation
at its start; on a CPU it is the peak resident memory of this process during the block, sampled
every few milliseconds by a background thread, above the resident memory at its start (memory freed
by earlier blocks is first handed back to the system). Counts of models held, sequences generated
and forward/backward passes are properties of each method's loop and are reported by the train
functions themselves.
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

__all__ = ["Cost", "models_mb", "measure_cost"]


@dataclass
class Cost:
    seconds: float = 0.0  # wall-clock time of the block
    peak_memory_mb: float = 0.0  # held models + the block's peak addition, in MiB
    models_mb: float = 0.0  # of which: parameters and buffers of the held models
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


def models_mb(models) -> float:
    """Parameters and buffers of `models` (distinct tensors counted once), in MiB."""
    seen, total = set(), 0
    for model in models:
        for t in (*model.parameters(), *model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total / 2**20


@contextmanager
def measure_cost(device: str = "cpu", interval: float = 0.005, held=()):
    """Measure the wall time and peak memory of the `with` block: the models in `held` plus the
    block's peak addition (see the module docstring)."""
    cost = Cost(device=str(device), models_mb=models_mb(held))
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
            cost.peak_memory_mb = cost.models_mb + (torch.cuda.max_memory_allocated() - base) / 2**20
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
        cost.peak_memory_mb = cost.models_mb + (peak[0] - base) / 2**20
