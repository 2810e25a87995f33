"""Blocked float64 reductions: the formulas' batch moments and reconstruction error, streamed.

`batch_moments` is `formulas.batch_stats(x.double())`, and `reconstruction_error` the error of
`formulas.normalize` against `formulas.elementwise_tolerance`, computed on float64 blocks of the
activation instead of a float64 copy of it: memory stays flat, whatever the activation's size.
tests/test_fast_paths.py holds each to its formula over many shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import wraps
from typing import TypeVar

import torch
from torch import Tensor

from bnaudit.core.formulas import tolerance, values_per_channel
from bnaudit.core.runtime import torch_threads

# Values per block in the streaming functions: their float64 temporaries (three blocks of
# 8 bytes a value) stay small, and memory does not grow with the activation.
CHUNK_VALUES = 1 << 16
# Below this many values per channel and sample, blocks are laid out channels last: per-channel
# vectors then broadcast along contiguous rows and reductions run down the rows, which on CPU is
# several times faster than over a short inner dimension.
SHORT_INNER = 64


_R = TypeVar("_R")


def one_thread(fn: Callable[..., _R]) -> Callable[..., _R]:
    """Run `fn` with torch on one thread, then put the caller's count back.

    Each block operation is small (CHUNK_VALUES values), and torch would run every one as a
    parallel region: on a busy machine each region waits until all its threads are scheduled,
    which made these operations 10-17x slower under load (issue 25). On one thread they cost
    what they cost on a quiet machine, give or take the machine's share.
    """

    @wraps(fn)
    def run(*args, **kwargs):
        with torch_threads(1):
            return fn(*args, **kwargs)

    return run


class Blocks:
    """An activation [B, C, ...], seen as [B, C, S], in float64 blocks for streaming passes.

    `groups` are the channel ranges; `blocks(t, group, buffer)` yields, for one channel range,
    float64 copies of t[b0:b1, channels, s0:s1] in a reused buffer: laid out [b, c, s], or
    [b, s, c] (channels last) when S is short. `vec` shapes a per-channel vector, sliced to a
    channel range, to broadcast against such a block; `dims` are the block's reduction dims.
    """

    def __init__(self, x: Tensor) -> None:
        b, c = x.shape[0], x.shape[1]
        self.x3 = x.reshape(b, c, -1)
        s = self.x3.shape[2]
        self.channels_last = s < SHORT_INNER
        self.dims = (0, 1) if self.channels_last else (0, 2)
        # A block covers as much of one channel's values as fits, then more channels: fewer
        # partial results to combine, and per-channel outputs much smaller than the block.
        step_s = min(s, CHUNK_VALUES)
        step_b = min(b, max(1, CHUNK_VALUES // step_s))
        step_c = min(c, max(1, CHUNK_VALUES // (step_b * step_s)))
        self.groups = [slice(j, min(j + step_c, c)) for j in range(0, c, step_c)]
        self.rest = [
            (slice(i, i + step_b), slice(k, k + step_s))
            for i in range(0, b, step_b)
            for k in range(0, s, step_s)
        ]
        size = step_b * step_c * step_s
        self.buffers = [torch.empty(size, dtype=torch.float64, device=x.device) for _ in range(3)]

    def blocks(self, t3: Tensor, group: slice, buffer: int) -> Iterator[Tensor]:
        for rows, inner in self.rest:
            part = t3[rows, group, inner]
            if self.channels_last:
                part = part.transpose(1, 2)
            yield self.buffers[buffer][: part.numel()].view(part.shape).copy_(part)

    def like(self, block: Tensor, buffer: int) -> Tensor:
        """Buffer `buffer` shaped as `block`, for an out= result."""
        return self.buffers[buffer][: block.numel()].view(block.shape)

    def vec(self, v: Tensor, group: slice) -> Tensor:
        v = v[group]
        return v if self.channels_last else v.unsqueeze(-1)


@one_thread
def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance in float64, of an input of any floating dtype.

    `batch_stats(x.double())` without a float64 copy of `x`: two passes over float64 blocks
    (the sum, then the sum of squared deviations from the mean), as exact as float64 allows —
    more than a one-pass (Welford) update, and several times faster on CPU.
    """
    n, blk = values_per_channel(x), Blocks(x)
    sums, squares = [], []
    for group in blk.groups:
        total = sum(part.sum(blk.dims) for part in blk.blocks(blk.x3, group, 0))
        mean = total / n
        centre = blk.vec(mean, slice(None))
        sq = sum(
            part.sub_(centre).mul_(part).sum(blk.dims) for part in blk.blocks(blk.x3, group, 0)
        )
        sums.append(mean)
        squares.append(sq / n)
    if len(blk.groups) == 1:
        return sums[0], squares[0]
    return torch.cat(sums), torch.cat(squares)


@one_thread
def reconstruction_error(
    x: Tensor,
    y: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    dtype: torch.dtype,
    rounding: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per channel: max |y − ref| and max |y − ref| / tolerance, in float64.

    ref = normalize(x, mean, var, weight, bias, eps) and the tolerance is
    `elementwise_tolerance`, evaluated in float64 on blocks of `x` and `y` (no float64 copy of
    either) as ref = x·s + (β − μ·s) with s = γ/sqrt(σ² + ε), and |γ|/sqrt(σ² + ε)·|x| as
    |x·s|. In float64 this differs from normalize's order of operations by a few float64
    roundings of |x·s| + |μ·s| + |β|: below 2e-8 of the tolerance for float64 outputs and
    2e-9 for float32 (tests/test_fast_paths.py). The error stays a measurement, not an
    estimate.

    Only for finite values: `mismatch` treats equal non-finite values as equal, and here a
    NaN or Inf anywhere makes the result non-finite; the caller then takes the general path.
    `mean`, `var` are per-channel ([C]) statistics; `rounding` as in `elementwise_tolerance`.
    """
    rtol, atol = tolerance(dtype)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    centre = -mean * scale
    shift = centre if bias is None else centre + bias
    floor = atol + rtol * scale.abs() * mean.abs()  # atol + rtol·|γ|/sqrt(σ² + ε)·|μ|
    if rounding is not None:
        floor = floor + scale.abs() * rounding[0]
        slope = rounding[1] / (2 * (var + eps))  # per unit of |ref − β| = |x·s − μ·s|
    blk = Blocks(x)
    y3 = y.reshape(blk.x3.shape)
    errs, ratios = [], []
    for group in blk.groups:
        s, b, f = blk.vec(scale, group), blk.vec(shift, group), blk.vec(floor, group)
        worst_err = worst_ratio = None
        for xs, err in zip(blk.blocks(blk.x3, group, 0), blk.blocks(y3, group, 2), strict=True):
            xs = xs.mul_(s)  # x·s
            ref = torch.add(xs, b, out=blk.like(xs, 1))
            err.sub_(ref).abs_()
            moved = None
            if rounding is not None:
                moved = (xs + blk.vec(centre, group)).abs_().mul_(blk.vec(slope, group))
            # atol + rtol·(|ref| + |x·s| + |s·μ|), in the buffer of x·s
            tol = torch.add(f, xs.abs_().add_(ref.abs_()), alpha=rtol, out=xs)
            if moved is not None:
                tol.add_(moved)
            e, r = err.amax(blk.dims), torch.div(err, tol, out=tol).amax(blk.dims)
            if worst_err is None or worst_ratio is None:
                worst_err, worst_ratio = e, r
            else:  # maximum, not max in place: a NaN must stay visible
                worst_err, worst_ratio = torch.maximum(worst_err, e), torch.maximum(worst_ratio, r)
        errs.append(worst_err)
        ratios.append(worst_ratio)
    if len(blk.groups) == 1:
        return errs[0], ratios[0]
    return torch.cat(errs), torch.cat(ratios)
