"""Rules that compare the running stats with what the sample batches show."""

from __future__ import annotations

from collections.abc import Iterator

from bnaudit.verdict.results import Finding, Severity
from bnaudit.verdict.rules.context import LayerContext
from bnaudit.verdict.rules.numbers import few, fmt, over, p_value, pct
from bnaudit.verdict.thresholds import Thresholds, count_rule, has_gap, is_stale, off_channels


def stale_stats(c: LayerContext) -> Iterator[Finding]:
    m, t = c.m, c.t
    if not is_stale(m, t):
        return
    first = "; no BN layer that fits these batches runs before it" if c.runs_first else ""
    yield c.finding(
        "stale-stats",
        Severity.FAIL,
        "running stats do not describe the train-mode input, relative to these batches: "
        f"{_count(m.stale_fraction, m.channels, m.stale_p, t)}: mean shift up to "
        f"{fmt(m.stale_shift_max)} sd (limit {fmt(t.stale_shift)}), ln var ratio up to "
        f"{fmt(m.stale_log_var_max)} (limit +/-{fmt(t.stale_log_var)}); worst channel "
        f"{m.stale_channel}{first}",
        m.stale_fraction,
        t.stale_fraction,
        "first" if c.runs_first else "stale",
    )


def train_eval_gap(c: LayerContext) -> Iterator[Finding]:
    m, t = c.m, c.t
    # Stale stats explain a gap too: stale-stats says it first.
    if is_stale(m, t) or not has_gap(m, t):
        return
    msg = (
        "eval-mode input drifts from the running stats: "
        f"{_count(m.gap_fraction, m.channels, m.gap_p, t)}: mean shift "
        f"{fmt(m.gap_shift_max)} sd, ln var ratio {fmt(m.gap_log_var_max)}; the stats "
        "fit train mode"
    )
    if not c.upstream_stale:
        yield c.finding(
            "train-eval-gap", Severity.WARN, msg, m.gap_fraction, t.stale_fraction, "gap"
        )
        return
    upstream = few(c.upstream_stale)
    yield c.finding(
        "train-eval-gap",
        Severity.INFO,
        f"{msg}; likely a consequence of stale stats earlier in the forward pass ({upstream})",
        m.gap_fraction,
        t.stale_fraction,
        "downstream",
        upstream=upstream,
    )


def var_bias(c: LayerContext) -> Iterator[Finding]:
    m, t = c.m, c.t
    frozen = m.kind == "frozen"  # never normalised with batch statistics
    mismatch_scale = 1.0 - m.eval_scale
    if m.calls and not frozen and over(mismatch_scale, t.var_bias_scale):
        yield c.finding(
            "var-bias",
            Severity.WARN,
            f"N = {m.values_per_channel} values per channel: "
            f"running_var estimates the unbiased variance, {fmt(m.bessel_factor)}x the biased "
            f"one train mode uses (observed {fmt(m.var_ratio_observed)}x); eval outputs are "
            f"scaled by {fmt(m.eval_scale)} relative to train mode (limit "
            f"{fmt(1 - t.var_bias_scale)})",
            mismatch_scale,
            t.var_bias_scale,
        )


def _count(fraction: float, channels: int, p: float, t: Thresholds) -> str:
    """ "12 of 16 channels (75%) beyond ..." with the count rule's limits."""
    off = off_channels(fraction, channels)
    return (
        f"{off} of {channels} channels ({pct(fraction)}) beyond the limits and sample noise, "
        f"p = {p_value(p)} from noise alone (limits {pct(t.stale_fraction)}, "
        f"{count_rule(t).minimum(channels)} channels, p < {fmt(t.stale_alpha)})"
    )
