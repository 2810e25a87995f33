"""What `measure` reads from a layer's tensors, computed for many layers at once.

A layer's figures cost a few dozen tensor operations of a few µs each, whatever its width: on
many narrow layers (a 400-layer BatchNorm1d MLP) that was most of the work after the passes. So
layers alike (`_stack_key`) are stacked into [L, C] tensors and each operation runs once on all;
a layer unlike any other is a stack of one. The operations are elementwise with the same Python
scalars (torch's float64 log, sqrt, exp and rsqrt give each element the same bits wherever it
sits in a tensor: vectorised, tail included), and reductions along the channels that select a
value (max, median, argmax) or count: every figure has the bits it would have alone.
tests/test_metrics_stacked.py compares with a per-layer reference bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bnaudit.core import formulas as F
from bnaudit.core.layers import LayerAttrs
from bnaudit.measure.statistics import LayerStats, MaxTracker, RegimeStats
from bnaudit.verdict import significance as S
from bnaudit.verdict.drift import Drift, drifts, judged
from bnaudit.verdict.thresholds import Thresholds

NAN = math.nan
Layer = tuple[LayerAttrs, LayerStats]


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
    maxima: tuple[float, ...]  # the maximum of each of `trackers(s)`, in that order


def trackers(s: LayerStats) -> tuple[MaxTracker, ...]:
    """The per-channel maxima a layer's figures reduce, in `Figures.maxima`'s order."""
    return (
        *(s.train.err_abs, s.train.err_ratio, s.eval.err_abs, s.eval.err_ratio),
        *(s.update.mean_ratio, s.update.var_ratio, s.update.mean_step, s.update.var_step),
    )


def figures(
    a: LayerAttrs,
    s: LayerStats,
    t: Thresholds,
    regime: str = "train",
    synthetic: bool = False,
    judgeable: Callable[[int, int, float, float], bool] = S.judgeable,
) -> Figures:
    """One layer's figures: `figures_of` on a stack of one."""
    return _stacked([(a, s)], t, regime, synthetic, judgeable, S.noise_p)[0]


def figures_of(
    layers: Sequence[Layer],
    t: Thresholds,
    regime: str = "train",
    synthetic: bool = False,
) -> list[Figures]:
    """Every layer's figures, layers alike (`_stack_key`) stacked into [L, C] tensors."""
    # Layers share a few (C, K) and off counts: the significance figures are computed once each.
    judgeable = functools.lru_cache(maxsize=None)(S.judgeable)
    noise_p = functools.lru_cache(maxsize=None)(S.noise_p)
    groups: dict[Hashable, list[int]] = {}
    for i, (a, s) in enumerate(layers):
        groups.setdefault(_stack_key(a, s, regime), []).append(i)
    out: list[Figures | None] = [None] * len(layers)
    for same in groups.values():
        got = _stacked([layers[i] for i in same], t, regime, synthetic, judgeable, noise_p)
        for i, f in zip(same, got, strict=True):
            out[i] = f
    return out  # type: ignore[return-value]


def _regimes(s: LayerStats, regime: str) -> tuple[RegimeStats, RegimeStats | None]:
    """(what the running stats should describe, the eval-mode input for the gap or None)."""
    return (s.eval, None) if regime == "eval" else (s.train, s.eval)


def _stack_key(a: LayerAttrs, s: LayerStats, regime: str) -> Hashable:
    """What layers stacked together share: every Python scalar of the formulas, the counts,
    and which tensors exist with which shape, dtype and device."""
    described, eval_input = _regimes(s, regime)
    moments = [s.train.batch_means, s.train.biased_vars, described.batch_means]
    moments += [described.batch_vars]
    if eval_input is not None:
        moments += [eval_input.batch_means, eval_input.batch_vars]
    tensors = [a.running_mean, a.running_var, a.weight, a.bias]
    tensors += [m.value for m in trackers(s)] + [v for m in moments for v in (m.mean, m.m2)]
    return (
        *(a.num_features, a.eps, a.momentum, a.num_batches_tracked or 0),
        tuple(m.count for m in moments),
        tuple(None if v is None else (v.shape, v.dtype, v.device) for v in tensors),
    )


def _stacked(
    layers: list[Layer],
    t: Thresholds,
    regime: str,
    synthetic: bool,
    judgeable: Callable[[int, int, float, float], bool],
    noise_p: Callable[[int, int, int, float], float],
) -> list[Figures]:
    """The figures of layers that share a `_stack_key`, each tensor operation run once on all."""
    a0, s0 = layers[0]
    size = len(layers)
    eval_input = _regimes(s0, regime)[1]
    stale = gap = [Drift()] * size
    numbers = torch.full((size, 3), NAN, dtype=torch.float64).tolist()
    mean = var = None
    if a0.running_mean is not None and a0.running_var is not None:
        mean = _rows([a.running_mean for a, _ in layers])
        var = _rows([a.running_var for a, _ in layers])
        described = [_regimes(s, regime)[0] for _, s in layers]
        stale = drifts(described, mean, var, a0, t, noise_p)
        if eval_input is not None:
            gap = drifts([s.eval for _, s in layers], mean, var, a0, t, noise_p)
        numbers = _running_figures(layers, mean, var)
    counts = _counts(layers, mean, var)
    maxima = _maxima(layers)
    out = []
    for i, (a, s) in enumerate(layers):
        gap_judged = "n/a: regime eval"
        if eval_input is not None:
            gap_judged = judged(s.eval, a, gap[i], t, synthetic, judgeable)
        described_i = _regimes(s, regime)[0]
        jitter, observed, amplification = numbers[i]
        nonfinite, negative, zero, initial = counts[i]
        out.append(
            Figures(
                stale=stale[i],
                gap=gap[i],
                stale_judged=judged(described_i, a, stale[i], t, synthetic, judgeable),
                gap_judged=gap_judged,
                jitter=jitter,
                observed=observed,
                nonfinite_values=nonfinite,
                negative_var_channels=negative,
                zero_var_channels=zero,
                initial_stats=initial,
                max_amplification=amplification,
                maxima=maxima[i],
            )
        )
    return out


def _running_figures(layers: list[Layer], mean: Tensor, var: Tensor) -> list[list[float]]:
    """[jitter, observed, max amplification] of each layer: the EMA jitter of the batch means
    in running sds (median), the running var over the biased batch var (geometric median),
    and the largest |γ|/sqrt(σ²_r + ε)."""
    a0, s0 = layers[0]
    eps, nbt, size = a0.eps, a0.num_batches_tracked or 0, len(layers)
    nan = torch.full((size,), NAN, dtype=torch.float64)
    jitter = observed = nan
    train_means = s0.train.batch_means
    if train_means.variance() is not None:
        v_mean = _rows([s.train.batch_means.m2 for _, s in layers]) / (train_means.count - 1)
        run_sd = (var.clamp_min(0) + eps).sqrt()
        jitter = (F.ema_jitter_var(v_mean, a0.momentum, nbt).sqrt() / run_sd).median(1).values
    if s0.train.biased_vars.mean is not None:
        ratio = var / _rows([s.train.biased_vars.mean for _, s in layers])
        observed = ratio.log().median(1).values.exp()
        observed = torch.where((ratio > 0).all(1), observed, NAN)
    weight = _rows([a.weight for a, _ in layers]) if a0.weight is not None else None
    amplification = _row_max(F.amplification(weight, var, eps))
    return torch.stack([jitter, observed, amplification]).T.tolist()


def _counts(
    layers: list[Layer], mean: Tensor | None, var: Tensor | None
) -> list[tuple[int, int, int, bool]]:
    """(NaN/Inf values, running_var < 0 and == 0 channels, initial stats) of each layer."""
    a0, size = layers[0][0], len(layers)
    weight = _rows([a.weight for a, _ in layers]) if a0.weight is not None else None
    bias = _rows([a.bias for a, _ in layers]) if a0.bias is not None else None
    tensors = [v for v in (weight, bias, mean, var) if v is not None]
    nonfinite = torch.zeros(size, dtype=torch.int64)
    for v in tensors:
        nonfinite += (~torch.isfinite(v)).sum(1)
    if mean is None or var is None:
        return [(n, 0, 0, False) for n in nonfinite.tolist()]
    counts = torch.stack([nonfinite, (var < 0).sum(1), (var == 0).sum(1)]).T.tolist()
    initial = ((mean == 0).all(1) & (var == 1).all(1)).tolist()
    return [(n, neg, zero, init) for (n, neg, zero), init in zip(counts, initial, strict=True)]


def _maxima(layers: list[Layer]) -> list[tuple[float, ...]]:
    """The maximum of each of `trackers(s)` of each layer (NaN where none was tracked)."""
    columns = []
    for j, tracker in enumerate(trackers(layers[0][1])):
        if tracker.value is None:
            columns.append([NAN] * len(layers))
        else:
            values = _rows([trackers(s)[j].value for _, s in layers])
            columns.append(_row_max(values).tolist())
    return [tuple(row) for row in zip(*columns, strict=True)]


def _rows(tensors: list[Tensor | None]) -> Tensor:
    """[L, n]: one flattened row per layer (the layers alike, so no row is None)."""
    return torch.stack([v.reshape(-1) for v in tensors])  # type: ignore[union-attr]


def _row_max(rows: Tensor) -> Tensor:
    """Largest element of each row, NaN if any is NaN (a NaN must stay visible) or none."""
    if rows.shape[1] == 0:
        return torch.full((rows.shape[0],), NAN, dtype=torch.float64)
    return rows.amax(1)
