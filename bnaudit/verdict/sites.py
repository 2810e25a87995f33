"""A BN module called at several sites of one forward, judged per call site.

One module, k inputs, one pair of running statistics: the pooled comparison the other rules
make (every call against the stored statistics, the calls as if they were batches) mixes the
sites, and its noise estimate grows with the difference between them, so its verdict flips with
the amount of data. Here each site is compared with the stored statistics on its own, by effect
size (the same limits as `stale-stats`), and the sites with each other: where two sites differ
by more than twice the limits, no single pair of statistics is within the limits of both, and a
recalibration (update_bn averages the sites) fits none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bnaudit.verdict.codes import hint
from bnaudit.verdict.results import Finding, Severity
from bnaudit.verdict.rules.numbers import fmt, pct
from bnaudit.verdict.staleness import StaleEvidence, confident
from bnaudit.verdict.thresholds import Thresholds


@dataclass(frozen=True)
class Site:
    """One call site's input against the stored statistics (medians over the channels)."""

    index: int  # 1: the first call of the module in a forward
    batches: int
    shift_median: float  # |μ_site − μ_r| / sqrt(σ²_r + ε)
    log_var_median: float  # ln((σ²_site + ε)/(σ²_r + ε)), signed
    off: float  # share of the channels beyond the stale limits


@dataclass(frozen=True)
class CallSites:
    """Every site of one shared module; the share of its channels where two sites differ by
    more than twice the limits (no single pair of statistics fits both); and the share where
    the stored statistics are beyond the limits from the sites' average, what training in
    train mode leaves in a shared module (its running average takes every call)."""

    sites: tuple[Site, ...]
    apart: float
    pooled_off: float

    def off(self, t: Thresholds) -> bool:
        """The stored statistics disagree with the sites' average in enough channels."""
        return self.pooled_off >= t.stale_fraction


def call_sites(
    moments: Sequence[tuple[Tensor | None, Tensor | None, int]],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    t: Thresholds,
) -> CallSites:
    """Per site (mean of its batch means, mean of its unbiased batch variances, batches)."""
    run_var = running_var.double().clamp_min(0) + eps
    sd = run_var.sqrt()
    sites, seen = [], []
    for i, (mean, var, batches) in enumerate(moments, 1):
        if mean is None or var is None:
            continue
        shift = (mean.double() - running_mean.double()).abs() / sd
        log_var = ((var.double() + eps) / run_var).log()
        off = (shift > t.stale_shift) | (log_var.abs() > t.stale_log_var)
        sites.append(Site(i, batches, _median(shift), _median(log_var), float(off.double().mean())))
        seen.append((mean.double(), var.double() + eps))
    pooled_off = 0.0
    if seen:
        mean = torch.stack([m for m, _ in seen]).mean(0)
        var = torch.stack([v for _, v in seen]).mean(0)
        shift = (mean - running_mean.double()).abs() / sd
        off = (shift > t.stale_shift) | ((var / run_var).log().abs() > t.stale_log_var)
        pooled_off = float(off.double().mean())
    apart = torch.zeros_like(sd, dtype=torch.bool)
    for a, (m1, v1) in enumerate(seen):
        for m2, v2 in seen[a + 1 :]:
            apart |= ((m1 - m2).abs() / sd > 2 * t.stale_shift) | (
                (v1 / v2).log().abs() > 2 * t.stale_log_var
            )
    return CallSites(tuple(sites), float(apart.double().mean()) if seen else 0.0, pooled_off)


def _median(x: Tensor) -> float:
    return float(x.median()) if x.numel() else float("nan")


def judge_sites(
    name: str,
    findings: tuple[Finding, ...],
    sites: CallSites,
    t: Thresholds,
    evidence: StaleEvidence,
) -> tuple[Finding, ...]:
    """A shared module's findings: the pooled comparisons (`stale-stats`, `train-eval-gap`)
    give way to `shared-bn` with each site's figures, and to `stale-stats` only with evidence
    that the statistics are stale (`bnaudit.verdict.staleness`)."""
    kept = [f for f in findings if f.code not in ("stale-stats", "train-eval-gap")]
    cannot = sites.apart >= t.stale_fraction
    described = "; ".join(
        f"site {s.index}: mean shift median {fmt(s.shift_median)} sd, ln var median "
        f"{fmt(s.log_var_median)}, {pct(s.off)} of the channels beyond the limits"
        for s in sites.sites
    )
    fit = (
        f"in {pct(sites.apart)} of the channels two sites differ by more than twice the limits, "
        "so no single pair of running statistics fits all of them"
        if cannot
        else "the sites agree, so one pair of running statistics can fit them all"
    )
    kept.append(
        Finding(
            name,
            "shared-bn",
            Severity.WARN if cannot or sites.off(t) else Severity.INFO,
            f"one module called at {len(sites.sites)} sites per forward, judged per site "
            f"against its one pair of running statistics: {described}; {fit}",
            hint("shared-bn"),
            sites.apart,
            t.stale_fraction,
        )
    )
    labels = evidence.labels
    stale = labels.better if labels is not None else confident(evidence.confidence)
    if stale and sites.off(t):
        why = (
            f"recalibrating raises {labels.change()}"
            if labels is not None
            else "recalibrated statistics make the output more confident (cross-fitted, beyond "
            "noise)"
        )
        kept.append(
            Finding(
                name,
                "stale-stats",
                Severity.FAIL,
                f"running stats beyond the limits from the average of the call sites' inputs "
                f"(what training in train mode leaves) in {pct(sites.pooled_off)} of the "
                f"channels, and {why}",
                hint("stale-stats", "shared"),
                sites.pooled_off,
                t.stale_fraction,
            )
        )
    return tuple(sorted(kept, key=lambda f: -f.severity))
