"""The watcher's running account per layer: totals over the watched steps and the events of
each code with their step numbers, gathered into findings when the report is asked for."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bnaudit.core.untrusted import plain
from bnaudit.verdict.codes import WATCH_HINTS
from bnaudit.verdict.results import Finding, Severity
from bnaudit.watching.results import WatchLayer, WatchMetrics
from bnaudit.watching.steps import Event, StepLayer

STEPS_SHOWN = 8  # step numbers listed in a finding's message before "..."


@dataclass
class Occurrences:
    """One code on one layer: the first event (its message and numbers) and every step."""

    first: Event
    worst: Severity
    steps: list[int] = field(default_factory=list)


@dataclass
class LayerAccount:
    """One layer's totals over the watched steps."""

    name: str
    type: str
    momentum: float | None = None
    steps: int = 0
    train_calls: int = 0
    eval_calls: int = 0
    updates: int = 0
    updates_per_step_max: int = 0
    micro_batches: int = 0
    sites: int = 0
    frozen: str = ""
    implied: list[float] = field(default_factory=list)
    events: dict[str, Occurrences] = field(default_factory=dict)

    def add(self, s: StepLayer, events: list[Event]) -> None:
        self.momentum, self.frozen = s.momentum, s.frozen
        self.steps += 1
        self.train_calls += s.train_calls
        self.eval_calls += s.eval_calls
        self.updates += s.updates
        self.updates_per_step_max = max(self.updates_per_step_max, s.updates)
        self.micro_batches += s.micro_batches
        self.sites = max(self.sites, s.sites)
        # A bounded sample: the median of the first updates says what the momentum is.
        if len(self.implied) < 1000:
            self.implied += [c.implied_momentum for c in s.calls if c.updated]
        for e in events:
            self.record(e, s.step)

    def record(self, e: Event, step: int) -> None:
        seen = self.events.get(e.code)
        if seen is None:
            self.events[e.code] = Occurrences(e, e.severity, [step])
            return
        seen.worst = max(seen.worst, e.severity)
        seen.steps.append(step)

    def result(self, watched: int) -> WatchLayer:
        finite = [v for v in self.implied if v == v]  # NaN: not readable
        metrics = WatchMetrics(
            momentum=self.momentum,
            steps=self.steps,
            train_calls=self.train_calls,
            eval_calls=self.eval_calls,
            updates=self.updates,
            updates_per_step_max=self.updates_per_step_max,
            micro_batches=self.micro_batches,
            sites=self.sites,
            implied_momentum_median=statistics.median(finite) if finite else float("nan"),
            frozen=self.frozen,
            nonfinite_steps=len(self.events["nonfinite"].steps)
            if "nonfinite" in self.events
            else 0,
        )
        findings = tuple(
            sorted(
                (self._finding(o, watched) for o in self.events.values()),
                key=lambda f: -f.severity,
            )
        )
        return WatchLayer(self.name, self.type, metrics, findings)

    def _finding(self, o: Occurrences, watched: int) -> Finding:
        e = o.first
        return Finding(
            self.name,
            e.code,
            o.worst,
            f"{e.message}; in {len(o.steps)} of {watched} watched steps ({steps_text(o.steps)})",
            WATCH_HINTS[e.code],
            float(e.value),
            float(e.threshold),
        )


def steps_text(steps: list[int]) -> str:
    """'step 3', 'steps 1, 2, 5', 'steps 1, 2, ..., 40' (the first few and the last)."""
    if len(steps) == 1:
        return f"step {steps[0]}"
    if len(steps) <= STEPS_SHOWN:
        return "steps " + ", ".join(map(str, steps))
    head = ", ".join(map(str, steps[: STEPS_SHOWN - 1]))
    return f"steps {head}, ..., {steps[-1]}"


def drift_event(f: Finding) -> Event:
    """A `compare_ranks` finding as a watcher event of its step."""
    return Event(f.code, f.severity, plain(f.message), f.value or 0.0, f.threshold or 0.0)
