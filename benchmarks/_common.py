"""Helpers the benchmarks share: thread pinning, device syncing, timing, and memory counting.

Timing: `timed` syncs the device around one call; `median_time` and `round_robin` report medians after
warm-up runs (`round_robin` interleaves the contenders so that load drifts on a shared machine hit
all alike; `round_robin_samples` returns every run's time instead); `min_time` reports the least noisy
of several runs.

Memory: `saved_tensor_bytes` counts the distinct storages autograd saves for the backward pass (what
unrolling makes grow); `step_peak_cpu` is the peak of the running sum of the PyTorch profiler's
allocation events over a step (CPU tensors have no allocator statistics); `step_peak_cuda` is
`torch.cuda.max_memory_allocated` over a step, relative to what was allocated before it.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Mapping, TypeVar

import torch

from examples._common import digits_dataset, pinned_threads

__all__ = [
    "digits_dataset",
    "pinned_threads",
    "sync",
    "timed",
    "median_time",
    "min_time",
    "round_robin",
    "round_robin_samples",
    "saved_tensor_bytes",
    "step_peak_cpu",
    "step_peak_cuda",
]

T = TypeVar("T")


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; the CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Seconds of one call of `fn`, with the device synced before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int, *, warmup: int = 1, device: torch.device = torch.device("cpu")) -> float:
    """The median of `repeats` timed calls after `warmup` untimed ones (caches, allocator, autograd)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def min_time(fn: Callable[[], object], repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """The minimum of `repeats` timed calls: on a shared machine, the least disturbed one."""
    return min(timed(fn, device) for _ in range(repeats))


def round_robin(steps: Mapping[str, Callable[[], object]], repeats: int, *, warmup: int = 2,
                device: torch.device = torch.device("cpu"), before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds of each step, the steps taking turns (`warmup` untimed rounds first); `before`
    runs untimed before every step (e.g. `zero_grad`)."""
    samples = round_robin_samples(steps, repeats, warmup=warmup, device=device, before=before)
    return {name: statistics.median(t) for name, t in samples.items()}


def round_robin_samples(steps: Mapping[str, Callable[[], object]], repeats: int, *, warmup: int = 2,
                        device: torch.device = torch.device("cpu"),
                        before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Like `round_robin`, but every timed run's seconds, in order, for any statistic (median, minimum)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            if before is not None:
                before()
            seconds = timed(step, device)
            if i >= warmup:
                times[name].append(seconds)
    return times


def saved_tensor_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """`fn()`'s result and the bytes of the distinct tensor storages autograd saved for backward while it ran."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())


def step_peak_cpu(step: Callable[[], object]) -> int:
    """Peak bytes over `step()` on the CPU: the running sum of the profiler's raw allocation and free events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def step_peak_cuda(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on a CUDA device during `step()`, above what was allocated before it."""
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base
