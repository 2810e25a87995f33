"""Progress of the passes over the batches: the callback the library calls after each batch of
every pass, and the iterable that calls it.

A pass is named by its stage ("audit", "output impact, pass 2", "task metric, fit half 1"),
so a progress bar can say what it is waiting for and time each stage on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

# (batches done in this pass, batches in it or None when unknown, the stage's name)
ProgressFn = Callable[[int, int | None, str], None]

AUDIT = "audit"  # the audit's own pass: every batch in eval, then in train mode


RECALIBRATE = "recalibrate"  # `bnaudit recalibrate`'s statistics pass (train regime)


def recalibrate_stage(k: int) -> str:
    """The k-th (from 1) eval-regime recalibration pass: one per BN depth."""
    return f"recalibrate, level {k}"


def prefixed(progress: ProgressFn | None, prefix: str) -> ProgressFn | None:
    """`progress` with `prefix` before each stage's name ("before: audit")."""
    if progress is None:
        return None
    return lambda done, total, stage: progress(done, total, prefix + stage)


def impact_stage(k: int) -> str:
    """The k-th (from 1) pass measuring the output effect of recalibrated statistics."""
    return f"output impact, pass {k}"


class Ticking:
    """`batches` (`count` of them) iterated as often as asked, each iteration one pass:
    after each batch, `progress(done, count, name(pass))`, passes numbered from 1."""

    def __init__(
        self,
        batches: Iterable[Any],
        count: int,
        progress: ProgressFn,
        name: Callable[[int], str],
    ) -> None:
        self.batches, self.count, self.progress, self.name = batches, count, progress, name
        self.passes = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        stage = self.name(self.passes)
        for done, batch in enumerate(self.batches, 1):
            yield batch  # the caller's work on the batch runs before the tick
            self.progress(done, self.count, stage)


def ticking(
    batches: list[Any], progress: ProgressFn | None, name: Callable[[int], str]
) -> list[Any] | Ticking:
    """`batches` ticking `progress` on every pass, or as they are without a callback."""
    return batches if progress is None else Ticking(batches, len(batches), progress, name)


def ticked(
    items: Iterable[Any], total: int | None, progress: ProgressFn, stage: str
) -> Iterator[Any]:
    """One pass over `items` (a stream: iterated once), ticking after each."""
    for done, item in enumerate(items, 1):
        yield item  # the caller's work on the item runs before the tick
        progress(done, total, stage)


def one_stage(
    progress: ProgressFn | None, total: int | None, stage: str
) -> Callable[[int], None] | None:
    """A pass's callback that takes the batches done alone (None without `progress`)."""
    if progress is None:
        return None
    return lambda done: progress(done, total, stage)


def batch_count(batches: Iterable[Any], cap: int | None) -> int | None:
    """How many batches a pass runs: the iterable's length (when it has one) up to `cap`."""
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return cap
    return n if cap is None else min(n, cap)
