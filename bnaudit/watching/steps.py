"""One optimizer step of one BN layer, and the rules that judge it: one function per code.

A rule returns the `Event` it found in the step, or None. The watcher gathers a layer's events
of one code over the steps into one finding (`bnaudit.watching.results`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bnaudit.verdict.results import Severity
from bnaudit.watching.probes import Call

# |implied − configured| momentum beyond this share of the configured one (float32 buffers
# round each update by about 1e-7 relative; the batch mean is recomputed in float32 too).
MOMENTUM_RTOL = 0.02
MOMENTUM_ATOL = 1e-4


@dataclass(frozen=True)
class StepLayer:
    """What one layer did in one optimizer step."""

    step: int
    micro_batches: int  # forward micro-batches expected to update it (declared or counted)
    declared: bool  # micro_batches was declared (accumulate=k), not counted
    model_ran: bool  # any BN layer ran, or a backward pass happened
    train_calls: int
    eval_calls: int
    calls: tuple[Call, ...]  # the train-mode calls it could read (a tensor input)
    sites: int  # most train-mode calls within one forward of the model (0: none seen)
    outside_calls: int  # train-mode calls outside the model's forward (backward recompute)
    forwards: int  # train-mode forwards of the model in the step (0: none seen)
    momentum: float | None  # the layer's, at the step's end
    frozen: str  # why its affine parameters are not trained ("" when they are, or no affine)
    judge_momentum: bool  # False for SyncBatchNorm across ranks: its batch mean is global

    @property
    def updates(self) -> int:
        return sum(c.updated for c in self.calls)

    @property
    def expected(self) -> int:
        """Updates the step should make: one per call site and micro-batch. A layer not seen in
        the model's forward (the loop calls a submodule itself) counts as one site."""
        return max(1, self.sites) * self.micro_batches


@dataclass(frozen=True)
class Event:
    """One finding in one step, before the steps are gathered."""

    code: str
    severity: Severity
    message: str
    value: float
    threshold: float


def _plural(n: int, word: str) -> str:
    if word == "time" and n in (1, 2):
        return ("once", "twice")[n - 1]
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("ch") else "s")


def double_update(s: StepLayer) -> Event | None:
    if s.updates <= s.expected or s.micro_batches < 1:
        return None
    how = "declared" if s.declared else "counted (backward passes)"
    sites = f" × {s.sites} call sites per forward" if s.sites > 1 else ""
    causes = []
    if s.outside_calls:
        causes.append(
            f"{s.outside_calls} of them outside the model's forward: a recomputation during "
            "backward, as gradient checkpointing does"
        )
    if s.forwards > s.micro_batches:
        causes.append(
            f"the model's forward ran {_plural(s.forwards, 'time')} in train mode for "
            f"{_plural(s.micro_batches, 'micro-batch')}: a second forward per micro-batch, "
            "or the whole model under gradient checkpointing"
        )
    cause = "; ".join(causes) or (
        "gradient checkpointing recomputes the forward, or a second forward ran in train mode"
    )
    return Event(
        "double-update",
        Severity.FAIL,
        f"{s.updates} running-stat updates in one optimizer step for "
        f"{_plural(s.micro_batches, 'micro-batch')} {how}{sites}, from {s.train_calls} "
        f"train-mode forward calls: {cause}",
        s.updates,
        s.expected,
    )


def no_update(s: StepLayer) -> Event | None:
    if s.updates or not s.model_ran:
        return None
    if s.train_calls:
        why = (
            f"it ran {_plural(s.train_calls, 'time')} in train mode but its buffers did not change"
        )
    elif s.eval_calls:
        why = f"it ran {_plural(s.eval_calls, 'time')} in eval mode while the model trained"
    else:
        why = "it did not run while the model trained (a branch skipped it?)"
    return Event("no-update", Severity.WARN, f"no running-stat update in the step: {why}", 0, 1)


def frozen_stats_moving(s: StepLayer) -> Event | None:
    if not s.frozen or not s.updates:
        return None
    return Event(
        "frozen-stats-moving",
        Severity.WARN,
        f"its affine parameters are frozen ({s.frozen}), yet its running statistics were "
        f"updated {_plural(s.updates, 'time')} in train mode",
        s.updates,
        0,
    )


def expected_momentum(momentum: float | None, counter_after: float) -> float:
    """The factor one update should apply: the layer's momentum, or 1/T (T counted after the
    update) for a cumulative average (momentum=None)."""
    if momentum is not None:
        return float(momentum)
    return 1.0 / counter_after if counter_after > 0 else math.nan


def momentum_mismatch(s: StepLayer) -> Event | None:
    if not s.judge_momentum:
        return None
    worst: tuple[float, float, float] | None = None
    for c in s.calls:
        want = expected_momentum(s.momentum, c.counter_after)
        got = c.implied_momentum
        if not (math.isfinite(want) and math.isfinite(got)) or not c.updated:
            continue
        off = abs(got - want)
        if off > MOMENTUM_RTOL * abs(want) + MOMENTUM_ATOL and (worst is None or off > worst[0]):
            worst = (off, got, want)
    if worst is None:
        return None
    _, got, want = worst
    configured = "momentum=None (1/T)" if s.momentum is None else f"momentum {s.momentum:g}"
    return Event(
        "momentum-mismatch",
        Severity.WARN,
        f"the running mean moved by a factor {got:.4g} of the way to the batch mean; the "
        f"layer's {configured} says {want:.4g}",
        got,
        want,
    )


def nonfinite(s: StepLayer) -> Event | None:
    bad_batch = sum(not c.batch_finite for c in s.calls)
    bad_stats = sum(not c.stats_finite for c in s.calls)
    if not bad_batch and not bad_stats:
        return None
    what = []
    if bad_batch:
        what.append(f"{_plural(bad_batch, 'batch')} with a non-finite batch mean")
    if bad_stats:
        what.append("non-finite running statistics after the update")
    return Event("nonfinite", Severity.FAIL, "; ".join(what), bad_batch or bad_stats, 0)


RULES: dict[str, Callable[[StepLayer], Event | None]] = {
    "double-update": double_update,
    "no-update": no_update,
    "frozen-stats-moving": frozen_stats_moving,
    "momentum-mismatch": momentum_mismatch,
    "nonfinite": nonfinite,
}


def judge_step(s: StepLayer) -> list[Event]:
    """Every event of one layer's step, in RULES order."""
    return [e for rule in RULES.values() if (e := rule(s)) is not None]
