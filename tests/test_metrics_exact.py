"""`metrics.drift` runs its comparisons and reductions on Python floats (one copy out of torch
per layer, instead of ~30 tensor operations of ~5 µs dispatch each): every figure must be the
same bits as the torch formulation it replaced, kept here as the reference, on many layers
(widths, NaN/Inf, zero and negative variances, momentum None or not, one batch or many).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerAttrs
from bnaudit.measure.statistics import LayerStats, MaxTracker, Moments, RegimeStats
from bnaudit.verdict import significance as S
from bnaudit.verdict.findings import Thresholds
from bnaudit.verdict.metrics import Drift, drift, measure


def reference_drift(r: RegimeStats, a: LayerAttrs, t: Thresholds) -> Drift:
    """The torch formulation of `metrics.drift` before it moved to numpy."""
    if not a.has_running_stats or r.batch_means.mean is None or r.batch_vars.mean is None:
        return Drift()
    assert a.running_mean is not None and a.running_var is not None
    k = r.batch_means.count
    run_var = a.running_var.clamp_min(0) + a.eps
    diff = (r.batch_means.mean - a.running_mean).abs()
    shift = diff / run_var.sqrt()
    var = r.batch_vars.mean
    log_var = ((var + a.eps) / run_var).log()
    finite = bool(torch.isfinite(shift).all() and torch.isfinite(log_var).all())
    fraction = p = math.nan
    v_mean, v_var = r.batch_means.variance(), r.batch_vars.variance()
    if finite and v_mean is not None and v_var is not None:
        nbt = a.num_batches_tracked or 0
        sd_mean = (v_mean / k + F.ema_jitter_var(v_mean, a.momentum, nbt)).sqrt()
        sd_log_var = (v_var / k + F.ema_jitter_var(v_var, a.momentum, nbt)).sqrt() / (var + a.eps)
        off_mean = (shift > t.stale_shift) & (diff > t.stale_z * sd_mean)
        off_var = (log_var.abs() > t.stale_log_var) & (log_var.abs() > t.stale_z * sd_log_var)
        off = int((off_mean | off_var).sum())
        fraction = off / a.num_features
        k_both = int(min(r.batch_means.count, r.batch_vars.count))
        p = S.noise_p(off, a.num_features, k_both, t.stale_z)
    badness = torch.maximum(shift / t.stale_shift, log_var.abs() / t.stale_log_var)
    return Drift(
        shift_max=float(shift.max()),
        shift_median=float(shift.median()),
        log_var_max=float(log_var[int(log_var.abs().nan_to_num(math.inf).argmax())]),
        log_var_median=float(log_var.median()),
        fraction=fraction,
        p=p,
        channel=int(torch.nan_to_num(badness, nan=math.inf).argmax()),
        finite=finite,
    )


def differences(x: object, y: object) -> dict[str, tuple[object, object]]:
    """The fields that differ as bits (NaN equals NaN; 0.0 is not -0.0)."""
    dx, dy = dataclasses.asdict(x), dataclasses.asdict(y)  # type: ignore[call-overload]
    return {k: (dx[k], dy[k]) for k in dx if not _same(dx[k], dy[k])}


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-300, 1e300]


@st.composite
def layers(draw: st.DrawFn) -> tuple[LayerAttrs, LayerStats]:
    c = draw(st.sampled_from([1, 2, 3, 7, 8, 64, 65, 257]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def vec(scale: float = 1.0, positive: bool = False) -> Tensor:
        v = torch.randn(c, generator=gen, dtype=torch.float64) * scale
        v = v.abs() if positive else v
        if draw(st.booleans()) and draw(st.integers(0, 4)) == 0:  # a special value somewhere
            v[draw(st.integers(0, c - 1))] = draw(st.sampled_from(SPECIAL))
        return v

    def moments() -> Moments:
        return Moments(float(draw(st.sampled_from([1, 2, 8, 200]))), vec(), vec(positive=True))

    regimes = []
    for _ in range(2):
        r = RegimeStats(batch_means=moments(), batch_vars=moments(), biased_vars=moments())
        r.err_abs, r.err_ratio = MaxTracker(vec(positive=True)), MaxTracker(vec(positive=True))
        r.calls, r.min_n, r.min_batch = 8, draw(st.sampled_from([1, 4, 64])), 64
        regimes.append(r)
    stats = LayerStats()
    stats.train, stats.eval = regimes
    state = {
        "running_mean": vec(),
        "running_var": vec(positive=draw(st.booleans())),
        "weight": vec(),
        "bias": vec(),
        "num_batches_tracked": torch.tensor(draw(st.sampled_from([0, 3, 1000]))),
    }
    a = LayerAttrs.from_state(state)
    momentum = draw(st.sampled_from([None, 0.1, 0.01, 0.9]))
    return dataclasses.replace(a, momentum=momentum), stats


@settings(max_examples=300, deadline=None)
@given(layers())
def test_drift_is_the_torch_formulation_bit_for_bit(layer: tuple[LayerAttrs, LayerStats]) -> None:
    a, s = layer
    t = Thresholds()
    for r in (s.train, s.eval):
        assert differences(drift(r, a, t), reference_drift(r, a, t)) == {}


@settings(max_examples=100, deadline=None)
@given(layers())
def test_measure_figures_match_the_torch_reductions(layer: tuple[LayerAttrs, LayerStats]) -> None:
    a, s = layer
    m = measure(a, s, Thresholds())
    assert m.stored.nonfinite_values == sum(
        int((~torch.isfinite(v)).sum()) for v in (a.weight, a.bias, a.running_mean, a.running_var)
    )
    assert m.stored.negative_var_channels == int((a.running_var < 0).sum())
    assert m.stored.zero_var_channels == int((a.running_var == 0).sum())
    for got, tracker in (
        (m.train.recon.max_err, s.train.err_abs),
        (m.eval.recon.ratio, s.eval.err_ratio),
    ):
        want = float(tracker.value.max())
        assert got == want or (math.isnan(got) and math.isnan(want))
    v_mean = s.train.batch_means.variance()
    if v_mean is not None:
        run_sd = (a.running_var.clamp_min(0) + a.eps).sqrt()
        want = float(
            (
                F.ema_jitter_var(v_mean, a.momentum, a.num_batches_tracked or 0).sqrt() / run_sd
            ).median()
        )
        assert m.update.ema_jitter == want or (math.isnan(m.update.ema_jitter) and math.isnan(want))
