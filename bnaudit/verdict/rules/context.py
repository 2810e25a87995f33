"""What a rule reads about one layer, and how it words a finding."""

from __future__ import annotations

from dataclasses import dataclass

from bnaudit.verdict.codes import hint
from bnaudit.verdict.results import Finding, LayerMetrics, Severity
from bnaudit.verdict.thresholds import Thresholds


@dataclass(frozen=True)
class LayerContext:
    """One layer under judgement: its metrics, the limits, and what the passes saw around it.

    `batches`: how many batches were run (0: static checks only); `upstream_stale`: the stale
    layers that ran before this one, whose eval-mode effect reaches it; `runs_first`: no BN
    layer that fits the data runs before this one (only stale ones, or none).
    """

    name: str
    m: LayerMetrics
    t: Thresholds
    type_name: str = ""
    overrides_forward: bool = False
    batches: int = 0
    upstream_stale: tuple[str, ...] = ()
    runs_first: bool = False

    @property
    def unreached(self) -> bool:
        """Batches ran, and none reached this layer: only the static checks ran on it."""
        return bool(self.batches) and self.m.seen.calls == 0

    def finding(
        self,
        code: str,
        severity: Severity,
        message: str,
        value: float | None = None,
        threshold: float | None = None,
        situation: str = "",
        **fields: str,
    ) -> Finding:
        """A finding on this layer, with the hint of `code` in `situation`."""
        fix = hint(code, situation, **fields)
        return Finding(self.name, code, severity, message, fix, value, threshold)
