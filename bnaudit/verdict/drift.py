"""How far the running stats are from one regime's input statistics, and whether that is judged.

Staleness compares the running stats with what their EMA estimates on the sample data: the mean
over batches of the batch means and of the unbiased batch variances. A channel counts as off only
when the difference is practically large *and* larger than the finite sample (K batches) and the
EMA jitter (BN-NOTES "Momentum") explain: var(μ − μ_r) ≈ v/K + v·m/(2 − m), with v the variance
of the batch means between batches. v itself comes from K batches, so how often a healthy
channel is off follows Student's t, and the layer verdict asks whether the count of off channels
is more than that noise gives (`bnaudit.verdict.significance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerAttrs, LayerKind
from bnaudit.measure.statistics import RegimeStats
from bnaudit.verdict import significance as S
from bnaudit.verdict.thresholds import JUDGED, Thresholds

NAN = math.nan
# Below min_batch, a layer is judged when each batch is worth this many independent values per
# channel (`effective_values`): the batch size then biases the expected batch variance by 1 %
# at most, 1/40 of the stale_log_var limit, with room for the spread's error over few batches.
MIN_EFFECTIVE_VALUES = 100


@dataclass(frozen=True)
class Drift:
    """How far the running stats are from one regime's input statistics."""

    shift_max: float = NAN
    shift_median: float = NAN
    log_var_max: float = NAN  # signed, the largest in magnitude
    log_var_median: float = NAN
    fraction: float = NAN  # channels beyond the thresholds and beyond noise
    p: float = NAN  # chance that noise alone puts that many channels off (binomial tail)
    channel: int = -1
    finite: bool = True


def drift(r: RegimeStats, a: LayerAttrs, t: Thresholds) -> Drift:
    """One layer's `drifts`: a stack of one."""
    if not a.has_running_stats:
        return Drift()
    assert a.running_mean is not None and a.running_var is not None  # has_running_stats
    mean, var = a.running_mean[None], a.running_var[None]
    return drifts([r], mean, var, a, t, S.noise_p)[0]


def drifts(
    regimes: Sequence[RegimeStats],
    running_mean: Tensor,
    running_var: Tensor,
    a0: LayerAttrs,
    t: Thresholds,
    noise_p: Callable[[int, int, int, float], float],
) -> list[Drift]:
    """The `Drift` of each of L layers alike: [L, C] running stats, one regime each.

    Alike: the same width, eps, momentum and T (`a0`'s), and the same counts and accumulators
    in `regimes`. Each tensor operation runs once on all rows; each element gets the bits it
    would get alone (tests/test_metrics_exact.py holds the per-layer torch formulation).
    """
    r0, c = regimes[0], a0.num_features
    means, vars_ = r0.batch_means, r0.batch_vars
    if means.mean is None or vars_.mean is None or c < 1:
        return [Drift()] * len(regimes)
    eps, nbt = a0.eps, a0.num_batches_tracked or 0

    def rows(get: Callable[[RegimeStats], Tensor | None]) -> Tensor:
        return torch.stack([get(r) for r in regimes])  # type: ignore[misc]

    run_var = running_var.clamp_min(0) + eps
    diff = (rows(lambda r: r.batch_means.mean) - running_mean).abs()
    shift = diff / run_var.sqrt()
    var = rows(lambda r: r.batch_vars.mean)
    log_var = ((var + eps) / run_var).log()
    size = log_var.abs()
    finite = (torch.isfinite(shift).all(1) & torch.isfinite(log_var).all(1)).tolist()
    off: list[int] | None = None  # None: sample noise not measurable (a single batch)
    if means.variance() is not None and vars_.variance() is not None:
        k = means.count
        v_mean = rows(lambda r: r.batch_means.m2) / (means.count - 1)
        v_var = rows(lambda r: r.batch_vars.m2) / (vars_.count - 1)
        sd_mean = (v_mean / k + F.ema_jitter_var(v_mean, a0.momentum, nbt)).sqrt()
        sd_log_var = (v_var / k + F.ema_jitter_var(v_var, a0.momentum, nbt)).sqrt() / (var + eps)
        off_mean = (shift > t.stale_shift) & (diff > t.stale_z * sd_mean)
        off_var = (size > t.stale_log_var) & (size > t.stale_z * sd_log_var)
        off = (off_mean | off_var).sum(1).tolist()
    badness = torch.maximum(shift / t.stale_shift, size / t.stale_log_var)
    worst = size.nan_to_num(math.inf).argmax(1, keepdim=True)
    floats = torch.stack(
        [
            shift.amax(1),
            shift.median(1).values,
            log_var.gather(1, worst)[:, 0],
            log_var.median(1).values,
        ]
    ).T.tolist()
    channel = torch.nan_to_num(badness, nan=math.inf).argmax(1).tolist()
    batches = batches_behind(r0)
    out = []
    for i, (shift_max, shift_median, log_var_max, log_var_median) in enumerate(floats):
        fraction = p = NAN
        if finite[i] and off is not None:
            fraction = off[i] / c
            p = noise_p(off[i], c, batches, t.stale_z)
        figures = (shift_max, shift_median, log_var_max, log_var_median, fraction, p)
        out.append(Drift(*figures, channel=channel[i], finite=finite[i]))
    return out


def judged(
    r: RegimeStats,
    a: LayerAttrs,
    d: Drift,
    t: Thresholds,
    synthetic: bool,
    judgeable: Callable[[int, int, float, float], bool] = S.judgeable,
) -> str:
    """`JUDGED` when the stale comparison is meaningful, else why not (shown in the report)."""
    if not a.has_running_stats:
        return "n/a: no running stats"
    if a.kind is LayerKind.FROZEN:
        return "n/a: frozen statistics"
    if synthetic:
        return "no: synthetic data"
    if r.calls == 0:
        return "no: layer not reached"
    if r.batch_means.count < 2:
        return "no: needs at least 2 batches"
    if r.min_batch < t.min_batch:
        effective = effective_values(r)
        if not effective >= MIN_EFFECTIVE_VALUES:  # NaN: not measurable, not judged either
            shown = f"{effective:.3g}" if math.isfinite(effective) else "unmeasurable"
            return (
                f"no: batch size {r.min_batch} < {t.min_batch} and {shown} effective values "
                f"per channel < {MIN_EFFECTIVE_VALUES}"
            )
    k, c = batches_behind(r), a.num_features
    if k >= 2 and not judgeable(c, k, t.stale_z, t.stale_alpha):
        # Even every channel off would be likely noise: say how many batches would do.
        least = S.fewest_batches(c, t.stale_z, t.stale_alpha)
        needs = f", needs K >= {least}" if least is not None else f" at stale_z {t.stale_z:g}"
        return f"no: too few batches (K={k}) for {c} channel{'s' * (c != 1)}{needs}"
    if not d.finite:
        return "no: non-finite input statistics"
    if math.isnan(d.fraction):
        return "no: sample noise not measurable"
    return JUDGED


def effective_values(r: RegimeStats) -> float:
    """How many independent values per channel one batch is worth: the mean batch variance
    over the variance of the batch means between batches, the fewest of any channel (NaN when
    not measurable: fewer than 2 batches, or only constant channels).

    Values within a sample are correlated, and samples differ as a whole, so N·B values count
    for less than N·B; the variance of the batch means says how much less. A batch mean
    off by that spread is what a small batch adds to train mode's normalisation, and the
    expected batch variance misses about that much of the population's, so 1/this bounds the
    relative bias a small audit batch puts into a stale comparison (BN-NOTES, "Stale
    statistics versus a train/eval gap")."""
    spread, var = r.batch_means.variance(), r.batch_vars.mean
    if spread is None or var is None:
        return NAN
    ratio = var / spread  # a channel whose batch means never moved: inf, as good as it gets
    ratio = ratio[~ratio.isnan()]
    return float(ratio.min()) if ratio.numel() else NAN


def batches_behind(r: RegimeStats) -> int:
    """K: batches behind both between-batch variances (the mean's and the variance's)."""
    return int(min(r.batch_means.count, r.batch_vars.count))
