"""The engine's fast paths give the numbers of the straightforward float64 computation.

`blocked.batch_moments` and `blocked.reconstruction_error` stream float64 blocks instead of a
float64 copy of the whole activation; small layers are measured side by side in groups
(`bnaudit.measure.grouped`). Each is checked against what it replaces: `batch_stats`, `normalize`,
`mismatch` and `elementwise_tolerance` on float64 copies, and the audit one layer at a time.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import bnaudit
from bnaudit.core import blocked
from bnaudit.core import formulas as F
from bnaudit.measure import grouped, probe
from bnaudit.measure.statistics import LayerStats
from bnaudit.report.audit_report import AuditReport
from tests import nets
from tests.test_variants import FrozenBatchNorm2d

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)
U64 = 2.0**-53  # float64 unit roundoff


@contextlib.contextmanager
def blocks_of(values: int, short_inner: int) -> Iterator[None]:
    """Force block sizes and layouts (module constants read at each call)."""
    before = blocked.CHUNK_VALUES, blocked.SHORT_INNER
    blocked.CHUNK_VALUES, blocked.SHORT_INNER = values, short_inner
    try:
        yield
    finally:
        blocked.CHUNK_VALUES, blocked.SHORT_INNER = before


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    channels_last: bool
    dtype: torch.dtype
    offset: float
    block: int
    short_inner: int
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    spatial = draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 7)), *spatial)
    return Case(
        shape=shape,
        channels_last=len(shape) == 4 and draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        offset=draw(st.sampled_from([0.0, 3.0, 1e3])),
        block=draw(st.sampled_from([1, 3, 17, 1 << 16])),  # many blocks, or one
        short_inner=draw(st.sampled_from([1, 4, 1 << 16])),  # both layouts
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make(case: Case) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x, an output y near the BN formula, and per-channel mean, var, weight, bias."""
    gen = torch.Generator().manual_seed(case.seed)
    c = case.shape[1]
    view = (1, c, *([1] * (len(case.shape) - 2)))
    x64 = torch.randn(case.shape, generator=gen, dtype=torch.float64) * 2 + case.offset
    x64 = x64 + torch.randn(view, generator=gen, dtype=torch.float64)
    x = x64.to(case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = torch.randn(c, generator=gen, dtype=torch.float64) + case.offset
    var = torch.rand(c, generator=gen, dtype=torch.float64) * 3 + 0.1
    weight = torch.randn(c, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    ref = F.normalize(x.double(), mean, var, weight, bias, 1e-5)
    noise = torch.randn(case.shape, generator=gen, dtype=torch.float64) * 1e-6
    return x, (ref + noise).to(case.dtype), mean, var, weight, bias


@SETTINGS
@given(case=cases())
def test_batch_moments_are_the_float64_batch_stats(case: Case) -> None:
    x = make(case)[0]
    with blocks_of(case.block, case.short_inner):
        mean, var = blocked.batch_moments(x)
    want_mean, want_var = F.batch_stats(x.double())
    assert mean.dtype == var.dtype == torch.float64
    scale = float(x.double().abs().max())
    torch.testing.assert_close(mean, want_mean, rtol=1e-13, atol=1e-13 * scale)
    torch.testing.assert_close(var, want_var, rtol=1e-11, atol=1e-13 * scale**2)


@SETTINGS
@given(case=cases())
def test_reconstruction_error_is_the_float64_measurement(case: Case) -> None:
    x, y, mean, var, weight, bias = make(case)
    # Half the cases with the allowance for statistics summed in order (`stat_rounding`).
    n, u = F.values_per_channel(x), 2.0**-24 * (case.seed % 2)
    rounding = F.stat_rounding(n, mean, var, u) if u else None
    with blocks_of(case.block, case.short_inner):
        err, ratio = blocked.reconstruction_error(
            x, y, mean, var, weight, bias, 1e-5, y.dtype, rounding
        )
    x64, y64 = x.double(), y.double()
    ref = F.normalize(x64, mean, var, weight, bias, 1e-5)
    want = F.mismatch(y64, ref)
    tol = F.elementwise_tolerance(x64, ref, mean, var, weight, 1e-5, y.dtype, rounding)
    dims = F.stat_dims(x64)
    # The two orders of operations differ by a few float64 roundings of the terms' size...
    s = (weight / (var + 1e-5).sqrt()).abs()
    size = F.channel_view(s, x.dim()) * (x64.abs() + F.channel_view(mean.abs(), x.dim()))
    bound = 8 * U64 * (size + F.channel_view(bias.abs(), x.dim()))
    assert bool(((err - want.amax(dims)).abs() <= bound.amax(dims)).all())
    # ...which the tolerance (≥ rtol·size, rtol ≥ 1e-7) makes a few 1e-8 of it at most.
    relative = (bound / tol).amax(dims)
    want_ratio = (want / tol).amax(dims)
    assert bool(((ratio - want_ratio).abs() <= relative + 1e-14 * want_ratio).all())
    assert float(relative.max()) < (2e-8 if y.dtype == torch.float64 else 2e-9)


def test_reconstruction_error_keeps_nan_and_inf_visible() -> None:
    x = torch.randn(4, 3, 5)
    y = x.clone()
    y[1, 2, 3] = math.nan
    y[2, 0, 0] = math.inf
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    with blocks_of(7, 1 << 16):  # the NaN and the Inf fall in different blocks
        err, ratio = blocked.reconstruction_error(x, y, zeros, ones, None, None, 0.0, x.dtype)
    assert math.isinf(float(err[0])) and math.isnan(float(err[2]))
    assert math.isnan(float(ratio[2])) and float(err[1]) < 1e-5


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_residuals_per_channel_factor_matches_the_scalar_one(momentum) -> None:
    gen = torch.Generator().manual_seed(3)
    old_mean, old_var = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.5
    mean, var = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.5
    got_mean, got_var = old_mean + 0.01, old_var * 1.01
    factor = F.update_factor(momentum, 7)
    args = (old_mean.double(), old_var.double(), mean.double(), var.double(), 16)
    scalar = F.update_residuals(
        *args, factor, got_mean.double(), got_var.double(), 1e-5, torch.float32
    )
    vector = F.update_residuals(
        *args,
        torch.full((5,), factor, dtype=torch.float64),
        got_mean.double(),
        got_var.double(),
        torch.full((5,), 1e-5, dtype=torch.float64),
        torch.float32,
    )
    exp_mean, exp_var, _ = F.running_update(*args, momentum, 7)
    rtol, atol = F.tolerance(torch.float32)
    second = var.double() + mean.double() ** 2
    want = (got_mean.double() - exp_mean).abs() / (
        atol + rtol * (exp_mean.abs() + factor * second.sqrt())
    )
    for a, b in zip(scalar, vector, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    torch.testing.assert_close(scalar[0], want, rtol=1e-12, atol=0)
    assert exp_var.shape == scalar[1].shape


def test_layer_stats_split_by_channels_equals_stats_fed_per_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    side_by_side, first, second = LayerStats(), LayerStats(), LayerStats()
    for _ in range(4):
        x = torch.randn(8, 5, 3, generator=gen, dtype=torch.float64)
        mean, var = x.mean((0, 2)), x.var((0, 2), correction=0)
        side_by_side.train.add_batch(24, 8, mean, var)
        side_by_side.train.err_ratio.add(var)
        side_by_side.update.add(mean, var, mean.abs(), var)
        for part, sl in ((first, slice(0, 2)), (second, slice(2, 5))):
            part.train.add_batch(24, 8, mean[sl], var[sl])
            part.train.err_ratio.add(var[sl])
            part.update.add(mean[sl], var[sl], mean[sl].abs(), var[sl])
    for part, sl in ((first, slice(0, 2)), (second, slice(2, 5))):
        split = LayerStats()
        split.merge(side_by_side.channels(sl))
        for name in ("batch_means", "batch_vars", "biased_vars", "population"):
            got, want = getattr(split.train, name), getattr(part.train, name)
            assert got.count == want.count
            torch.testing.assert_close(got.mean, want.mean, rtol=1e-15, atol=0)
            torch.testing.assert_close(got.m2, want.m2, rtol=1e-15, atol=0)
        assert torch.equal(split.train.err_ratio.value, part.train.err_ratio.value)
        assert torch.equal(split.update.var_step.value, part.update.var_step.value)
        assert (split.train.calls, split.train.min_n) == (part.train.calls, part.train.min_n)
        assert split.eval.err_abs.value is None  # nothing seen in eval mode


# --- the audit: grouped against one layer at a time, fast against general --------------------


def assert_same_report(got: AuditReport, want: AuditReport) -> None:
    """Same findings; metrics equal up to float64 rounding (2e-8 of a tolerance, for ratios)."""
    assert [r.name for r in got.layers] == [r.name for r in want.layers]
    for g, w in zip(got.layers, want.layers, strict=True):
        assert [(f.code, f.severity) for f in g.findings] == [
            (f.code, f.severity) for f in w.findings
        ], g.name
        flat = g.metrics.flat()
        for field, b in w.metrics.flat().items():
            a = flat[field]
            if isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
                near = 2e-8 if field.endswith("_ratio") else 1e-12
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=near), (g.name, field, a, b)
            elif not isinstance(b, float):
                assert a == b, (g.name, field, a, b)
    assert got.notes == want.notes


@contextlib.contextmanager
def grouping(small: int, pending: int = grouped.PENDING_VALUES) -> Iterator[None]:
    before = grouped.SMALL_VALUES, grouped.PENDING_VALUES
    grouped.SMALL_VALUES, grouped.PENDING_VALUES = small, pending
    try:
        yield
    finally:
        grouped.SMALL_VALUES, grouped.PENDING_VALUES = before


class Mixed(nn.Module):
    """Small BN layers of every configuration the groups handle, one called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(20, 24)
        self.plain = nn.BatchNorm1d(24)
        self.bare = nn.BatchNorm1d(24, affine=False, eps=1e-3)
        self.cumulative = nn.BatchNorm1d(24, momentum=None)
        self.untracked = nn.BatchNorm1d(24, track_running_stats=False)
        self.narrow = nn.Linear(24, 8)
        self.shared = nn.BatchNorm1d(8, momentum=0.3)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.frozen = FrozenBatchNorm2d(6)
        self.bn2d = nn.BatchNorm2d(6)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.plain(self.fc(x)))
        h = self.untracked(self.cumulative(self.bare(h)))
        z = self.shared(self.narrow(h))
        z = self.shared(z * 2 + 1)  # the same module twice in one forward
        img = self.conv(h[:, :16].reshape(-1, 1, 4, 4))
        return z.sum(1) + self.bn2d(self.frozen(img)).mean((1, 2, 3))


def mixed_model() -> nn.Module:
    torch.manual_seed(0)
    model = Mixed()
    nets.calibrate(model, nets.mlp_data(40 * 16, seed=1), 16)
    with torch.no_grad():
        model.frozen.running_mean.copy_(torch.linspace(-1, 1, 6))
        model.frozen.weight.copy_(torch.linspace(0.5, 2, 6))
    return model.eval()


def mixed_batches(count: int = 4) -> list[Tensor]:
    return list(torch.split(nets.mlp_data(16 * count, seed=5), 16))


@pytest.mark.parametrize("pending", [grouped.PENDING_VALUES, 1])
def test_grouped_small_layers_measure_as_one_layer_at_a_time(pending: int) -> None:
    model = mixed_model()
    with grouping(0):
        alone = bnaudit.audit(model, mixed_batches())
    with grouping(grouped.SMALL_VALUES, pending):  # pending=1: a group after every call
        together = bnaudit.audit(model, mixed_batches())
    assert_same_report(together, alone)
    assert together.layer("shared").metrics.seen.calls == 2 * 4  # twice per forward
    assert together.layer("shared").metrics.update.count_errors == 0


def test_grouped_layers_fall_back_to_one_at_a_time_on_nan_and_mismatch() -> None:
    model = mixed_model()
    model.cumulative.running_var[3] = math.nan  # eval outputs of this layer and after: NaN
    batches = mixed_batches()
    batches[1] = batches[1].clone()
    batches[1][2, 5] = math.inf
    with grouping(0):
        alone = bnaudit.audit(model, batches)
    together = bnaudit.audit(model, batches)
    assert_same_report(together, alone)
    assert together.layer("plain").metrics.seen.nonfinite_inputs > 0  # the Inf, through fc
    assert together.layer("bare").metrics.seen.nonfinite_inputs > 0
    assert "nonfinite" in {f.code for f in together.layer("cumulative").findings}


def test_fast_path_measures_as_the_general_path() -> None:
    model = nets.healthy_mlp()
    wide = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    wide[1].momentum = None
    nets.calibrate(wide, nets.make_images(64, seed=1), 16)
    images = list(torch.split(nets.make_images(48, seed=2), 16))
    cases = [(model, list(torch.split(nets.mlp_data(32 * 4, seed=3), 32))), (wide.eval(), images)]
    for m, batches in cases:
        fast = bnaudit.audit(m, batches)
        with grouping(0), general_only():
            general = bnaudit.audit(m, batches)
        assert_same_report(fast, general)


@contextlib.contextmanager
def general_only() -> Iterator[None]:
    before = probe.Probe._measure_prepared
    probe.Probe._measure_prepared = lambda self, *args: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        probe.Probe._measure_prepared = before  # type: ignore[method-assign]


def test_grouped_copies_are_bounded_and_released() -> None:
    model = copy.deepcopy(nets.healthy_mlp())
    seen: list[grouped.Deferred] = []
    peak = 0
    add = grouped.Deferred.add

    def spy(self: grouped.Deferred, *args) -> None:
        nonlocal peak
        add(self, *args)
        peak = max(peak, self.values)
        if self not in seen:
            seen.append(self)

    limit = 5000  # values of copies: 32 × 32 activations, so a flush every 3 calls
    with grouping(grouped.SMALL_VALUES, limit), contextlib.ExitStack() as stack:
        grouped.Deferred.add = spy  # type: ignore[method-assign]
        stack.callback(setattr, grouped.Deferred, "add", add)
        bnaudit.audit(model, list(torch.split(nets.mlp_data(32 * 3, seed=3), 32)))
    (deferred,) = seen
    assert 0 < peak <= limit
    assert deferred.calls == [] and deferred.values == 0 and deferred.groups == {}
