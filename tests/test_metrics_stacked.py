"""`metrics.figures_of` measures layers of one width and the same Python scalars as [L, C]
stacks. Every figure, every `LayerMetrics` field and every finding must be the same bits as the
per-layer formulation it replaced, kept here as `reference_measure`: on stacks of random layers
(widths, NaN/Inf, zero and negative variances, momentum None or not) and on whole audits of
varied models (BatchNorm1d/2d/3d, stale and non-finite statistics, affine=False, momentum None,
track_running_stats=False, a FrozenBatchNorm-style layer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import bnaudit.check.audit as engine
from bnaudit.check.audit import AuditOptions, audit
from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerAttrs
from bnaudit.measure.explain import Diagnosis
from bnaudit.measure.passes import run_passes
from bnaudit.measure.statistics import LayerStats, MaxTracker, Moments, RegimeStats
from bnaudit.report.audit_report import AuditReport
from bnaudit.verdict import figures as stacking
from bnaudit.verdict.findings import Thresholds
from bnaudit.verdict.metrics import (
    NAN,
    Drift,
    _explanation,
    drift,
    figures,
    figures_of,
    judged,
    measure,
)
from bnaudit.verdict.results import LayerMetrics
from tests.reports import single_thread
from tests.test_metrics_exact import SPECIAL


def reference_measure(
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
    """`metrics.measure` as it was before `figures_of`: every tensor operation per layer."""
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
    return LayerMetrics.from_flat(
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


def _tracked(t: MaxTracker) -> float:
    return NAN if t.value is None else _max(t.value)


def _max(t: Tensor) -> float:
    """Largest element, NaN if any element is NaN (a NaN must stay visible)."""
    return float(t.max()) if t.numel() else NAN


def _count(t: Tensor | None, predicate) -> int:  # type: ignore[no-untyped-def]
    return 0 if t is None else int(predicate(t).sum())


def _count_nonfinite(a: LayerAttrs) -> int:
    tensors = [t for t in (a.weight, a.bias, a.running_mean, a.running_var) if t is not None]
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors)


def _initial(a: LayerAttrs) -> bool:
    if a.running_mean is None or a.running_var is None:
        return False
    return bool((a.running_mean == 0).all() and (a.running_var == 1).all())


def same_bits(x: Any, y: Any) -> bool:
    """Equal as bits, recursively: NaN equals NaN, 0.0 is not -0.0, an int is not a float."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return type(x) is type(y) and all(
            same_bits(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x)
        )
    if isinstance(x, tuple | list):
        return type(x) is type(y) and len(x) == len(y) and all(map(same_bits, x, y))
    if isinstance(x, float) and isinstance(y, float):
        if math.isnan(x) or math.isnan(y):
            return math.isnan(x) and math.isnan(y)
        return x == y and math.copysign(1, x) == math.copysign(1, y)
    return type(x) is type(y) and x == y


def differing(x: Any, y: Any) -> dict[str, tuple[Any, Any]]:
    return {
        f.name: (getattr(x, f.name), getattr(y, f.name))
        for f in dataclasses.fields(x)
        if not same_bits(getattr(x, f.name), getattr(y, f.name))
    }


# --- stacks of random layers ---------------------------------------------------------------


@st.composite
def stacks(draw: st.DrawFn) -> list[tuple[LayerAttrs, LayerStats]]:
    """Layers that mostly share a stacking key (width, counts, eps, momentum, T), with random
    values and special ones (NaN, ±inf, 0, -0, negative, tiny, huge) here and there."""
    c = draw(st.sampled_from([1, 2, 3, 7, 8, 64, 65, 257]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    counts = [float(draw(st.sampled_from([2, 3, 8, 200]))) for _ in range(6)]
    momentum = draw(st.sampled_from([None, 0.1, 0.01, 0.9]))
    nbt = draw(st.sampled_from([0, 3, 1000]))
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    affine = draw(st.booleans())
    min_n = draw(st.sampled_from([1, 4, 64]))
    specials = draw(st.sampled_from([0.0, 0.05, 0.3]))

    def vec(positive: bool = False) -> Tensor:
        v = torch.randn(c, generator=gen, dtype=torch.float64)
        v = v.abs() if positive else v
        if float(torch.rand(1, generator=gen)) < specials:
            i = int(torch.randint(c, (1,), generator=gen))
            v[i] = SPECIAL[int(torch.randint(len(SPECIAL), (1,), generator=gen))]
        return v

    def layer(odd: bool) -> tuple[LayerAttrs, LayerStats]:
        mine = [float(draw(st.sampled_from([1, 2, 8]))) for _ in counts] if odd else counts
        regimes = []
        for j in range(2):
            r = RegimeStats(
                batch_means=Moments(mine[3 * j], vec(), vec(positive=True)),
                batch_vars=Moments(mine[3 * j + 1], vec(positive=True), vec(positive=True)),
                biased_vars=Moments(mine[3 * j + 2], vec(positive=True), vec(positive=True)),
            )
            r.err_abs, r.err_ratio = MaxTracker(vec(positive=True)), MaxTracker(vec(True))
            r.calls, r.min_n, r.min_batch = 8, min_n, 64
            regimes.append(r)
        s = LayerStats(*regimes)
        s.update.mean_ratio, s.update.var_step = MaxTracker(vec(True)), MaxTracker(vec(True))
        state = {"running_mean": vec(), "running_var": vec(positive=draw(st.booleans()))}
        if affine:
            state |= {"weight": vec(), "bias": vec()}
        state["num_batches_tracked"] = torch.tensor(nbt)
        if draw(st.integers(0, 5)) == 0:  # a layer at its initial statistics
            state["running_mean"], state["running_var"] = torch.zeros(c), torch.ones(c)
            state["running_mean"] = state["running_mean"].double()
            state["running_var"] = state["running_var"].double()
        a = dataclasses.replace(LayerAttrs.from_state(state), momentum=momentum, eps=eps)
        return a, s

    size = draw(st.integers(1, 6))
    return [layer(odd=draw(st.integers(0, 4)) == 0) for _ in range(size)]


@settings(max_examples=150, deadline=None)
@given(stacks(), st.sampled_from(["train", "eval"]), st.booleans())
def test_stacked_figures_and_metrics_are_the_per_layer_ones_bit_for_bit(
    layers: list[tuple[LayerAttrs, LayerStats]], regime: str, synthetic: bool
) -> None:
    t = Thresholds()
    stacked = figures_of(layers, t, regime, synthetic)
    for (a, s), f in zip(layers, stacked, strict=True):
        alone = figures(a, s, t, regime, synthetic)
        assert same_bits(f, alone), differing(f, alone)
        got = measure(a, s, t, regime=regime, synthetic=synthetic, figured=f)
        want = reference_measure(a, s, t, regime=regime, synthetic=synthetic)
        assert differing(got, want) == {}


def test_layers_alike_are_stacked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers that share a key are stacked together; a layer unlike them is a stack of one."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.BatchNorm1d(16) for _ in range(5)], nn.Linear(16, 4))
    model.append(nn.BatchNorm1d(4))
    batches = [torch.randn(32, 16) for _ in range(4)]
    with single_thread():
        passes = run_passes(model, batches, AuditOptions(impact=False, fold=False))
    stacked: list[int] = []
    real = stacking._stacked

    def spy(layers, *args):  # type: ignore[no-untyped-def]
        stacked.append(len(layers))
        return real(layers, *args)

    monkeypatch.setattr(stacking, "_stacked", spy)
    got = figures_of([(p.attrs, p.stats) for p in passes.probes], Thresholds())
    assert sorted(stacked) == [1, 5]  # the five alike together; the 4-channel layer alone
    assert len(got) == 6


# --- whole audits ------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """Like torchvision's: buffers only, the eval formula in every mode, no counter."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def mlp() -> tuple[nn.Module, list[Tensor]]:
    """BatchNorm1d: three alike, one narrower, momentum None, affine=False, no running stats."""
    blocks: list[nn.Module] = []
    for width, kw in [(8, {}), (8, {}), (8, {}), (5, {}), (8, {"momentum": None})]:
        blocks += [nn.LazyLinear(width), nn.BatchNorm1d(width, **kw), nn.ReLU()]
    blocks += [nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU()]
    blocks += [nn.Linear(8, 8), nn.BatchNorm1d(8, track_running_stats=False)]
    return nn.Sequential(*blocks), [torch.randn(16, 6) + 1 for _ in range(5)]


def cnn2d() -> tuple[nn.Module, list[Tensor]]:
    layers: list[nn.Module] = []
    for cin, cout in [(3, 6), (6, 6), (6, 6)]:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    layers += [nn.Conv2d(6, 4, 1), FrozenBatchNorm2d(4)]
    return nn.Sequential(*layers), [torch.randn(4, 3, 8, 8) for _ in range(4)]


def cnn3d() -> tuple[nn.Module, list[Tensor]]:
    layers: list[nn.Module] = []
    for cin, cout in [(2, 4), (4, 4), (4, 4)]:
        layers += [nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU()]
    return nn.Sequential(*layers), [torch.randn(2, 2, 4, 6, 6) for _ in range(4)]


def prepared(build) -> tuple[nn.Module, list[Tensor]]:  # type: ignore[no-untyped-def]
    """Calibrated, then some statistics made stale, infinite or NaN."""
    torch.manual_seed(0)
    model, batches = build()
    model(batches[0])  # materialises the lazy layers
    model.train()
    with torch.no_grad():
        for _ in range(3):
            for x in batches:
                model(x)
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        bns[0].running_mean += 3.0  # stale
        bns[1].running_var *= 4.0  # stale in variance
        if len(bns) > 3:
            bns[3].running_var[0] = math.nan
            bns[2].running_mean[1] = math.inf
    return model, batches


def reports(
    build, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> tuple[AuditReport, AuditReport]:  # type: ignore[no-untyped-def]
    """The audit with `figures_of`, then with `reference_measure` in its place."""
    model, batches = prepared(build)
    with single_thread():
        fast = audit(model, batches, **options)
        with monkeypatch.context() as patch:
            patch.setattr(
                engine, "measure", lambda *a, figured=None, **k: reference_measure(*a, **k)
            )
            slow = audit(model, batches, **options)
    return fast, slow


@pytest.mark.parametrize("build", [mlp, cnn2d, cnn3d])
@pytest.mark.parametrize("regime", ["train", "eval"])
def test_audits_are_the_reference_bit_for_bit(  # type: ignore[no-untyped-def]
    build, regime: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, slow = reports(build, monkeypatch, regime=regime, impact=False)
    assert [r.name for r in fast.layers] == [r.name for r in slow.layers]
    for got, want in zip(fast.layers, slow.layers, strict=True):
        assert differing(got.metrics, want.metrics) == {}, got.name
        assert got.findings == want.findings, got.name
    assert fast.notes == slow.notes
    assert same_bits(fast.verdict, slow.verdict)
    # The planted defects are there to be compared: the audit did see them.
    assert any(r.metrics.train.drift.fraction > 0 for r in fast.layers)


def test_audit_with_impact_and_attribution_is_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast, slow = reports(mlp, monkeypatch, attribution=True)
    for got, want in zip(fast.layers, slow.layers, strict=True):
        assert differing(got.metrics, want.metrics) == {}, got.name
        assert got.findings == want.findings
    assert fast.model_findings == slow.model_findings
    assert fast.impact is not None and fast.impact.per_layer  # the flagged layers were swapped


def test_synthetic_audit_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = reports(cnn2d, monkeypatch, synthetic_data=True, impact=False)
    for got, want in zip(fast.layers, slow.layers, strict=True):
        assert differing(got.metrics, want.metrics) == {}, got.name
        assert got.findings == want.findings


@pytest.mark.parametrize("op", ["log", "sqrt", "exp", "rsqrt"])
def test_float64_transcendentals_do_not_depend_on_the_position(op: str) -> None:
    """What stacking rests on: each element gets the same bits alone (a 0-d tensor), in a
    short vector (the scalar tail of a vectorised loop) and anywhere in a long one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4099, generator=gen, dtype=torch.float64) * 20 - 10
    x = x.abs() if op != "exp" else x
    f = getattr(torch, op)
    whole = f(x)
    for size in (1, 3, 7, 64, 65):
        parts = torch.cat([f(p.clone()) for p in x[:1300].split(size)])
        assert torch.equal(parts.view(torch.int64), whole[:1300].view(torch.int64)), size
    alone = torch.stack([f(v.clone()) for v in x[:300]])
    assert torch.equal(alone.view(torch.int64), whole[:300].view(torch.int64))
