"""Streaming per-channel accumulators that merge exactly.

A forward hook reduces what it sees to these and drops the tensors, so an audit's memory does not
grow with the number of batches. Every accumulator merges with another of its kind by Chan's
parallel formula (or max), so partial audits from several processes combine into the same result
as one run over all the batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) per channel, in float64."""

    count: float = 0.0
    mean: Tensor | None = None
    m2: Tensor | None = None

    def add(self, count: float, mean: Tensor, m2: Tensor) -> None:
        """Merge a group of `count` values with this mean and M2 (Chan et al., 1979)."""
        mean, m2 = mean.double(), m2.double()
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = float(count), mean.clone(), m2.clone()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def add_value(self, value: Tensor) -> None:
        """Merge one observation per channel (e.g. one batch's mean)."""
        self.add(1.0, value, torch.zeros_like(value, dtype=torch.float64))

    def add_values(self, values: Tensor) -> None:
        """Merge K observations per channel at once ([K, C]): the same as K `add_value` calls
        (two-pass moments of the K, then one merge), at the cost of one."""
        values = values.double()
        mean = values.mean(0)
        self.add(float(values.shape[0]), mean, (values - mean).square().sum(0))

    def merge(self, other: Moments) -> None:
        if other.mean is not None and other.m2 is not None:
            self.add(other.count, other.mean, other.m2)

    def channels(self, index: slice) -> Moments:
        """The accumulator of a range of channels (views, not copies)."""
        if self.mean is None or self.m2 is None:
            return Moments()
        return Moments(self.count, self.mean[index], self.m2[index])

    def variance(self, correction: int = 1) -> Tensor | None:
        """Per-channel variance; None while fewer than `correction` + 1 values were seen."""
        if self.m2 is None or self.count <= correction:
            return None
        return self.m2 / (self.count - correction)


@dataclass
class MaxTracker:
    """Per-channel running maximum (NaN-propagating: a NaN seen once stays visible)."""

    value: Tensor | None = None

    def add(self, value: Tensor) -> None:
        value = value.double()
        if self.value is None:
            self.value = value.clone()
        else:
            # torch.maximum propagates NaN, which is what an error maximum must do.
            self.value = torch.maximum(self.value, value)

    def merge(self, other: MaxTracker) -> None:
        if other.value is not None:
            self.add(other.value)

    def channels(self, index: slice) -> MaxTracker:
        return MaxTracker(None if self.value is None else self.value[index])


@dataclass
class RegimeStats:
    """What one layer saw in one regime (train-mode or eval-mode pass), batch by batch."""

    batch_means: Moments = field(default_factory=Moments)  # one observation per batch
    batch_vars: Moments = field(default_factory=Moments)  # unbiased batch variances
    biased_vars: Moments = field(default_factory=Moments)  # biased batch variances
    population: Moments = field(default_factory=Moments)  # every value pooled (exact moments)
    err_abs: MaxTracker = field(default_factory=MaxTracker)  # reconstruction, max |y − ref|
    err_ratio: MaxTracker = field(default_factory=MaxTracker)  # max |y − ref| / tolerance
    calls: int = 0
    min_n: int = 0  # fewest values per channel in one batch
    min_batch: int = 0  # smallest leading (batch) dim seen

    def add_batch(
        self,
        n: int,
        batch: int,
        mean: Tensor,
        var_biased: Tensor,
        pooled: tuple[int, Tensor, Tensor] | None = None,
    ) -> None:
        """One batch: N values per channel, what the running stats estimate (mean, biased var).

        `pooled` (count, mean, biased var) are the moments of every value of the batch when
        they differ from `mean`/`var_biased` (per-sample statistics, as in InstanceNorm).
        """
        mean, var_biased = mean.double(), var_biased.double()
        self.batch_means.add_value(mean)
        self.biased_vars.add_value(var_biased)
        if n > 1:
            self.batch_vars.add_value(var_biased * (n / (n - 1)))
        count, p_mean, p_var = pooled if pooled is not None else (n, mean, var_biased)
        self.population.add(count, p_mean.double(), p_var.double() * count)
        self.calls += 1
        self.min_n = _min_seen(self.min_n, n)
        self.min_batch = _min_seen(self.min_batch, batch)

    def add_batches(self, n: int, batch: int, means: Tensor, vars_biased: Tensor) -> None:
        """K batches of one shape at once (rows of [K, C]): the same as K `add_batch` calls."""
        k = means.shape[0]
        means, vars_biased = means.double(), vars_biased.double()
        self.batch_means.add_values(means)
        self.biased_vars.add_values(vars_biased)
        if n > 1:
            self.batch_vars.add_values(vars_biased * (n / (n - 1)))
        # Every value of the K batches pooled: Chan's merge of K groups of n values.
        pooled = means.mean(0)
        m2 = n * (vars_biased.sum(0) + (means - pooled).square().sum(0))
        self.population.add(k * n, pooled, m2)
        self.calls += k
        self.min_n = _min_seen(self.min_n, n)
        self.min_batch = _min_seen(self.min_batch, batch)

    def merge(self, other: RegimeStats) -> None:
        for name in _MOMENT_FIELDS:
            getattr(self, name).merge(getattr(other, name))
        self.err_abs.merge(other.err_abs)
        self.err_ratio.merge(other.err_ratio)
        self.calls += other.calls
        self.min_n = _min_seen(self.min_n, other.min_n)
        self.min_batch = _min_seen(self.min_batch, other.min_batch)

    def channels(self, index: slice) -> RegimeStats:
        """What a range of the channels saw (several layers can be accumulated side by side)."""
        moments = {name: getattr(self, name).channels(index) for name in _MOMENT_FIELDS}
        return RegimeStats(
            **moments,
            err_abs=self.err_abs.channels(index),
            err_ratio=self.err_ratio.channels(index),
            calls=self.calls,
            min_n=self.min_n,
            min_batch=self.min_batch,
        )


_MOMENT_FIELDS = ("batch_means", "batch_vars", "biased_vars", "population")


def _min_seen(a: int, b: int) -> int:
    """Minimum of two counts where 0 means "nothing seen yet"."""
    return max(a, b) if 0 in (a, b) else min(a, b)


@dataclass
class UpdateStats:
    """Residuals of the running-stat update, one train step at a time."""

    mean_ratio: MaxTracker = field(default_factory=MaxTracker)  # |actual − expected| / tol
    var_ratio: MaxTracker = field(default_factory=MaxTracker)
    mean_step: MaxTracker = field(default_factory=MaxTracker)  # |Δμ_r| / sqrt(σ²_r + ε)
    var_step: MaxTracker = field(default_factory=MaxTracker)  # |ln(σ²_r,new / σ²_r)|
    count_errors: int = 0  # steps where num_batches_tracked did not become T + 1

    def add(
        self, mean_ratio: Tensor, var_ratio: Tensor, mean_step: Tensor, var_step: Tensor
    ) -> None:
        """One train step's residuals (`formulas.update_residuals`)."""
        self.mean_ratio.add(mean_ratio)
        self.var_ratio.add(var_ratio)
        self.mean_step.add(mean_step)
        self.var_step.add(var_step)

    def merge(self, other: UpdateStats) -> None:
        for name in _TRACKER_FIELDS:
            getattr(self, name).merge(getattr(other, name))
        self.count_errors += other.count_errors

    def channels(self, index: slice) -> UpdateStats:
        """A range of the channels; `count_errors` is per layer and stays behind."""
        trackers = {name: getattr(self, name).channels(index) for name in _TRACKER_FIELDS}
        return UpdateStats(**trackers)


_TRACKER_FIELDS = ("mean_ratio", "var_ratio", "mean_step", "var_step")


@dataclass
class LayerStats:
    """Everything the hooks keep for one BN layer."""

    train: RegimeStats = field(default_factory=RegimeStats)
    eval: RegimeStats = field(default_factory=RegimeStats)
    update: UpdateStats = field(default_factory=UpdateStats)

    def merge(self, other: LayerStats) -> None:
        self.train.merge(other.train)
        self.eval.merge(other.eval)
        self.update.merge(other.update)

    def channels(self, index: slice) -> LayerStats:
        return LayerStats(
            self.train.channels(index), self.eval.channels(index), self.update.channels(index)
        )
