"""Typed results of watching a training loop: per BN layer what the watched steps did to it,
its findings (one per code, with the steps where it happened), and the record of the whole run.

The conventions of `AuditRecord`: frozen dataclasses, `findings` each with `layer` and `code`,
`passed` against `fail_on`, a DataFrame built once at the output boundary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bnaudit.report.record import Gated
from bnaudit.verdict.results import FailOn, Finding, Judged

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class WatchMetrics:
    """What the watched steps did to one layer. NaN: never measured."""

    momentum: float | None  # the layer's at the end; None: cumulative average
    steps: int  # watched steps
    train_calls: int  # train-mode forward calls, all watched steps together
    eval_calls: int
    updates: int  # running-stat updates read from the buffers
    updates_per_step_max: int
    micro_batches: int  # forward micro-batches, all watched steps together (declared or counted)
    sites: int = 0  # most train-mode calls within one forward of the model (0: none seen)
    implied_momentum_median: float = math.nan  # of the updates it could read
    frozen: str = ""  # why its affine parameters were not trained, at the last watched step
    nonfinite_steps: int = 0

    def flat(self) -> dict[str, Any]:
        """Every metric under its report name, as `LayerMetrics.flat()` gives an audit's."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WatchLayer(Judged):
    name: str
    type: str
    metrics: WatchMetrics
    findings: tuple[Finding, ...] = ()


@dataclass(frozen=True)
class WatchRecord(Gated[WatchLayer]):
    """A watched training run. `bool(report)` is `report.passed`."""

    layers: tuple[WatchLayer, ...]
    steps: int  # optimizer steps while watching
    watched: int  # of which watched (every N-th)
    every: int = 1
    accumulate: int | None = None  # declared micro-batches per step; None: counted
    fail_on: FailOn = FailOn.WARN
    notes: tuple[str, ...] = ()
    model_findings: tuple[Finding, ...] = ()

    def to_frame(self) -> pd.DataFrame:
        """One row per layer, every metric a column (built once, at the output boundary)."""
        import pandas as pd

        rows = []
        for r in self.layers:
            row: dict[str, Any] = {"layer": r.name, "type": r.type, "verdict": r.verdict}
            row["codes"] = " ".join(sorted({f.code for f in r.findings if f.counts}))
            row.update(r.metrics.flat())
            rows.append(row)
        columns = ["layer", "type", "verdict", "codes"]
        columns += [f.name for f in dataclasses.fields(WatchMetrics)]
        return pd.DataFrame(rows, columns=columns)
