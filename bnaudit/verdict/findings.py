"""From a layer's metrics to its findings: the rule table run in order; the model's and an
unaudited group's findings. Stale findings are weighed against the evidence in
`bnaudit.verdict.staleness`."""

from __future__ import annotations

import math

from bnaudit.verdict.codes import HINTS, hint
from bnaudit.verdict.results import MODEL, Finding, LayerMetrics, Severity
from bnaudit.verdict.rules import RULES, LayerContext
from bnaudit.verdict.rules.fold import FLOAT16_MAX, MIN_INT8_LEVELS
from bnaudit.verdict.rules.numbers import UPSTREAM_SHOWN, fmt, over, pct
from bnaudit.verdict.thresholds import (
    JUDGED,
    Thresholds,
    count_rule,
    has_gap,
    is_stale,
    off_channels,
)

__all__ = [
    "FLOAT16_MAX",
    "JUDGED",
    "MIN_INT8_LEVELS",
    "UPSTREAM_SHOWN",
    "Thresholds",
    "count_rule",
    "has_gap",
    "is_stale",
    "judge_layer",
    "judge_model",
    "not_audited",
    "off_channels",
]


def judge_layer(
    name: str,
    m: LayerMetrics,
    t: Thresholds,
    *,
    type_name: str,
    overrides_forward: bool,
    batches: int,
    upstream_stale: tuple[str, ...] = (),
    runs_first: bool = False,
) -> tuple[Finding, ...]:
    """All findings for one layer, most severe first.

    `batches` is how many batches were run (0: static checks only); `upstream_stale` names the
    stale layers that ran before this one, whose eval-mode effect reaches it; `runs_first`: no
    BN layer that fits the data runs before this one (only stale ones, or none).
    """
    c = LayerContext(name, m, t, type_name, overrides_forward, batches, upstream_stale, runs_first)
    found = [f for rule in RULES.values() for f in rule(c)]
    return tuple(sorted(found, key=lambda f: -f.severity))


def not_audited(name: str, why: str) -> Finding:
    """A key group with running stats that cannot be audited as BatchNorm: a finding, not a
    silent skip, since a layer left out is a layer the gate cannot vouch for."""
    return Finding(
        name,
        "not-audited",
        Severity.FAIL,
        f"running stats, but not BatchNorm-shaped ({why}): the layer was not audited",
        HINTS["not-audited"],
    )


def judge_model(impact, t: Thresholds) -> tuple[Finding, ...]:
    """The output-impact gate: findings about the whole model."""
    if impact is None or math.isinf(t.max_output_change):  # the gate is off by default
        return ()
    if not over(impact.rel_l2, t.max_output_change):
        return ()
    top1 = (
        "" if impact.top1_agreement is None else f", top-1 agreement {pct(impact.top1_agreement)}"
    )
    basis = getattr(impact, "top1_basis", "")
    top1 += f" ({basis})" if top1 and basis else ""
    return (
        Finding(
            MODEL,
            "output-change",
            Severity.FAIL,
            f"recalibrating the running stats ({impact.regime} regime) changes the eval output "
            f"by {fmt(impact.rel_l2)} relative L2 (limit {fmt(t.max_output_change)}), max abs "
            f"{fmt(impact.max_abs)}{top1}",
            hint("output-change"),
            impact.rel_l2,
            t.max_output_change,
        ),
    )
