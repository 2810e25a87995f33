"""Typed results of `bnaudit diff`: what changed per BN layer, its findings, the whole report.

The same conventions as `bnaudit.verdict.results` (`AuditReport`): frozen dataclasses, findings that
count or are waived, `passed` against `fail_on`, a DataFrame built once at the output boundary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bnaudit.report.record import Gated
from bnaudit.verdict.results import FailOn, Finding, Judged, Status

if TYPE_CHECKING:
    import pandas as pd

    from bnaudit.report.record import BaselineCheck

# How a layer changed, in the order the summary lists them.
IDENTICAL = "identical"  # γ, β, running statistics and T bit-identical
STATS = "stats"  # running statistics changed, γ and β did not
AFFINE = "affine"  # γ or β changed, running statistics did not
BOTH = "stats+affine"
COUNTER = "counter"  # only num_batches_tracked changed
BASE_ONLY = "base only"
NEW_ONLY = "new only"
SHAPE = "shape"  # in both, with other shapes: not compared
CHANGES = (IDENTICAL, STATS, AFFINE, BOTH, COUNTER, BASE_ONLY, NEW_ONLY, SHAPE)
UNMATCHED = (BASE_ONLY, NEW_ONLY, SHAPE)


@dataclass(frozen=True)
class DiffMetrics:
    """What changed in one BN layer. NaN: not measured, or not finite (see `nonfinite`)."""

    change: str  # one of CHANGES
    channels: int
    shape: str = ""  # what differs, for SHAPE
    # bit-identical or not; None where neither checkpoint has the tensor
    weight_changed: bool | None = None
    bias_changed: bool | None = None
    mean_changed: bool | None = None
    var_changed: bool | None = None
    counter_changed: bool | None = None
    # sizes of the change
    mean_shift_max: float = math.nan  # max |μ_new − μ_base| / sqrt(σ²_base + ε), in base sds
    log_var_max: float = math.nan  # ln((σ²_new + ε)/(σ²_base + ε)), largest magnitude, signed
    weight_rel_change: float = math.nan  # ‖Δγ‖ / max(‖γ_base‖, ‖γ_new‖), 0 when both are 0
    bias_rel_change: float = math.nan
    t_base: int | None = None
    t_new: int | None = None
    t_delta: int | None = None  # T_new − T_base
    # the weights before it (bnaudit.measure.upstream)
    upstream_weights: int = 0  # tensors upstream
    upstream_changed: int = 0  # of which changed (or are missing from one checkpoint)
    upstream_first_changed: str = ""
    upstream_rel_change: float = math.nan  # largest relative change among them
    fed_by: str = ""  # the conv/linear whose output feeds it (with a model)
    nonfinite: int = 0  # non-finite values in its tensors, both checkpoints together

    def flat(self) -> dict[str, Any]:
        """Every metric under its report name, as `LayerMetrics.flat()` gives an audit's."""
        return dataclasses.asdict(self)

    @property
    def stats_changed(self) -> bool:
        return bool(self.mean_changed or self.var_changed)

    @property
    def affine_changed(self) -> bool:
        return bool(self.weight_changed or self.bias_changed)


@dataclass(frozen=True)
class LayerDiff(Judged):
    name: str
    type: str
    metrics: DiffMetrics
    findings: tuple[Finding, ...] = ()

    @property
    def changed(self) -> bool:
        """Anything to show: the layer itself changed, or it has a finding."""
        return self.metrics.change != IDENTICAL or bool(self.findings)


@dataclass(frozen=True)
class DiffReport(Gated[LayerDiff]):
    """The comparison of BASE and NEW. `bool(report)` is `report.passed`.

    As in `AuditReport`, `findings` lists every finding, waived ones included; `passed` and the
    layer verdicts consider only those that count.
    """

    layers: tuple[LayerDiff, ...]
    upstream: str  # how the weights upstream were found (bnaudit.measure.upstream)
    fail_on: FailOn = FailOn.FAIL
    notes: tuple[str, ...] = ()
    base: str | None = None
    new: str | None = None
    base_sha256: str | None = None
    new_sha256: str | None = None
    model_findings: tuple[Finding, ...] = ()  # none today; kept for the gate's conventions
    baseline: BaselineCheck | None = None

    @property
    def checkpoint(self) -> str | None:
        """What a baseline written from this report records as its checkpoint."""
        return None if self.base is None else f"{self.base} -> {self.new}"

    @property
    def sha256(self) -> None:
        """A baseline written from this report records no single file's SHA-256..."""
        return None

    @property
    def sha256_note(self) -> str:
        """...and says why."""
        return "not recorded: a diff covers two checkpoints; its report has both SHA-256s"

    def changes(self) -> dict[str, int]:
        """Layers by how they changed (CHANGES), every kind present."""
        out = dict.fromkeys(CHANGES, 0)
        for layer in self.layers:
            out[layer.metrics.change] += 1
        return out

    def upstream_changed(self) -> int:
        """Layers with at least one changed weight upstream."""
        return sum(layer.metrics.upstream_changed > 0 for layer in self.layers)

    def code_counts(self) -> dict[str, int]:
        """Findings that count, by code."""
        out: dict[str, int] = {}
        for f in self.findings:
            if f.counts:
                out[f.code] = out.get(f.code, 0) + 1
        return out

    def status_counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for f in self.findings:
            out[f.status.value] += 1
        return out

    def to_frame(self, only_changed: bool = False) -> pd.DataFrame:
        """One row per layer, every metric a column (built once, at the output boundary)."""
        import pandas as pd

        rows = []
        for r in self.layers:
            if only_changed and not r.changed:
                continue
            row: dict[str, Any] = {"layer": r.name, "type": r.type, "verdict": r.verdict}
            row["codes"] = " ".join(sorted({f.code for f in r.findings if f.counts}))
            row["waived"] = " ".join(sorted({f.code for f in r.waived}))
            row.update(r.metrics.flat())
            rows.append(row)
        columns = ["layer", "type", "verdict", "codes", "waived"]
        columns += [f.name for f in dataclasses.fields(DiffMetrics)]
        return pd.DataFrame(rows, columns=columns)
