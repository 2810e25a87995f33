"""Rules on folding the layer into the conv/linear before it."""

from __future__ import annotations

from collections.abc import Iterator

from bnaudit.verdict.results import Finding, Severity
from bnaudit.verdict.rules.context import LayerContext
from bnaudit.verdict.rules.numbers import fmt, over

# Shared with bnaudit.measure.fold's docstring; kept here so that judging needs no torch.
FLOAT16_MAX = 65504.0
MIN_INT8_LEVELS = 8.0  # int8 levels a folded channel keeps, below which the fold is at risk


def fold_mismatch(c: LayerContext) -> Iterator[Finding]:
    m, t = c.m, c.t
    if m.fold_with and m.fold_checked and over(m.fold_ratio, t.max_error_ratio):
        yield c.finding(
            "fold-mismatch",
            Severity.FAIL,
            f"folded into {m.fold_with}, the output differs from {m.fold_with} -> BN: max abs err "
            f"{fmt(m.fold_max_err)}, {fmt(m.fold_ratio)}x the tolerance (limit "
            f"{fmt(t.max_error_ratio)}x)",
            m.fold_ratio,
            t.max_error_ratio,
        )


def fold_risk(c: LayerContext) -> Iterator[Finding]:
    m = c.m
    if not m.fold_with:
        return
    if m.folded_weight_max > FLOAT16_MAX:
        yield c.finding(
            "fold-risk",
            Severity.WARN,
            f"folded into {m.fold_with}, max |weight| or |bias| is {fmt(m.folded_weight_max)}: "
            f"overflows float16 (max {FLOAT16_MAX:g}); fold scale up to "
            f"{fmt(m.max_amplification)}",
            m.folded_weight_max,
            FLOAT16_MAX,
            "float16",
        )
    elif m.fold_int8_levels < MIN_INT8_LEVELS:
        yield c.finding(
            "fold-risk",
            Severity.WARN,
            f"folded into {m.fold_with}, the median output channel keeps "
            f"{fmt(m.fold_int8_levels)} of 127 int8 per-tensor levels (limit "
            f"{MIN_INT8_LEVELS:g}); fold scale up to {fmt(m.max_amplification)}",
            m.fold_int8_levels,
            MIN_INT8_LEVELS,
            "int8",
        )
