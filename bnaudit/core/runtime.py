"""Process-wide settings an audit holds for its duration, each put back as it was found, and
whether the machine has a core to spare for a parallel kernel right now."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch on at most `count` threads in the block; the caller's count is put back."""
    threads = torch.get_num_threads()
    if threads <= count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def older_objects_frozen() -> Iterator[None]:
    """Python's cycle collector leaves the objects that existed before the block alone (the
    model, the caller's data) until it ends: its full collections otherwise walk every one of
    them, which cost the 400-layer MLP's audit 0.2 of its plain passes. Cycles made in the
    block are collected as usual. A caller that froze objects itself is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


LOADAVG = "/proc/loadavg"


BUSY_FOR_S = 0.02  # how long one reading is trusted: a kernel call costs less than the read
_busy: tuple[float, bool] = (-1.0, True)  # (when read, the answer)


def machine_busy() -> bool:
    """`busy_in(LOADAVG)`, read at most every BUSY_FOR_S."""
    global _busy
    now = time.monotonic()
    if now - _busy[0] >= BUSY_FOR_S:
        _busy = (now, busy_in(LOADAVG))
    return _busy[1]


def busy_in(loadavg: str) -> bool:
    """Whether more tasks are runnable right now than this process may use cores (Linux's
    /proc/loadavg, its fourth field: runnable/all, this thread and any spinning worker
    included). Where that cannot be read it says busy: the caller then stays on one thread,
    which is never the slow choice under load."""
    try:
        with open(loadavg, "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return running > _cores()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1
