"""The pure BN formulas against torch's own modules, over many configurations (hypothesis).

The reference side is always the torch module; the formula side is evaluated in float64 on the
exact values the module holds (its float32 parameters and input upcast), so in float64 the two
agree to ~1e-12 and in float32 to the tolerances of `formulas.tolerance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import bnaudit
from bnaudit.core import formulas as F

# Fixed examples (derandomize) and no example database: the same cases on every run.
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None)

# BN class and number of spatial dims of its input.
KINDS: dict[str, tuple[type[nn.Module], int]] = {
    "BatchNorm1d[B,C]": (nn.BatchNorm1d, 0),
    "BatchNorm1d[B,C,L]": (nn.BatchNorm1d, 1),
    "BatchNorm2d": (nn.BatchNorm2d, 2),
    "BatchNorm3d": (nn.BatchNorm3d, 3),
}

FLOAT64_TOL = (1e-12, 1e-12)  # (rtol, atol): float64 formula vs float64 module
CHECKED_CODES = {"recon-train", "recon-eval", "running-update"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Hundreds of tiny forwards: intra-op threads cost far more than they save on them (the
    file runs ~10x slower with 2 threads on 2 cores). Put back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Config:
    kind: str
    batch: int
    channels: int
    spatial: tuple[int, ...]
    affine: bool
    track: bool
    momentum: float | None
    start_count: int  # num_batches_tracked before the forward
    eps: float
    dtype: torch.dtype
    seed: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, *self.spatial)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    kind = draw(st.sampled_from(sorted(KINDS)))
    spatial_dims = KINDS[kind][1]
    momentum = draw(
        st.one_of(
            st.none(),
            st.sampled_from([0.1, 0.01, 0.5, 1.0]),
            st.floats(min_value=0.001, max_value=0.999),
        )
    )
    return Config(
        kind=kind,
        batch=draw(st.integers(min_value=2, max_value=5)),
        channels=draw(st.integers(min_value=1, max_value=4)),
        spatial=tuple(
            draw(st.lists(st.integers(1, 3), min_size=spatial_dims, max_size=spatial_dims))
        ),
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        momentum=momentum,
        start_count=draw(st.one_of(st.just(0), st.integers(min_value=1, max_value=10_000))),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1, 1e-8])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(min_value=0, max_value=2**31 - 1)),
    )


# Corners always run, whatever hypothesis draws: the cumulative average from a nonzero count in
# float32, its first batch (which overwrites the initial values), a Keras-style momentum of 1,
# and batch statistics in eval mode.
CORNERS = (
    Config("BatchNorm2d", 2, 3, (2, 2), True, True, None, 37, 1e-5, torch.float32, 1),
    Config("BatchNorm1d[B,C]", 2, 4, (), False, True, None, 0, 1e-3, torch.float64, 2),
    Config("BatchNorm3d", 3, 2, (2, 1, 3), True, True, 1.0, 5, 0.1, torch.float32, 3),
    Config("BatchNorm1d[B,C,L]", 2, 2, (3,), True, False, 0.1, 0, 1e-5, torch.float64, 4),
)


def with_corners(*, track_only: bool = False) -> Callable[[Callable], Callable]:
    def decorate(test: Callable) -> Callable:
        for cfg in CORNERS:
            if cfg.track or not track_only:
                test = example(cfg=cfg)(test)
        return test

    return decorate


def build(cfg: Config) -> tuple[nn.Module, Tensor]:
    """A BN module with random γ, β, running stats and T, and an input batch for it."""
    cls = KINDS[cfg.kind][0]
    gen = torch.Generator().manual_seed(cfg.seed)
    c = cfg.channels
    bn = cls(
        c,
        eps=cfg.eps,
        momentum=cfg.momentum,
        affine=cfg.affine,
        track_running_stats=cfg.track,
        dtype=cfg.dtype,
    )
    with torch.no_grad():
        if cfg.affine:
            bn.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 1.5)
            bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        if cfg.track:
            bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 3 + 0.1)
            bn.num_batches_tracked.fill_(cfg.start_count)
    scale = torch.rand(c, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    offset = torch.randn(c, generator=gen, dtype=torch.float64)
    x = torch.randn(cfg.shape, generator=gen, dtype=torch.float64)
    x = x * F.channel_view(scale, x.dim()) + F.channel_view(offset, x.dim())
    return bn, x.to(cfg.dtype)


def as64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().double()


def numpy_batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, computed independently with numpy."""
    per_channel = np.moveaxis(x.double().numpy(), 1, 0).reshape(x.shape[1], -1)
    return torch.from_numpy(per_channel.mean(axis=1)), torch.from_numpy(per_channel.var(axis=1))


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return FLOAT64_TOL if dtype == torch.float64 else F.tolerance(dtype)


def assert_output_close(
    got: Tensor, x: Tensor, ref: Tensor, mean: Tensor, var: Tensor, bn: nn.Module, eps: float
) -> None:
    """|got − ref| ≤ atol + rtol·(|ref| + |γ|/sqrt(σ² + ε)·(|x| + |μ|)).

    The second term is the rounding the layer makes when it subtracts μ in its own dtype: for a
    channel whose values nearly coincide (N = 2 draws close together) that cancellation is the
    whole error, and it is no defect.
    """
    rtol, atol = tolerances(got.dtype)
    nd = x.dim()
    scale = torch.rsqrt(var + eps)
    weight = as64(getattr(bn, "weight", None))
    if weight is not None:
        scale = scale * weight.abs()
    x64 = x.double()
    tol = atol + rtol * (
        ref.abs() + F.channel_view(scale, nd) * (x64.abs() + F.channel_view(mean.abs(), nd))
    )
    err = (got.double() - ref).abs()
    worst = float((err / tol).max())
    assert worst <= 1.0, f"max |got - ref| / tol = {worst:.3g} (max err {float(err.max()):.3g})"


@SETTINGS
@given(cfg=configs())
@with_corners()
def test_bn_train_matches_torch_train_mode(cfg: Config) -> None:
    bn, x = build(cfg)
    with torch.no_grad():
        y = bn.train()(x)
    x64 = x.double()
    mean, var = numpy_batch_stats(x)
    ref = F.bn_train(x64, as64(bn.weight), as64(bn.bias), cfg.eps)
    assert ref.dtype == torch.float64
    assert_output_close(y, x, ref, mean, var, bn, cfg.eps)


@SETTINGS
@given(cfg=configs())
@with_corners()
def test_bn_eval_matches_torch_eval_mode(cfg: Config) -> None:
    bn, x = build(cfg)
    with torch.no_grad():
        y = bn.eval()(x)
    x64 = x.double()
    if cfg.track:
        mean, var = as64(bn.running_mean), as64(bn.running_var)
        ref = F.bn_eval(x64, mean, var, as64(bn.weight), as64(bn.bias), cfg.eps)
    else:
        # No running buffers: eval mode normalises with batch statistics (BN-NOTES).
        mean, var = numpy_batch_stats(x)
        ref = F.bn_train(x64, as64(bn.weight), as64(bn.bias), cfg.eps)
    assert_output_close(y, x, ref, mean, var, bn, cfg.eps)


@SETTINGS
@given(cfg=configs().filter(lambda c: c.track))
@with_corners(track_only=True)
def test_running_update_matches_one_torch_train_step(cfg: Config) -> None:
    bn, x = build(cfg)
    old_mean, old_var = as64(bn.running_mean).clone(), as64(bn.running_var).clone()
    with torch.no_grad():
        bn.train()(x)
    batch_mean, batch_var = numpy_batch_stats(x)
    n = F.values_per_channel(x)
    exp_mean, exp_var, exp_t = F.running_update(
        old_mean, old_var, batch_mean, batch_var, n, cfg.momentum, cfg.start_count
    )
    assert int(bn.num_batches_tracked) == exp_t == cfg.start_count + 1
    rtol, atol = tolerances(cfg.dtype)
    factor = F.update_factor(cfg.momentum, cfg.start_count)
    # The batch moments are sums of x-sized terms: their rounding scales with E[x²].
    second = batch_var + batch_mean.square()
    tol_mean = atol + rtol * (exp_mean.abs() + factor * second.sqrt())
    tol_var = atol + rtol * (exp_var.abs() + factor * F.bessel(n) * second)
    err_mean = (as64(bn.running_mean) - exp_mean).abs()
    err_var = (as64(bn.running_var) - exp_var).abs()
    assert bool((err_mean <= tol_mean).all()), f"running_mean off by {err_mean.tolist()}"
    assert bool((err_var <= tol_var).all()), f"running_var off by {err_var.tolist()}"


@pytest.mark.parametrize("start_count", [0, 1, 5, 999])
def test_update_factor_of_cumulative_average_matches_torch(start_count: int) -> None:
    """momentum=None: the new batch weighs 1/(T + 1), read off torch with a zero-variance batch."""
    bn = nn.BatchNorm1d(1, momentum=None, dtype=torch.float64)
    with torch.no_grad():
        bn.num_batches_tracked.fill_(start_count)
        bn.train()(torch.full((3, 1), 1.0, dtype=torch.float64))  # batch mean 1, old mean 0
    assert float(bn.running_mean[0]) == pytest.approx(F.update_factor(None, start_count), 1e-15)
    assert F.update_factor(None, start_count) == pytest.approx(1 / (start_count + 1), 1e-15)
    assert F.update_factor(0.3, start_count) == 0.3


@SETTINGS
@given(cfg=configs())
@with_corners()
def test_audit_of_a_healthy_single_bn_model_passes_the_formula_checks(cfg: Config) -> None:
    bn, x = build(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    batches = [x, *(x + torch.randn(x.shape, generator=gen).to(cfg.dtype) for _ in range(2))]
    model = nn.Sequential(bn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [module.training for module in model.modules()]
    report = bnaudit.audit(model, batches)
    m = report.layers[0].metrics
    assert m.seen.calls == 3
    assert m.train.recon.ratio < 1, m.train.recon.ratio
    assert m.eval.recon.ratio < 1, m.eval.recon.ratio
    if cfg.track:
        assert m.update.mean_ratio < 1, m.update.mean_ratio
        assert m.update.var_ratio < 1, m.update.var_ratio
        assert m.update.count_errors == 0
    else:
        # Nothing is updated without running stats: the ratios are "not measured".
        assert math.isnan(m.update.mean_ratio) and math.isnan(m.update.var_ratio)
    codes = {f.code for f in report.layers[0].findings}
    assert not codes & CHECKED_CODES, report.layers[0].findings
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"the audit changed {key}"
    assert [module.training for module in model.modules()] == modes


def test_formulas_evaluated_in_float32_stay_float32() -> None:
    """The formulas keep the input dtype: torch's own float32 output is then within tolerance."""
    bn, x = build(Config("BatchNorm2d", 4, 3, (2, 2), True, True, 0.1, 5, 1e-5, torch.float32, 7))
    with torch.no_grad():
        y = bn.train()(x)
    ref = F.bn_train(x, bn.weight.detach(), bn.bias.detach(), bn.eps)
    assert ref.dtype == torch.float32
    rtol, atol = F.tolerance(torch.float32)
    torch.testing.assert_close(ref, y, rtol=rtol, atol=atol)


# --- bessel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 16, 100])
def test_bessel_is_the_ratio_of_unbiased_to_biased_variance(n: int) -> None:
    values = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ratio = float(values.var(correction=1) / values.var(correction=0))
    assert F.bessel(n) == pytest.approx(ratio, rel=1e-13)
    assert F.bessel(n) == pytest.approx(n / (n - 1), rel=1e-15)


@pytest.mark.parametrize("n", [1, 0, -3])
def test_bessel_is_inf_without_two_values(n: int) -> None:
    assert F.bessel(n) == math.inf


def test_bessel_documented_values() -> None:
    assert F.bessel(4) == pytest.approx(4 / 3)
    assert F.bessel(16) == pytest.approx(1.0667, abs=1e-4)
    assert F.bessel(100) == pytest.approx(1.0101, abs=1e-4)


# --- momentum: init_weight, ema_window, ema_jitter_var --------------------------------------


def impulse_weights(momentum: float | None, steps: int) -> tuple[np.ndarray, float]:
    """Weights torch's running mean gives each of `steps` batches, and the initial value's.

    Channel i sees a batch mean of 1 at step i and 0 otherwise, so its final running mean is
    exactly the weight of batch i; the last channel starts at 1 and only ever sees 0.
    """
    bn = nn.BatchNorm1d(steps + 1, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean[steps] = 1.0
        bn.train()
        for i in range(steps):
            x = torch.zeros(2, steps + 1, dtype=torch.float64)
            x[:, i] = 1.0
            bn(x)
    assert int(bn.num_batches_tracked) == steps
    weights = bn.running_mean.numpy()
    return weights[:steps], float(weights[steps])


@pytest.mark.parametrize(
    ("momentum", "steps"), [(0.1, 10), (0.1, 50), (0.01, 30), (0.5, 7), (1.0, 3), (None, 12)]
)
def test_init_weight_is_what_torch_leaves_of_the_initial_value(
    momentum: float | None, steps: int
) -> None:
    _, init = impulse_weights(momentum, steps)
    assert F.init_weight(momentum, steps) == pytest.approx(init, rel=1e-12, abs=1e-15)


def test_init_weight_documented_values() -> None:
    assert F.init_weight(0.1, 10) == pytest.approx(0.35, abs=0.005)
    assert F.init_weight(0.1, 50) == pytest.approx(0.005, abs=0.0005)
    assert F.init_weight(0.1, 0) == 1.0
    assert F.init_weight(None, 0) == 1.0
    assert F.init_weight(None, 1) == 0.0


@pytest.mark.parametrize(("momentum", "steps"), [(0.1, 400), (0.3, 200), (0.05, 800)])
def test_ema_window_is_the_effective_sample_size_of_torch_weights(
    momentum: float, steps: int
) -> None:
    """1/Σw² of the weights torch gives past batches is the equivalent window (2 − m)/m."""
    weights, init = impulse_weights(momentum, steps)
    assert init < 1e-8  # the finite history misses no weight worth counting
    assert weights.sum() == pytest.approx(1.0, abs=1e-8)
    assert F.ema_window(momentum, steps) == pytest.approx(1 / np.square(weights).sum(), rel=1e-6)


@pytest.mark.parametrize("steps", [1, 5, 40])
def test_ema_window_of_cumulative_average_is_the_batch_count(steps: int) -> None:
    weights, init = impulse_weights(None, steps)
    assert init == 0.0
    np.testing.assert_allclose(weights, 1 / steps, rtol=1e-12)
    assert F.ema_window(None, steps) == pytest.approx(1 / np.square(weights).sum(), rel=1e-12)


def test_ema_window_documented_values() -> None:
    assert F.ema_window(0.1, 123) == pytest.approx(19.0)
    assert F.ema_window(1.0, 0) == pytest.approx(1.0)
    assert F.ema_window(0.0, 10) == math.inf


@pytest.mark.parametrize("momentum", [0.1, 0.3, 0.05])
def test_ema_jitter_var_is_the_stationary_variance_of_torch_running_mean(momentum: float) -> None:
    """Simulate many independent chains at once: one BN channel per chain.

    Each batch is two i.i.d. N(0, 2v) values per channel, so the batch means are i.i.d. N(0, v)
    and the running mean is their EMA. After enough steps that (1 − m)^(2k) < 1e-6 the running
    means are independent N(0, s²) draws with s² the stationary variance; the sample variance of
    K such draws has a relative sd of sqrt(2/(K − 1)) (1 % at K = 20 000): 5 sd is 5 %.
    """
    chains, v = 20_000, 0.7
    steps = math.ceil(math.log(1e-6) / (2 * math.log(1 - momentum)))
    gen = torch.Generator().manual_seed(1234)
    bn = nn.BatchNorm1d(chains, momentum=momentum, dtype=torch.float64).train()
    with torch.no_grad():
        for _ in range(steps):
            bn(torch.randn(2, chains, generator=gen, dtype=torch.float64) * math.sqrt(2 * v))
    observed = float(bn.running_mean.var())
    expected = F.ema_jitter_var(torch.tensor(v, dtype=torch.float64), momentum, steps)
    assert float(expected) == pytest.approx(v * momentum / (2 - momentum), rel=1e-12)
    rel_sd = math.sqrt(2 / (chains - 1))
    assert observed == pytest.approx(float(expected), rel=5 * rel_sd)


def test_ema_jitter_var_of_cumulative_average_is_v_over_t() -> None:
    """momentum=None: the running mean is the plain average of T i.i.d. batch means."""
    chains, v, steps = 20_000, 0.7, 25
    gen = torch.Generator().manual_seed(4321)
    bn = nn.BatchNorm1d(chains, momentum=None, dtype=torch.float64).train()
    with torch.no_grad():
        for _ in range(steps):
            bn(torch.randn(2, chains, generator=gen, dtype=torch.float64) * math.sqrt(2 * v))
    observed = float(bn.running_mean.var())
    expected = float(F.ema_jitter_var(torch.tensor(v, dtype=torch.float64), None, steps))
    assert expected == pytest.approx(v / steps, rel=1e-12)
    assert observed == pytest.approx(expected, rel=5 * math.sqrt(2 / (chains - 1)))


def test_ema_jitter_var_is_per_channel_and_consistent_with_the_window() -> None:
    v = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    for momentum, count in ((0.1, 100), (0.9, 3), (None, 7), (None, 0)):
        jitter = F.ema_jitter_var(v, momentum, count)
        assert jitter.shape == v.shape
        window = F.ema_window(momentum, max(count, 1))
        torch.testing.assert_close(jitter, v / window, rtol=1e-12, atol=0)


# --- amplification --------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_amplification_is_the_slope_of_torch_eval_mode(affine: bool, dtype: torch.dtype) -> None:
    """In eval mode y is affine in x per channel: y(x + 1) − y(x) = γ/sqrt(σ²_r + ε)."""
    gen = torch.Generator().manual_seed(11)
    c = 5
    bn = nn.BatchNorm2d(c, eps=1e-3, affine=affine, dtype=dtype).eval()
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.randn(c, generator=gen) * 3)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 1e-3)
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        x = torch.zeros(1, c, 1, 1, dtype=torch.float64)
        slope = (bn((x + 1).to(dtype)) - bn(x.to(dtype))).double().abs().flatten()
    weight = as64(bn.weight) if affine else None
    amp = F.amplification(weight, bn.running_var.detach(), bn.eps)
    assert amp.dtype == torch.float64
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(amp, slope, rtol=rtol, atol=0)


def test_amplification_clamps_negative_variance_to_eps() -> None:
    weight = torch.tensor([2.0, -2.0, 1.0], dtype=torch.float64)
    var = torch.tensor([-5.0, 3.0, 0.0], dtype=torch.float64)
    amp = F.amplification(weight, var, 1e-4)
    expected = [2 / math.sqrt(1e-4), 2 / math.sqrt(3 + 1e-4), 1 / math.sqrt(1e-4)]
    torch.testing.assert_close(amp, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


# --- values_per_channel, stat_dims ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "n"),
    [
        ((7, 3), 7),
        ((4, 3, 5), 20),
        ((2, 3, 4, 5), 40),
        ((2, 3, 2, 3, 4), 48),
        ((1, 6, 1, 1), 1),
        ((5,), 0),  # no channel dim
        ((4, 0, 3), 0),  # no channels
    ],
)
def test_values_per_channel(shape: tuple[int, ...], n: int) -> None:
    assert F.values_per_channel(torch.empty(shape)) == n


@SETTINGS
@given(cfg=configs().filter(lambda c: c.track))
@with_corners(track_only=True)
def test_values_per_channel_is_the_n_of_torch_bessel_correction(cfg: Config) -> None:
    """With momentum 1 the running var becomes the unbiased batch var: biased·N/(N − 1)."""
    bn, x = build(cfg)
    bn.momentum = 1.0
    x = x.double()
    bn = bn.double()
    with torch.no_grad():
        bn.train()(x)
    _, biased = numpy_batch_stats(x)
    torch.testing.assert_close(
        bn.running_var, biased * F.bessel(F.values_per_channel(x)), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
    ("shape", "dims"),
    [
        ((4, 3), (0,)),
        ((4, 3, 5), (0, 2)),
        ((2, 3, 4, 5), (0, 2, 3)),
        ((2, 3, 2, 3, 4), (0, 2, 3, 4)),
    ],
)
def test_stat_dims(shape: tuple[int, ...], dims: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert F.stat_dims(x) == dims
    mean, var = numpy_batch_stats(x)
    torch.testing.assert_close(x.mean(dim=F.stat_dims(x)), mean, rtol=1e-12, atol=1e-12)
    got_mean, got_var = F.batch_stats(x)
    torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_var, var, rtol=1e-12, atol=1e-12)


def test_tolerance_by_dtype() -> None:
    assert F.tolerance(torch.float32) == (1.3e-6, 1e-5)
    assert F.tolerance(torch.float64)[0] < F.tolerance(torch.float32)[0]
    assert F.tolerance(torch.float16)[0] > F.tolerance(torch.float32)[0]
    assert F.tolerance(torch.int64) == F.tolerance(torch.float32)  # unknown: float32's
