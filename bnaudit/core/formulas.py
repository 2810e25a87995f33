"""BatchNorm formulas as pure tensor functions (see shared BN-NOTES.md).

They take tensors and numbers, never modules, so they serve a live module and a bare state dict
alike and can be checked against torch's own layers in isolation. Their float64 reductions over
a whole activation, streamed in blocks, are in `bnaudit.core.blocked`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# assert_close-style tolerances (rtol, atol) by the dtype of the output being checked.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing an output of this dtype with a float64 reference."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def stat_dims(x: Tensor) -> tuple[int, ...]:
    """Every dim but the channel dim 1: BN statistics are per channel over all the others."""
    return (0, *range(2, x.dim()))


def values_per_channel(x: Tensor) -> int:
    """N: how many values of one channel a batch holds (B, B·L, B·H·W or B·D·H·W)."""
    return x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else 0


def sums_rows_in_order(x: Tensor) -> bool:
    """Whether torch's kernel sums each channel's values one row after another for this input.

    torch's CPU batch norm does so where the channels are the innermost dim: channels-last and
    channels_last_3d inputs, and [B, C] (every trailing dim 1). A plain sum of N values
    accumulates N roundings; the contiguous NCHW kernel sums exactly enough for the normal
    tolerance (measured on torch 2.13: see `stat_rounding`). Other devices with the same
    layout get the same allowance, which is the conservative choice.
    """
    if x.dim() < 2:
        return False
    if x.is_contiguous():
        return x.numel() == x.shape[0] * x.shape[1]
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return last is not None and x.is_contiguous(memory_format=last)


def sum_roundoff(x: Tensor) -> float:
    """The unit roundoff u of torch's batch-statistic sums for this input where it adds them
    in order (float32 for float32, float16 and bfloat16 inputs; float64 for float64); 0.0 where
    its sums are accurate (`sums_rows_in_order`)."""
    if not sums_rows_in_order(x):
        return 0.0
    return 2.0**-53 if x.dtype == torch.float64 else 2.0**-24


def stat_rounding(n: int, mean: Tensor, var: Tensor, u: float) -> tuple[Tensor, Tensor]:
    """How far torch's own batch mean and biased variance may be from the exact ones, per channel,
    when it sums the N values of a channel in order with unit roundoff u (`sum_roundoff`).

    The bound of such a sum is N·u times the sum of the magnitudes of its terms:
    |δμ| ≤ N·u·sqrt(σ² + μ²) (which bounds N·u·E|x|), and |δσ²| ≤ (N + 3)·u·σ² + δμ² for the
    sum of squared deviations, each rounded three times, around a mean off by δμ. Measured on
    torch 2.13 with channels-last inputs (1 and 2 threads, N up to 1.6 M): normal, heavy-tailed
    and uniform data reach 0.014 of the bound, post-ReLU and quantised data (many equal terms,
    whose roundings do not cancel) up to 0.2. `mean`, `var` are the exact batch statistics.
    """
    d_mean = n * u * (var + mean.square()).sqrt()
    return d_mean, (n + 3) * u * var + d_mean.square()


def channel_view(t: Tensor, ndim: int) -> Tensor:
    """Shape per-channel [C] (or per-sample [B, C]) statistics to broadcast against an input."""
    lead = (1,) if t.dim() == 1 else ()
    return t.reshape(*lead, *t.shape, *([1] * (ndim - len(lead) - t.dim())))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and *biased* variance (divide by N), the pair train mode uses."""
    var, mean = torch.var_mean(x, dim=stat_dims(x), correction=0)
    return mean, var


def instance_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and biased variance ([B, C]), as InstanceNorm uses."""
    var, mean = torch.var_mean(x, dim=tuple(range(2, x.dim())), correction=0)
    return mean, var


def bessel(n: int) -> float:
    """N/(N−1): the factor from biased to unbiased variance; inf when N ≤ 1."""
    return n / (n - 1) if n > 1 else math.inf


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """γ·(x − μ)/sqrt(σ² + ε) + β with per-channel μ, σ², γ, β (γ = 1, β = 0 when absent)."""
    nd = x.dim()
    y = (x - channel_view(mean, nd)) * channel_view(torch.rsqrt(var + eps), nd)
    if weight is not None:
        y = y * channel_view(weight, nd)
    if bias is not None:
        y = y + channel_view(bias, nd)
    return y


def bn_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Train-mode output: batch mean and biased batch variance."""
    mean, var = batch_stats(x)
    return normalize(x, mean, var, weight, bias, eps)


def bn_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Eval-mode output: the running statistics (what conv+BN folding bakes in)."""
    return normalize(x, running_mean, running_var, weight, bias, eps)


def update_factor(
    momentum: float | None, num_batches_tracked: int, *, instance: bool = False
) -> float:
    """The weight of the new batch in one running-stat update.

    `num_batches_tracked` is the count *before* the update; momentum=None is a cumulative
    average whose factor is 1/T after incrementing T, so the first batch overwrites the initial
    values completely. InstanceNorm keeps no count: its momentum=None means no update at all.
    """
    if momentum is None:
        return 0.0 if instance else 1.0 / (num_batches_tracked + 1)
    return momentum


def running_update(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var_biased: Tensor,
    n: int,
    momentum: float | None,
    num_batches_tracked: int,
    *,
    instance: bool = False,
) -> tuple[Tensor, Tensor, int]:
    """One train-mode update: (1 − m)·old + m·batch, with the *unbiased* batch variance.

    For InstanceNorm (`instance`), `batch_mean`/`batch_var_biased` are the per-sample statistics
    averaged over the batch, N is the per-sample count, and the counter does not move.
    """
    m = update_factor(momentum, num_batches_tracked, instance=instance)
    unbiased = batch_var_biased * bessel(n)
    new_mean = (1 - m) * running_mean + m * batch_mean
    new_var = (1 - m) * running_var + m * unbiased
    return new_mean, new_var, num_batches_tracked + (0 if instance else 1)


def update_residuals(
    old_mean: Tensor,
    old_var: Tensor,
    batch_mean: Tensor,
    batch_var_biased: Tensor,
    n: int,
    factor: float | Tensor,
    got_mean: Tensor,
    got_var: Tensor,
    eps: float | Tensor,
    dtype: torch.dtype,
    rounding: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """How one observed running-stat update compares with (1 − m)·old + m·batch.

    Returns, per channel, |got − expected| / tolerance for μ_r and for σ²_r (the update of
    `running_update`, with the weight m = `factor` of the new batch), and how far the update
    moved: |Δμ_r|/sqrt(σ²_r + ε) and |ln((σ²_r,new + ε)/(σ²_r + ε))|. `factor` and `eps` may be
    per-channel tensors; `dtype` is the buffers' dtype, which sets the tolerance; `rounding` is
    how far torch's batch statistics may be off (`stat_rounding`), which the update carries.
    """
    rtol, atol = tolerance(dtype)
    exp_mean = (1 - factor) * old_mean + factor * batch_mean
    exp_var = (1 - factor) * old_var + factor * (batch_var_biased * bessel(n))
    # The batch moments are sums of |x|-sized terms: their rounding scales with E[x²].
    second = batch_var_biased + batch_mean.square()
    tol_mean = atol + rtol * (exp_mean.abs() + factor * second.sqrt())
    tol_var = atol + rtol * (exp_var.abs() + factor * bessel(n) * second)
    if rounding is not None:
        tol_mean = tol_mean + factor * rounding[0]
        tol_var = tol_var + factor * bessel(n) * rounding[1]
    return (
        mismatch(got_mean, exp_mean) / tol_mean,
        mismatch(got_var, exp_var) / tol_var,
        (got_mean - old_mean).abs() / (old_var + eps).sqrt(),
        ((got_var + eps) / (old_var + eps)).log().abs(),
    )


def init_weight(momentum: float | None, num_batches_tracked: int) -> float:
    """How much the initial values (μ_r = 0, σ²_r = 1) still weigh after T updates."""
    if momentum is None:
        return 1.0 if num_batches_tracked == 0 else 0.0
    return (1.0 - momentum) ** num_batches_tracked


def ema_window(momentum: float | None, num_batches_tracked: int) -> float:
    """Equivalent averaging window in batches: (2 − m)/m, or T for the cumulative average."""
    if momentum is None:
        return float(num_batches_tracked)
    return (2.0 - momentum) / momentum if momentum > 0 else math.inf


def ema_jitter_var(between_batch_var: Tensor, momentum: float | None, num_batches_tracked: int):
    """Stationary variance of an EMA of i.i.d. batch values: v·m/(2 − m) (v/T if cumulative)."""
    if momentum is None:
        return between_batch_var / max(num_batches_tracked, 1)
    return between_batch_var * (momentum / (2.0 - momentum))


def amplification(weight: Tensor | None, running_var: Tensor, eps: float) -> Tensor:
    """|γ|/sqrt(σ²_r + ε): how much eval mode amplifies its input, per channel."""
    gain = torch.rsqrt(running_var.double().clamp_min(0) + eps)
    return gain if weight is None else weight.double().abs() * gain


def mismatch(got: Tensor, want: Tensor) -> Tensor:
    """|got − want|, 0 where both hold the same non-finite value (NaN/Inf passed through)."""
    same = (got == want) | (got.isnan() & want.isnan())
    return torch.where(same, torch.zeros_like(got), (got - want).abs())


def elementwise_tolerance(
    x: Tensor,
    ref: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    eps: float,
    dtype: torch.dtype,
    rounding: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """assert_close's atol + rtol·|ref|, plus rtol·|γ|/sqrt(σ² + ε)·(|x| + |μ|).

    The second term is the rounding a layer makes when it subtracts μ in its own dtype: without
    it, a healthy layer whose mean is large against its spread fails on cancellation alone.
    With `rounding` = (δμ, δσ²), how far the layer's own batch statistics may be off
    (`stat_rounding`), the output may move by |s|·δμ + |ref − β|·δσ²/(2(σ² + ε)) as well,
    where s = γ/sqrt(σ² + ε) and |ref − β| = |s|·|x − μ|.
    """
    rtol, atol = tolerance(dtype)
    nd = x.dim()
    scale = torch.rsqrt(var + eps)  # [C], or [B, C] for per-sample statistics
    if weight is not None:
        scale = scale * weight.abs()
    spread = channel_view(scale, nd) * (x.abs() + channel_view(mean.abs(), nd))
    tol = atol + rtol * (ref.abs() + spread)
    if rounding is not None:
        d_mean, d_var = rounding
        slope = channel_view(scale * d_var / (2 * (var + eps)), nd)  # per unit of |x − μ|
        tol = tol + channel_view(scale * d_mean, nd) + slope * (x - channel_view(mean, nd)).abs()
    return tol


def fold(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold eval-mode BN into the conv/linear before it (output channels on dim 0).

    W' = W·γ/sqrt(σ²_r + ε) per output channel, b' = (b − μ_r)·γ/sqrt(σ²_r + ε) + β.
    """
    scale = fold_scale(running_var, gamma, eps)
    return fold_weight(weight, scale), fold_bias(bias, running_mean, scale, beta)


def fold_scale(running_var: Tensor, gamma: Tensor | None, eps: float) -> Tensor:
    """γ/sqrt(σ²_r + ε), the factor of `fold` per output channel."""
    scale = torch.rsqrt(running_var + eps)
    return scale if gamma is None else scale * gamma


def fold_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """W' of `fold`, given its `fold_scale`, in the promoted dtype of the two: a weight of
    narrower dtype is promoted inside the product (the same bits as converting it first)."""
    # As [C_out, rest] × [C_out, 1]: the same products, several times faster than the
    # broadcast over the weight's own dimensions (with a dtype promotion).
    return (weight.reshape(len(scale), -1) * scale[:, None]).reshape(weight.shape)


def fold_bias(
    bias: Tensor | None, running_mean: Tensor, scale: Tensor, beta: Tensor | None
) -> Tensor:
    """b' of `fold`, given its `fold_scale`."""
    b = (bias if bias is not None else torch.zeros_like(running_mean)) - running_mean
    b = b * scale
    return b if beta is None else b + beta
