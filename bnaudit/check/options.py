"""How the audit runs and judges: `AuditOptions`, and keyword overrides of its fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bnaudit.inputs.batches import InputChoice
from bnaudit.measure.evidence import Metric
from bnaudit.verdict.findings import Thresholds
from bnaudit.verdict.results import FailOn


@dataclass(frozen=True)
class AuditOptions:
    """How to run the passes and judge them. Thresholds live in `Thresholds`."""

    thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)
    train_mode: str = "bn"  # "bn": only BN layers in train mode; "all": the whole model
    fail_on: FailOn = FailOn.FAIL
    max_batches: int | None = None
    synthetic_data: bool = False
    layers: tuple[str, ...] | None = None  # audit only these (qualified names); None: all
    impact: bool = True  # measure the output effect of recalibrated statistics (with data)
    regime: str = "train"  # recalibrate from train-mode ("train") or eval-mode ("eval") inputs
    attribution: bool = False  # also swap in one flagged layer's statistics at a time
    attribution_max: int = 8  # at most this many layers (K passes each), the worst first
    output_budget_mb: float = 64.0  # eval outputs kept for reuse; beyond, they are recomputed
    fold: bool = True  # check conv/linear → BN folds (on the first eval pass's first samples)
    input: InputChoice = None  # which element or key of a batch is the input (batches.to_call)
    # The task metric, fn(outputs, labels) -> float (higher is better), for batches with labels;
    # None: top-1 accuracy where the outputs are [B, K] class scores.
    metric: Metric | None = None
    metric_name: str = ""


def with_overrides(options: AuditOptions, overrides: dict[str, Any]) -> AuditOptions:
    own = {f.name for f in dataclasses.fields(AuditOptions)} - {"thresholds"}
    mine = {k: v for k, v in overrides.items() if k in own}
    if "fail_on" in mine:
        mine["fail_on"] = FailOn(mine["fail_on"])
    rest = {k: v for k, v in overrides.items() if k not in own}
    thresholds = options.thresholds.replace(**rest) if rest else options.thresholds
    return dataclasses.replace(options, thresholds=thresholds, **mine)
