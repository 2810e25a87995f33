"""From a layer's attributes and accumulators to its `LayerMetrics`.

Staleness compares the running stats with what their EMA estimates on the sample data: the mean
over batches of the batch means and of the unbiased batch variances. A channel counts as off only
when the difference is practically large *and* larger than the finite sample (K batches) and the
EMA jitter (BN-NOTES "Momentum") explain: var(μ − μ_r) ≈ v/K + v·m/(2 − m), with v the variance
of the batch means between batches. v itself comes from K batches, so how often a healthy
channel is off follows Student's t, and the layer verdict asks whether the count of off channels
is more than that noise gives (`bnaudit.verdict.significance`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bnaudit.core import formulas as F
from bnaudit.core.layers import Kind, LayerAttrs
from bnaudit.measure.explain import Diagnosis, Explanation
from bnaudit.measure.statistics import LayerStats, MaxTracker, RegimeStats
from bnaudit.verdict import significance as S
from bnaudit.verdict.results import LayerMetrics
from bnaudit.verdict.thresholds import JUDGED, Thresholds

NAN = math.nan


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
    if not a.has_running_stats or r.batch_means.mean is None or r.batch_vars.mean is None:
        return Drift()
    assert a.running_mean is not None and a.running_var is not None  # has_running_stats
    k = r.batch_means.count
    run_var = a.running_var.clamp_min(0) + a.eps
    diff = (r.batch_means.mean - a.running_mean).abs()
    shift = diff / run_var.sqrt()
    var = r.batch_vars.mean
    log_var = ((var + a.eps) / run_var).log()
    rows = [shift, log_var]
    v_mean, v_var = r.batch_means.variance(), r.batch_vars.variance()
    if v_mean is not None and v_var is not None:
        nbt = a.num_batches_tracked or 0
        sd_mean = (v_mean / k + F.ema_jitter_var(v_mean, a.momentum, nbt)).sqrt()
        sd_log_var = (v_var / k + F.ema_jitter_var(v_var, a.momentum, nbt)).sqrt() / (var + a.eps)
        rows += [diff, sd_mean, sd_log_var]
    # One copy out per layer; the comparisons and reductions run on Python floats. As torch
    # operations they were ~30 of ~5 µs dispatch each on a few channels (measure was 18 % of
    # the plain passes on a 400-layer BatchNorm1d MLP). They are exact (comparisons, quotients,
    # max, order statistics), so every figure keeps its bits; log and sqrt stay torch's (numpy's
    # sqrt differs from torch's vectorised one in the last place). tests/test_metrics_exact.py
    # holds the torch formulation and compares.
    values = torch.stack(rows).tolist()
    shifts, log_vars = values[0], values[1]
    finite = all(map(math.isfinite, shifts)) and all(map(math.isfinite, log_vars))
    fraction = p = NAN
    if finite and len(values) == 5:
        ts, tl, z, off = t.stale_shift, t.stale_log_var, t.stale_z, 0
        for s_c, v_c, d_c, sm_c, sv_c in zip(*values, strict=True):
            size = abs(v_c)
            if (s_c > ts and d_c > z * sm_c) or (size > tl and size > z * sv_c):
                off += 1
        fraction = off / a.num_features
        p = S.noise_p(off, a.num_features, _batches(r), t.stale_z)
    return Drift(
        shift_max=_list_max(shifts, finite),
        shift_median=_list_median(shifts, finite),
        log_var_max=log_vars[_first_argmax([abs(v) for v in log_vars], finite)],
        log_var_median=_list_median(log_vars, finite),
        fraction=fraction,
        p=p,
        channel=_first_argmax(_badness(shifts, log_vars, t, finite), finite),
        finite=finite,
    )


def _badness(shifts: list[float], log_vars: list[float], t: Thresholds, finite: bool):
    """torch.maximum(shift / stale_shift, |log var| / stale_log_var), NaN propagating."""
    ts, tl = t.stale_shift, t.stale_log_var
    out = []
    for s, v in zip(shifts, log_vars, strict=True):
        a, b = s / ts, abs(v) / tl
        out.append(NAN if not finite and (a != a or b != b) else (a if a >= b else b))
    return out


def _list_max(values: list[float], finite: bool) -> float:
    """torch.max: NaN if any value is NaN."""
    if not values:
        return NAN
    return NAN if not finite and any(v != v for v in values) else max(values)


def _list_median(values: list[float], finite: bool) -> float:
    """torch.median: the lower of the two middle values, NaN if any value is NaN."""
    if not finite and any(v != v for v in values):
        return NAN
    return sorted(values)[(len(values) - 1) // 2]


def _first_argmax(values: list[float], finite: bool) -> int:
    """torch's argmax of nan_to_num(values, nan=inf): the first of the largest, where NaN
    counts as inf and inf as the largest finite float (nan_to_num's posinf)."""
    if not finite:
        big = 1.7976931348623157e308
        values = [
            math.inf if v != v else big if v == math.inf else -big if v == -math.inf else v
            for v in values
        ]
    return max(range(len(values)), key=values.__getitem__)


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
    if a.kind is Kind.FROZEN:
        return "n/a: frozen statistics"
    if synthetic:
        return "no: synthetic data"
    if r.calls == 0:
        return "no: layer not reached"
    if r.batch_means.count < 2:
        return "no: needs at least 2 batches"
    if r.min_batch < t.min_batch:
        return f"no: batch size {r.min_batch} < {t.min_batch}"
    k, c = _batches(r), a.num_features
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


@dataclass(frozen=True)
class Figures:
    """What `measure` reads from a layer's tensors: its per-channel work reduced to numbers."""

    stale: Drift
    gap: Drift
    stale_judged: str
    gap_judged: str
    jitter: float
    observed: float
    nonfinite_values: int
    negative_var_channels: int
    zero_var_channels: int
    initial_stats: bool
    max_amplification: float
    maxima: tuple[float, ...]  # `_tracked` of each of `_trackers(s)`, in that order


def _trackers(s: LayerStats) -> tuple[MaxTracker, ...]:
    return (
        *(s.train.err_abs, s.train.err_ratio, s.eval.err_abs, s.eval.err_ratio),
        *(s.update.mean_ratio, s.update.var_ratio, s.update.mean_step, s.update.var_step),
    )


def _regimes(s: LayerStats, regime: str) -> tuple[RegimeStats, RegimeStats | None]:
    """(what the running stats should describe, the eval-mode input for the gap or None)."""
    return (s.eval, None) if regime == "eval" else (s.train, s.eval)


def figures(
    a: LayerAttrs,
    s: LayerStats,
    t: Thresholds,
    regime: str = "train",
    synthetic: bool = False,
    judgeable: Callable[[int, int, float, float], bool] = S.judgeable,
) -> Figures:
    """One layer's figures, one tensor operation after another (`figures_of` stacks layers)."""
    described, eval_input = _regimes(s, regime)
    stale = drift(described, a, t)
    gap = drift(eval_input, a, t) if eval_input is not None else Drift()
    gap_judged = "n/a: regime eval"
    if eval_input is not None:
        gap_judged = judged(eval_input, a, gap, t, synthetic, judgeable)
    nbt = a.num_batches_tracked or 0
    jitter = NAN
    observed = NAN
    if a.has_running_stats:
        assert a.running_var is not None
        run_sd = (a.running_var.clamp_min(0) + a.eps).sqrt()
        v_mean = s.train.batch_means.variance()
        if v_mean is not None:
            jitter = float((F.ema_jitter_var(v_mean, a.momentum, nbt).sqrt() / run_sd).median())
        if s.train.biased_vars.mean is not None:
            ratio = a.running_var / s.train.biased_vars.mean
            observed = float(ratio.log().median().exp()) if bool((ratio > 0).all()) else NAN
    return Figures(
        stale=stale,
        gap=gap,
        stale_judged=judged(described, a, stale, t, synthetic, judgeable),
        gap_judged=gap_judged,
        jitter=jitter,
        observed=observed,
        nonfinite_values=_count_nonfinite(a),
        negative_var_channels=_count(a.running_var, lambda v: v < 0),
        zero_var_channels=_count(a.running_var, lambda v: v == 0),
        initial_stats=_initial(a),
        max_amplification=(
            _max(F.amplification(a.weight, a.running_var, a.eps))
            if a.running_var is not None
            else NAN
        ),
        maxima=tuple(_tracked(m) for m in _trackers(s)),
    )


def figures_of(
    layers: Sequence[tuple[LayerAttrs, LayerStats]],
    t: Thresholds,
    regime: str = "train",
    synthetic: bool = False,
) -> list[Figures]:
    """Every layer's `figures`, layers alike (`_stack_key`) stacked into [L, C] tensors.

    A layer's figures cost a few dozen tensor operations of a few µs each, whatever its width:
    on many narrow layers (a 400-layer BatchNorm1d MLP) that was most of the work after the
    passes. The stacked operations are the same ones, row by row: elementwise with the same
    Python scalars (torch's float64 log, sqrt, exp and rsqrt give each element the same bits
    wherever it sits in a tensor: vectorised, tail included), and reductions along the channels
    that select a value (max, median, argmax) or count. tests/test_metrics_stacked.py compares
    every field with `figures` bit for bit.
    """
    # Layers share a few (C, K) and off counts: the significance figures are computed once each.
    judgeable = functools.lru_cache(maxsize=None)(S.judgeable)
    noise_p = functools.lru_cache(maxsize=None)(S.noise_p)
    out: list[Figures | None] = [None] * len(layers)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (a, s) in enumerate(layers):
        key = _stack_key(a, s, regime)
        if key is None:
            out[i] = figures(a, s, t, regime, synthetic, judgeable)
        else:
            groups.setdefault(key, []).append(i)
    for same in groups.values():
        if len(same) == 1:
            i = same[0]
            out[i] = figures(*layers[i], t, regime, synthetic, judgeable)
            continue
        got = _stacked([layers[i] for i in same], t, regime, synthetic, judgeable, noise_p)
        for i, f in zip(same, got, strict=True):
            out[i] = f
    return out  # type: ignore[return-value]


def _stack_key(a: LayerAttrs, s: LayerStats, regime: str) -> tuple[Any, ...] | None:
    """What layers stacked together share: width, device, every Python scalar of the formulas
    and which accumulators exist. None: a layer `_stacked` does not handle (no running stats,
    a regime without two batches, ...), measured on its own."""
    c = a.num_features
    if not a.has_running_stats or c < 1:
        return None
    assert a.running_mean is not None and a.running_var is not None
    device = a.running_mean.device
    described, eval_input = _regimes(s, regime)
    drifts = [r for r in (described, eval_input) if r is not None]
    moments = [m for r in drifts for m in (r.batch_means, r.batch_vars)]
    if any(m.mean is None or m.m2 is None or m.count <= 1 for m in moments):
        return None
    train_means, biased = s.train.batch_means, s.train.biased_vars
    maxima = [m.value for m in _trackers(s)]
    tensors = [a.running_mean, a.running_var, a.weight, a.bias, biased.mean, *maxima]
    tensors += [train_means.mean, train_means.m2]
    tensors += [t for m in moments for t in (m.mean, m.m2)]
    for v in tensors:
        if v is not None and (v.dtype != torch.float64 or v.shape != (c,) or v.device != device):
            return None
    return (
        *(c, device, a.eps, a.momentum, a.num_batches_tracked or 0),
        *(a.weight is None, a.bias is None, biased.mean is None),
        train_means.count if train_means.m2 is not None else None,
        tuple(m.count for m in moments),
        tuple(v is None for v in maxima),
    )


def _stacked(
    layers: list[tuple[LayerAttrs, LayerStats]],
    t: Thresholds,
    regime: str,
    synthetic: bool,
    judgeable: Callable[[int, int, float, float], bool],
    noise_p: Callable[[int, int, int, float], float],
) -> list[Figures]:
    """`figures` of layers that share a `_stack_key`, each tensor operation run once on all."""
    a0, s0 = layers[0]
    eps, nbt = a0.eps, a0.num_batches_tracked or 0

    def rows(get: Callable[[LayerAttrs, LayerStats], Tensor | None]) -> Tensor:
        return torch.stack([get(a, s) for a, s in layers])  # type: ignore[misc]

    mean, var = rows(lambda a, s: a.running_mean), rows(lambda a, s: a.running_var)
    eval_input = _regimes(s0, regime)[1]
    stale = _drifts(layers, lambda s: _regimes(s, regime)[0], mean, var, a0, t, noise_p)
    if eval_input is not None:
        gap = _drifts(layers, lambda s: s.eval, mean, var, a0, t, noise_p)
    else:
        gap = [Drift()] * len(layers)
    numbers: list[Tensor] = []  # [L] rows of float figures, read out once
    train_means = s0.train.batch_means
    if train_means.variance() is not None:
        v_mean = rows(lambda a, s: s.train.batch_means.m2) / (train_means.count - 1)
        run_sd = (var.clamp_min(0) + eps).sqrt()
        jitter = (F.ema_jitter_var(v_mean, a0.momentum, nbt).sqrt() / run_sd).median(1).values
    else:
        jitter = torch.full((len(layers),), NAN, dtype=torch.float64)
    if s0.train.biased_vars.mean is not None:
        ratio = var / rows(lambda a, s: s.train.biased_vars.mean)
        observed = ratio.log().median(1).values.exp()
        observed = torch.where((ratio > 0).all(1), observed, NAN)
    else:
        observed = torch.full((len(layers),), NAN, dtype=torch.float64)
    weight = rows(lambda a, s: a.weight) if a0.weight is not None else None
    bias = rows(lambda a, s: a.bias) if a0.bias is not None else None
    numbers += [jitter, observed, F.amplification(weight, var, eps).amax(1)]
    present = [i for i, m in enumerate(_trackers(s0)) if m.value is not None]
    trackers = [_trackers(s) for _, s in layers]
    for j in present:
        numbers.append(torch.stack([m[j].value for m in trackers]).amax(1))  # type: ignore[misc]
    floats = torch.stack(numbers).T.tolist()
    nonfinite = sum((~torch.isfinite(v)).sum(1) for v in (weight, bias, mean, var) if v is not None)
    counts = torch.stack([nonfinite, (var < 0).sum(1), (var == 0).sum(1)]).T.tolist()
    initial = ((mean == 0).all(1) & (var == 1).all(1)).tolist()
    out = []
    for i, (a, s) in enumerate(layers):
        jit, obs, amp, *tracked = floats[i]
        maxima_i = [NAN] * 8
        for j, value in zip(present, tracked, strict=True):
            maxima_i[j] = value
        described = _regimes(s, regime)[0]
        gap_judged = "n/a: regime eval"
        if eval_input is not None:
            gap_judged = judged(s.eval, a, gap[i], t, synthetic, judgeable)
        out.append(
            Figures(
                stale=stale[i],
                gap=gap[i],
                stale_judged=judged(described, a, stale[i], t, synthetic, judgeable),
                gap_judged=gap_judged,
                jitter=jit,
                observed=obs,
                nonfinite_values=counts[i][0],
                negative_var_channels=counts[i][1],
                zero_var_channels=counts[i][2],
                initial_stats=initial[i],
                max_amplification=amp,
                maxima=tuple(maxima_i),
            )
        )
    return out


def _drifts(
    layers: list[tuple[LayerAttrs, LayerStats]],
    regime_of: Callable[[LayerStats], RegimeStats],
    running_mean: Tensor,
    running_var: Tensor,
    a0: LayerAttrs,
    t: Thresholds,
    noise_p: Callable[[int, int, int, float], float],
) -> list[Drift]:
    """`drift` of stacked layers: the torch formulation (tests/test_metrics_exact.py) by rows."""
    regimes = [regime_of(s) for _, s in layers]
    r0 = regimes[0]
    k, c, eps, nbt = r0.batch_means.count, a0.num_features, a0.eps, a0.num_batches_tracked or 0

    def rows(get: Callable[[RegimeStats], Tensor | None]) -> Tensor:
        return torch.stack([get(r) for r in regimes])  # type: ignore[misc]

    run_var = running_var.clamp_min(0) + eps
    diff = (rows(lambda r: r.batch_means.mean) - running_mean).abs()
    shift = diff / run_var.sqrt()
    var = rows(lambda r: r.batch_vars.mean)
    log_var = ((var + eps) / run_var).log()
    finite = (torch.isfinite(shift).all(1) & torch.isfinite(log_var).all(1)).tolist()
    v_mean = rows(lambda r: r.batch_means.m2) / (r0.batch_means.count - 1)
    v_var = rows(lambda r: r.batch_vars.m2) / (r0.batch_vars.count - 1)
    sd_mean = (v_mean / k + F.ema_jitter_var(v_mean, a0.momentum, nbt)).sqrt()
    sd_log_var = (v_var / k + F.ema_jitter_var(v_var, a0.momentum, nbt)).sqrt() / (var + eps)
    size = log_var.abs()
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
    kk = _batches(r0)
    out = []
    for i, (shift_max, shift_median, log_var_max, log_var_median) in enumerate(floats):
        fraction = p = NAN
        if finite[i]:
            fraction = off[i] / c
            p = noise_p(off[i], c, kk, t.stale_z)
        out.append(
            Drift(
                shift_max=shift_max,
                shift_median=shift_median,
                log_var_max=log_var_max,
                log_var_median=log_var_median,
                fraction=fraction,
                p=p,
                channel=channel[i],
                finite=finite[i],
            )
        )
    return out


def measure(
    a: LayerAttrs,
    s: LayerStats,
    t: Thresholds,
    *,
    nonfinite_inputs: int = 0,
    nonfinite_outputs: int = 0,
    synthetic: bool = False,
    train_diagnosis: Diagnosis | None = None,
    eval_diagnosis: Diagnosis | None = None,
    regime: str = "train",
    measured_at: str = "",
    figured: Figures | None = None,
) -> LayerMetrics:
    """All metrics of one layer.

    `regime` says which inputs the running stats should describe: "train" (a running average
    of train-mode batches, the default) or "eval" (a model recalibrated for deployment with
    `--regime eval`): staleness is then judged on the eval-mode input, and there is no gap.
    `figured`: the layer's `figures` (with the same `regime` and `synthetic`), when
    `figures_of` computed them with other layers'.
    """
    f = figured if figured is not None else figures(a, s, t, regime, synthetic)
    stale, gap = f.stale, f.gap
    n = s.train.min_n or s.eval.min_n
    bessel = F.bessel(n) if n else NAN
    nbt = a.num_batches_tracked or 0
    train_why = _explanation(train_diagnosis)
    eval_why = _explanation(eval_diagnosis)
    (
        recon_train_max_err,
        recon_train_ratio,
        recon_eval_max_err,
        recon_eval_ratio,
        update_mean_ratio,
        update_var_ratio,
        step_shift,
        step_log_var,
    ) = f.maxima
    return LayerMetrics(
        kind=a.kind.value,
        channels=a.num_features,
        eps=a.eps,
        momentum=a.momentum,
        affine=a.affine,
        track_running_stats=a.has_running_stats,
        num_batches_tracked=a.num_batches_tracked,
        dtype=str(a.dtype).removeprefix("torch."),
        buffer_dtype="" if a.buffer_dtype is None else str(a.buffer_dtype).removeprefix("torch."),
        nonfinite_values=f.nonfinite_values,
        negative_var_channels=f.negative_var_channels,
        zero_var_channels=f.zero_var_channels,
        initial_stats=f.initial_stats,
        max_amplification=f.max_amplification,
        calls=s.train.calls,
        values_per_channel=n,
        batch_size=s.train.min_batch,
        nonfinite_inputs=nonfinite_inputs,
        nonfinite_outputs=nonfinite_outputs,
        recon_train_max_err=recon_train_max_err,
        recon_train_ratio=recon_train_ratio,
        recon_eval_max_err=recon_eval_max_err,
        recon_eval_ratio=recon_eval_ratio,
        recon_train_explanation=train_why.label,
        recon_train_explanation_key=train_why.key,
        recon_train_explanation_err=train_why.max_err,
        recon_train_explanation_ratio=train_why.ratio,
        recon_eval_explanation=eval_why.label,
        recon_eval_explanation_key=eval_why.key,
        recon_eval_explanation_err=eval_why.max_err,
        recon_eval_explanation_ratio=eval_why.ratio,
        update_mean_ratio=update_mean_ratio,
        update_var_ratio=update_var_ratio,
        update_count_errors=s.update.count_errors,
        stale_shift_max=stale.shift_max,
        stale_shift_median=stale.shift_median,
        stale_log_var_max=stale.log_var_max,
        stale_log_var_median=stale.log_var_median,
        stale_fraction=stale.fraction,
        stale_p=stale.p,
        stale_channel=stale.channel,
        stale_judged=f.stale_judged,
        gap_shift_max=gap.shift_max,
        gap_log_var_max=gap.log_var_max,
        gap_fraction=gap.fraction,
        gap_p=gap.p,
        gap_channel=gap.channel,
        gap_judged=f.gap_judged,
        bessel_factor=bessel,
        var_ratio_observed=f.observed,
        eval_scale=1 / math.sqrt(bessel) if n > 1 else NAN,
        # An unknown momentum (a bare state dict) leaves the momentum figures unmeasured.
        init_weight=(
            F.init_weight(a.momentum, nbt)
            if a.has_running_stats and a.num_batches_tracked is not None and a.momentum_known
            else NAN
        ),
        ema_window=F.ema_window(a.momentum, nbt) if a.momentum_known else NAN,
        ema_jitter=f.jitter,
        step_shift=step_shift,
        step_log_var=step_log_var,
        counter_problem=a.counter_problem,
        measured_at=measured_at,
    )


def _batches(r: RegimeStats) -> int:
    """K: batches behind both between-batch variances (the mean's and the variance's)."""
    return int(min(r.batch_means.count, r.batch_vars.count))


def _explanation(d: Diagnosis | None) -> Explanation:
    best = d.best() if d is not None else None
    return best if best is not None else Explanation("", "", NAN, NAN)


def _tracked(t: MaxTracker) -> float:
    return NAN if t.value is None else _max(t.value)


def _max(t: Tensor) -> float:
    """Largest element, NaN if any element is NaN (a NaN must stay visible)."""
    return float(t.max()) if t.numel() else NAN


def _count(t: Tensor | None, predicate) -> int:
    return 0 if t is None else int(predicate(t).sum())


def _count_nonfinite(a: LayerAttrs) -> int:
    tensors = [t for t in (a.weight, a.bias, a.running_mean, a.running_var) if t is not None]
    if _all_finite(*tensors):
        return 0
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors)


def _all_finite(*tensors: Tensor) -> bool:
    """No NaN or Inf anywhere. A sum is finite exactly then, unless it overflows: only then is
    each value checked (isfinite costs several operations, a sum one)."""
    total = float(torch.stack([t.sum() for t in tensors]).sum()) if tensors else 0.0
    return math.isfinite(total) or all(bool(torch.isfinite(t).all()) for t in tensors)


def _initial(a: LayerAttrs) -> bool:
    if a.running_mean is None or a.running_var is None:
        return False
    return bool((a.running_mean == 0).all() and (a.running_var == 1).all())
