"""BN counters against a training checkpoint's step count: updates made twice, never, or by
some layers only, judged without data.

`num_batches_tracked` grows by one at every train-mode forward of a layer. After S optimizer
steps with k forward micro-batches each, every layer that trained holds T = k·S (minus the
steps it was frozen). A counter at 1.5 times that or more is a double update (gradient
checkpointing, a second forward); 0 means the layer never ran in train mode; a counter apart
from the one most layers share is a layer frozen by accident or behind a branch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from bnaudit.verdict.codes import COUNTER_HINTS
from bnaudit.verdict.results import MODEL, Finding, Severity

DOUBLE = 1.5  # T at this multiple of the expected count or more: updated twice per step
PARTIAL = 1 / DOUBLE  # T at this fraction of it or less: updated in part of the steps only


@dataclass(frozen=True)
class Expected:
    """What the counters are compared with: k·S when the step count is known."""

    updates: int | None  # k·S; None: no step count, the layers are compared with each other
    what: str  # "the 1000 optimizer steps (optimizer state 'step' at 'optimizer')"


def judge_counters(
    counters: Mapping[str, int | None], expected: Expected
) -> dict[str, tuple[Finding, ...]]:
    """Per layer (by name) the findings its counter makes; layers without a count are left
    out. Empty when nothing trained (expected 0, or every counter 0 without a step count)."""
    counted = {name: t for name, t in counters.items() if t is not None}
    common, sharing = _common(counted)
    reference = expected.updates
    out: dict[str, tuple[Finding, ...]] = {}
    for name, t in counted.items():
        found = _against_steps(name, t, expected) if reference else None
        # Against the others only where the step count agrees with them (or there is none):
        # a layer right on the step count is not wrong for differing from a wrong majority.
        if found is None and common is not None and t != common and reference in (None, common):
            found = _against_layers(name, t, common, sharing, len(counted))
        if found is not None:
            out[name] = (found,)
    return out


def _common(counted: Mapping[str, int]) -> tuple[int | None, int]:
    """The counter more than half the layers share, and how many share it; (None, 0) when no
    value is held by a majority (nothing to disagree with) or it is 0 (nothing trained)."""
    if len(counted) < 3:
        return None, 0
    value, sharing = Counter(counted.values()).most_common(1)[0]
    if sharing * 2 <= len(counted) or value == 0:
        return None, 0
    return value, sharing


def _against_steps(name: str, t: int, e: Expected) -> Finding | None:
    assert e.updates  # a step count above 0
    ratio = t / e.updates
    if t == 0:
        return _finding(
            name, "no-update", f"num_batches_tracked = 0 after {e.what}: never updated in "
            "train mode", 0.0, float(e.updates)
        )  # fmt: skip
    if ratio >= DOUBLE:
        return _finding(
            name, "double-update", f"num_batches_tracked = {t}, {ratio:.3g} times {e.what}",
            ratio, DOUBLE,
        )  # fmt: skip
    if ratio <= PARTIAL:
        return _finding(
            name, "no-update", f"num_batches_tracked = {t}: updated in {ratio:.1%} of "
            f"{e.what}", ratio, PARTIAL
        )  # fmt: skip
    return None


def _against_layers(name: str, t: int, common: int, sharing: int, total: int) -> Finding:
    code = "double-update" if t > common else "no-update"
    return _finding(
        name,
        code,
        f"num_batches_tracked = {t}, while {sharing} of {total} layers hold {common}: this "
        f"layer was updated {'more' if t > common else 'less'} often than the rest",
        t / common,
        1.0,
    )


def _finding(name: str, code: str, message: str, value: float, threshold: float) -> Finding:
    return Finding(name, code, Severity.WARN, message, COUNTER_HINTS[code], value, threshold)


def bad_step_count(source: str, problem: str) -> Finding:
    """A step count found but not a count: a finding about the whole checkpoint."""
    return Finding(
        MODEL,
        "bad-counter",
        Severity.WARN,
        f"the training step count ({source}) is {problem}: the BN counters were not compared "
        "with it",
        COUNTER_HINTS["bad-step"],
    )
