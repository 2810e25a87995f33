"""One timed run, as `timeit` times one: Python's cycle collector run before it and off during it.

A full collection walks every object of the process, and the benchmark's process holds more of
them with every model it has built: one that lands inside a timed run charged ~0.1 s to whichever
side was running (the 400-layer MLP's plain passes took 0.44 s in one section and 1.13 s in
another). The audit freezes the objects older than itself, the plain passes cannot: both sides
are now timed without the collector, so the ratios compare the work alone.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def timed(run: Callable[[], object]) -> float:
    """Seconds of `run()`, the collector run before it (untimed) and off while it runs."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
