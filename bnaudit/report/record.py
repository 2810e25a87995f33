"""The record of a whole audit: its layers, its findings, what the gate decided.

The verdicts it holds come from `bnaudit.verdict`, the baseline comparison from `bnaudit.gate`;
the renderers of this package read it, and `bnaudit.report.audit_report.AuditReport` adds
`summary()` and `render()` on top of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from bnaudit.verdict.results import FailOn, Finding, LayerResult, Severity, Status, counted

if TYPE_CHECKING:
    import pandas as pd

    from bnaudit.measure.impact import OutputImpact


@dataclass(frozen=True)
class BaselineEntry:
    """One accepted finding: where, what, how bad, and the value measured then."""

    layer: str
    code: str
    severity: Severity
    value: float | None  # None: the finding had no value, or it was not finite
    message: str = ""


@dataclass(frozen=True)
class BaselineCheck:
    """What comparing a run with a baseline found beyond the per-finding statuses."""

    path: str
    margin: float
    stale: tuple[BaselineEntry, ...] = ()  # entries no finding matched any more
    written: bool = False  # the baseline was written by this run from its own findings


class Metrics(Protocol):
    """A layer's metrics (`LayerMetrics` or `DiffMetrics`) under their flat report names."""

    def flat(self) -> dict[str, Any]: ...


class Layer(Protocol):
    """What the renderers read of a layer, of an audit (`LayerResult`) or of a diff
    (`LayerDiff`): the summaries and the JSON layer entries serve both."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def findings(self) -> tuple[Finding, ...]: ...
    @property
    def severity(self) -> Severity: ...
    @property
    def verdict(self) -> str: ...


L = TypeVar("L")  # a report's layer type


class Gated(Generic[L]):
    """What makes a report a gate: its findings, those that fail at `fail_on`, the verdict.

    For the frozen dataclasses `AuditReport` and `DiffReport`, which provide `layers` (each
    with `findings` and a `verdict`), `model_findings` and `fail_on`.
    """

    layers: tuple[L, ...]
    model_findings: tuple[Finding, ...]
    fail_on: FailOn

    def layer(self, name: str) -> L:
        """The layer named `name`; KeyError when there is none."""
        for result in self.layers:
            if result.name == name:  # type: ignore[attr-defined]
                return result
        raise KeyError(name)

    @property
    def findings(self) -> list[Finding]:
        return [*self.model_findings, *(f for layer in self.layers for f in layer.findings)]

    @property
    def failing(self) -> list[Finding]:
        """The findings that make the gate fail: they count and are at or above `fail_on`."""
        return [f for f in self.findings if f.counts and self.fail_on.fails(f.severity)]

    @property
    def passed(self) -> bool:
        return not self.failing

    def __bool__(self) -> bool:
        return self.passed

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    def counts(self) -> dict[str, int]:
        """Layers by verdict, every verdict present (zero counts included)."""
        out = {s.label: 0 for s in Severity}
        for layer in self.layers:
            out[layer.verdict] += 1
        return out


@dataclass(frozen=True)
class AuditRecord(Gated[LayerResult]):
    """The whole audit as data, what every renderer reads (`AuditReport` adds the rendering).

    `bool(report)` is `report.passed`.

    `findings` lists every finding, waived ones included; `passed` and the layer verdicts only
    consider the findings that count (`Finding.counts`).
    """

    layers: tuple[LayerResult, ...]
    fail_on: FailOn = FailOn.FAIL
    batches: int = 0
    forward_passes: int = 0
    synthetic_data: bool = False
    notes: tuple[str, ...] = ()
    checkpoint: str | None = None
    sha256: str | None = None
    sha256_skipped: str | None = None  # why `check` did not compute sha256: "not computed: …"
    thresholds: dict[str, float] = field(default_factory=dict)
    impact: OutputImpact | None = None
    model_findings: tuple[Finding, ...] = ()  # about the whole model (layer MODEL)
    baseline: BaselineCheck | None = None  # set when a baseline judged the findings
    # The finding codes judged when not all were (a static audit, or no batch), and what the
    # others need ("--model and --data"); None: every check ran.
    checks_run: tuple[str, ...] | None = None
    checks_need: str = ""

    @property
    def sha256_note(self) -> str | None:
        """What a report says in place of `sha256` when there is none ("not computed: …");
        None when `sha256` holds the hash."""
        if self.sha256 is not None:
            return None
        if self.sha256_skipped:
            return self.sha256_skipped
        return "not computed" + ("" if self.checkpoint else ": no checkpoint file was audited")

    def status_counts(self) -> dict[str, int]:
        """Findings by status, every status present (zero counts included)."""
        out = {s.value: 0 for s in Status}
        for f in self.findings:
            out[f.status.value] += 1
        return out

    def __repr__(self) -> str:
        """One line: the verdict, the layer verdicts, what fails the gate, the data."""
        counts = ", ".join(f"{k} {v}" for k, v in reversed(self.counts().items()) if v)
        failing = len(self.failing)
        gate = f"{failing} failing at fail_on={self.fail_on.value}" if failing else "passed"
        where = f", checkpoint={self.checkpoint!r}" if self.checkpoint else ""
        synthetic = " (synthetic)" if self.synthetic_data else ""
        return (
            f"<{type(self).__name__} {self.verdict.upper()}: "
            f"{counted(len(self.layers), 'BN layer')} ({counts or 'none'}), {gate}, "
            f"{counted(self.batches, 'batch', 'batches')}"
            f"{synthetic}{where}>"
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per layer, every metric a column (built once, at the output boundary)."""
        import pandas as pd

        rows = []
        for r in self.layers:
            row = {"layer": r.name, "type": r.type, "verdict": r.verdict}
            row["codes"] = " ".join(sorted({f.code for f in r.findings if f.counts}))
            row["waived"] = " ".join(sorted({f.code for f in r.waived}))
            row.update(r.metrics.flat())
            rows.append(row)
        return pd.DataFrame(rows)
