"""From a layer's attributes and accumulators to its `LayerMetrics`.

Staleness compares the running stats with what their EMA estimates on the sample data: the mean
over batches of the batch means and of the unbiased batch variances. A channel counts as off only
when the difference is practically large *and* larger than the finite sample (K batches) and the
EMA jitter (BN-NOTES "Momentum") explain: var(μ − μ_r) ≈ v/K + v·m/(2 − m), with v the variance
of the batch means between batches. v itself comes from K batches, so how often a healthy
channel is off follows Student's t, and the layer verdict asks whether the count of off channels
is more than that noise gives (`bnaudit.significance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bnaudit import formulas as F
from bnaudit import significance as S
from bnaudit.explain import Diagnosis, Explanation
from bnaudit.findings import JUDGED, Thresholds
from bnaudit.layers import Kind, LayerAttrs
from bnaudit.results import LayerMetrics
from bnaudit.statistics import LayerStats, MaxTracker, RegimeStats

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


def judged(r: RegimeStats, a: LayerAttrs, d: Drift, t: Thresholds, synthetic: bool) -> str:
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
    if k >= 2 and not S.judgeable(c, k, t.stale_z, t.stale_alpha):
        # Even every channel off would be likely noise: say how many batches would do.
        least = S.fewest_batches(c, t.stale_z, t.stale_alpha)
        needs = f", needs K >= {least}" if least is not None else f" at stale_z {t.stale_z:g}"
        return f"no: too few batches (K={k}) for {c} channel{'s' * (c != 1)}{needs}"
    if not d.finite:
        return "no: non-finite input statistics"
    if math.isnan(d.fraction):
        return "no: sample noise not measurable"
    return JUDGED


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
) -> LayerMetrics:
    """All metrics of one layer.

    `regime` says which inputs the running stats should describe: "train" (a running average
    of train-mode batches, the default) or "eval" (a model recalibrated for deployment with
    `--regime eval`): staleness is then judged on the eval-mode input, and there is no gap.
    """
    described = s.eval if regime == "eval" else s.train
    stale = drift(described, a, t)
    gap = drift(s.eval, a, t) if regime == "train" else Drift()
    n = s.train.min_n or s.eval.min_n
    bessel = F.bessel(n) if n else NAN
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
    train_why = _explanation(train_diagnosis)
    eval_why = _explanation(eval_diagnosis)
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
        nonfinite_values=_count_nonfinite(a),
        negative_var_channels=_count(a.running_var, lambda v: v < 0),
        zero_var_channels=_count(a.running_var, lambda v: v == 0),
        initial_stats=_initial(a),
        max_amplification=(
            _max(F.amplification(a.weight, a.running_var, a.eps))
            if a.running_var is not None
            else NAN
        ),
        calls=s.train.calls,
        values_per_channel=n,
        batch_size=s.train.min_batch,
        nonfinite_inputs=nonfinite_inputs,
        nonfinite_outputs=nonfinite_outputs,
        recon_train_max_err=_tracked(s.train.err_abs),
        recon_train_ratio=_tracked(s.train.err_ratio),
        recon_eval_max_err=_tracked(s.eval.err_abs),
        recon_eval_ratio=_tracked(s.eval.err_ratio),
        recon_train_explanation=train_why.label,
        recon_train_explanation_key=train_why.key,
        recon_train_explanation_err=train_why.max_err,
        recon_train_explanation_ratio=train_why.ratio,
        recon_eval_explanation=eval_why.label,
        recon_eval_explanation_key=eval_why.key,
        recon_eval_explanation_err=eval_why.max_err,
        recon_eval_explanation_ratio=eval_why.ratio,
        update_mean_ratio=_tracked(s.update.mean_ratio),
        update_var_ratio=_tracked(s.update.var_ratio),
        update_count_errors=s.update.count_errors,
        stale_shift_max=stale.shift_max,
        stale_shift_median=stale.shift_median,
        stale_log_var_max=stale.log_var_max,
        stale_log_var_median=stale.log_var_median,
        stale_fraction=stale.fraction,
        stale_p=stale.p,
        stale_channel=stale.channel,
        stale_judged=judged(described, a, stale, t, synthetic),
        gap_shift_max=gap.shift_max,
        gap_log_var_max=gap.log_var_max,
        gap_fraction=gap.fraction,
        gap_p=gap.p,
        gap_channel=gap.channel,
        gap_judged=judged(s.eval, a, gap, t, synthetic)
        if regime == "train"
        else "n/a: regime eval",
        bessel_factor=bessel,
        var_ratio_observed=observed,
        eval_scale=1 / math.sqrt(bessel) if n > 1 else NAN,
        # An unknown momentum (a bare state dict) leaves the momentum figures unmeasured.
        init_weight=(
            F.init_weight(a.momentum, nbt)
            if a.has_running_stats and a.num_batches_tracked is not None and a.momentum_known
            else NAN
        ),
        ema_window=F.ema_window(a.momentum, nbt) if a.momentum_known else NAN,
        ema_jitter=jitter,
        step_shift=_tracked(s.update.mean_step),
        step_log_var=_tracked(s.update.var_step),
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
