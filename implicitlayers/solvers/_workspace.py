"""Solver history buffers that outlive one solve, so that repeated solves do not pay for fresh pages.

Why: a solve's history (Anderson's `(B, m, D)` pair, Broyden's `(B, memory, D)` factors) is
megabytes. On the CPU a fresh allocation of that size comes from pages the allocator has just given
back to the operating system, so every solve first takes a page fault per 4 KiB it touches: on a
16-channel 16×16 conv cell, about 1,200 faults and 2 ms of a 10 ms Anderson solve. Keeping the
buffers between solves removes that cost, and lets a solver build the views of its buffers that
every step uses once instead of once per solve (on any device: that is host time).

A solve checks its buffers out (`take`) and hands them back when it ends (`give_back`), so nested or
concurrent solves never share one. At most `limit` bytes (default 256 MiB, counted over all devices)
in at most 32 objects are kept, the most recently used; what does not fit is simply freed.
`set_workspace_limit(0)` turns keeping off; `clear_workspace()` frees what is kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, TypeVar

import torch

__all__ = ["take", "give_back", "set_workspace_limit", "clear_workspace", "workspace_bytes"]

T = TypeVar("T")

_lock = threading.Lock()
_MAX_OBJECTS = 32  # each object also holds dozens of views: bound their count, not only their bytes
_kept: OrderedDict[Hashable, list[Any]] = OrderedDict()  # least recently handed back first
_state = {"bytes": 0, "objects": 0, "limit": 256 * 2**20}


def take(build: Callable[..., T], like: torch.Tensor, *args: Hashable) -> T:
    """`build(like, *args)`, or an object an earlier solve built with the same arguments and handed back.

    `like` contributes its shape, dtype and device to the match; the object must have `nbytes`.
    Its contents are whatever the last solve left there. Objects built under `torch.inference_mode`
    serve only solves under it: outside it, their tensors cannot be written in place.
    """
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return build(like, *args)  # inside a torch.func transform: buffers must be made (and die) inside it
    key = (build, tuple(like.shape), like.dtype, like.device, torch.is_inference_mode_enabled(), args)
    with _lock:
        bucket = _kept.get(key)
        if bucket:
            kept = bucket.pop()
            _forget(kept)
            if not bucket:
                del _kept[key]
            return kept
    made = build(like, *args)
    made._workspace_key = key
    return made


def give_back(*objects: Any) -> None:
    """Keep `objects` (from `take`) for a later solve, within the limits. The caller must not use them again."""
    with _lock:
        for kept in objects:
            if kept.nbytes > _state["limit"] or not hasattr(kept, "_workspace_key"):
                continue  # too large to keep, or made inside a torch.func transform (never kept)
            _kept.setdefault(kept._workspace_key, []).append(kept)
            _kept.move_to_end(kept._workspace_key)
            _state["bytes"] += kept.nbytes
            _state["objects"] += 1
            _evict()


def _forget(kept: Any) -> None:
    _state["bytes"] -= kept.nbytes
    _state["objects"] -= 1


def _evict() -> None:
    """Free the least recently handed back objects until the rest fits (the lock is held)."""
    while _kept and (_state["bytes"] > _state["limit"] or _state["objects"] > _MAX_OBJECTS):
        key, bucket = next(iter(_kept.items()))
        _forget(bucket.pop(0))
        if not bucket:
            del _kept[key]


def set_workspace_limit(nbytes: int) -> None:
    """Keep at most `nbytes` of solver history between solves (default 256 MiB; 0 keeps none).

    Lowering the limit frees kept buffers, least recently used first, until the rest fits.
    """
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"set_workspace_limit: nbytes must be an integer >= 0, got {nbytes!r}.")
    with _lock:
        _state["limit"] = nbytes
        _evict()


def clear_workspace() -> None:
    """Free every kept buffer."""
    with _lock:
        _kept.clear()
        _state["bytes"] = _state["objects"] = 0


def workspace_bytes() -> int:
    """How many bytes of solver history are kept now."""
    return _state["bytes"]
