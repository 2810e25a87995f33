"""Streaming accumulators: merged in any split, they equal one pass over all the values.

This is what lets partial audits from several processes combine into the result of one run.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from bnaudit.measure.statistics import LayerStats, MaxTracker, Moments, RegimeStats, UpdateStats

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None)
REL = 1e-12
MOMENT_FIELDS = ("batch_means", "batch_vars", "biased_vars", "population")
TRACKER_FIELDS = ("mean_ratio", "var_ratio", "mean_step", "var_step")


def values(seed: int, count: int, channels: int) -> Tensor:
    """[count, channels] float64 values, off-centre and with unequal spreads per channel."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(channels, generator=gen, dtype=torch.float64) * 3 + 0.1
    offset = torch.randn(channels, generator=gen, dtype=torch.float64) * 5
    return torch.randn(count, channels, generator=gen, dtype=torch.float64) * scale + offset


def chunk_moments(chunk: Tensor) -> Moments:
    """A Moments holding one chunk of values, added as (count, mean, M2)."""
    m = Moments()
    mean = chunk.mean(dim=0)
    m.add(chunk.shape[0], mean, (chunk - mean).square().sum(dim=0))
    return m


def split_points(data: st.DataObject, count: int) -> list[int]:
    """Sorted cut positions 0 < c < count: the chunks are then all non-empty."""
    return sorted(data.draw(st.sets(st.integers(1, count - 1), max_size=8), label="cuts"))


def assert_close(got: Tensor | None, want: Tensor, rel: float = REL) -> None:
    assert got is not None
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


# --- Moments --------------------------------------------------------------------------------


@SETTINGS
@given(
    data=st.data(), count=st.integers(2, 60), channels=st.integers(1, 4), seed=st.integers(0, 999)
)
def test_moments_merged_in_random_chunks_equal_one_pass(
    data: st.DataObject, count: int, channels: int, seed: int
) -> None:
    """Chan's formula: merging per-chunk (count, mean, M2) gives the moments of all values."""
    x = values(seed, count, channels)
    bounds = [0, *split_points(data, count), count]
    chunks = [x[a:b] for a, b in itertools.pairwise(bounds)]

    # Sequential: chunk after chunk into one accumulator.
    seq = Moments()
    for chunk in chunks:
        part = chunk_moments(chunk)
        seq.add(part.count, part.mean, part.m2)
    # Tree: merge accumulators pairwise, as partial audits would be combined.
    parts = [chunk_moments(c) for c in chunks]
    while len(parts) > 1:
        merged = []
        for i in range(0, len(parts), 2):
            if i + 1 < len(parts):
                parts[i].merge(parts[i + 1])
            merged.append(parts[i])
        parts = merged
    tree = parts[0]

    for m in (seq, tree):
        assert m.count == count
        assert_close(m.mean, x.mean(dim=0))
        assert_close(m.variance(), x.var(dim=0, correction=1))
        assert_close(m.variance(correction=0), x.var(dim=0, correction=0))
        assert_close(m.m2, (x - x.mean(dim=0)).square().sum(dim=0))


@SETTINGS
@given(count=st.integers(2, 40), channels=st.integers(1, 4), seed=st.integers(0, 999))
def test_moments_add_value_gives_numpy_mean_and_variance(
    count: int, channels: int, seed: int
) -> None:
    x = values(seed, count, channels)
    m = Moments()
    for row in x:
        m.add_value(row)
    ref = x.numpy()
    assert m.count == count
    assert_close(m.mean, torch.from_numpy(ref.mean(axis=0)))
    assert_close(m.variance(), torch.from_numpy(ref.var(axis=0, ddof=1)))
    assert_close(m.variance(correction=0), torch.from_numpy(ref.var(axis=0, ddof=0)))


def test_moments_add_value_accepts_float32_and_accumulates_in_float64() -> None:
    x = values(5, 10, 3)
    m = Moments()
    for row in x.float():
        m.add_value(row)
    assert m.mean is not None and m.mean.dtype == torch.float64
    assert_close(m.mean, x.float().double().mean(dim=0))
    assert_close(m.variance(), x.float().double().var(dim=0))


def test_moments_variance_is_none_below_two_values() -> None:
    m = Moments()
    assert m.variance() is None
    assert m.variance(correction=0) is None
    m.add_value(torch.tensor([1.0, 2.0]))
    assert m.variance() is None
    # One value has a biased (population) variance: zero.
    assert_close(m.variance(correction=0), torch.zeros(2, dtype=torch.float64))
    m.add_value(torch.tensor([3.0, 2.0]))
    assert_close(m.variance(), torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_moments_merge_with_an_empty_one_changes_nothing() -> None:
    x = values(1, 12, 3)
    full = chunk_moments(x)
    full.merge(Moments())
    assert full.count == 12
    assert_close(full.mean, x.mean(dim=0))
    assert_close(full.variance(), x.var(dim=0))

    empty = Moments()
    empty.merge(chunk_moments(x))
    assert empty.count == 12
    assert_close(empty.mean, x.mean(dim=0))
    assert_close(empty.variance(), x.var(dim=0))


def test_moments_do_not_alias_the_tensors_they_are_given() -> None:
    mean, m2 = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([4.0, 8.0]).double()
    m = Moments()
    m.add(4, mean, m2)
    mean.fill_(100.0)
    m2.fill_(100.0)
    assert_close(m.mean, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert_close(m.m2, torch.tensor([4.0, 8.0], dtype=torch.float64))


def test_moments_stay_exact_for_a_large_offset() -> None:
    """Chan's merge does not lose the variance to cancellation when |mean| ≫ sd."""
    x = values(9, 200, 2) * 1e-3 + 1e6
    m = Moments()
    for chunk in x.split(7):
        m.merge(chunk_moments(chunk))
    assert_close(m.mean, x.mean(dim=0))
    assert_close(m.variance(), x.var(dim=0), rel=1e-6)


# --- MaxTracker -----------------------------------------------------------------------------


def test_max_tracker_keeps_the_per_channel_maximum() -> None:
    t = MaxTracker()
    assert t.value is None
    for row in ([1.0, 5.0, -2.0], [3.0, 4.0, -3.0], [2.0, 6.0, -1.0]):
        t.add(torch.tensor(row))
    assert t.value is not None and t.value.dtype == torch.float64
    assert t.value.tolist() == [3.0, 6.0, -1.0]


@pytest.mark.parametrize("nan_at", [0, 1, 2])
def test_max_tracker_propagates_nan(nan_at: int) -> None:
    """A NaN seen once stays visible, whatever comes before or after it."""
    rows = [torch.tensor([1.0, 2.0]), torch.tensor([5.0, 1.0]), torch.tensor([3.0, 7.0])]
    rows[nan_at] = torch.tensor([math.nan, 0.5])
    t = MaxTracker()
    for row in rows:
        t.add(row)
    assert t.value is not None
    assert math.isnan(float(t.value[0]))
    assert float(t.value[1]) == max(float(r[1]) for r in rows)  # the other channel is unharmed


def test_max_tracker_merge_propagates_nan_both_ways() -> None:
    clean, dirty = MaxTracker(), MaxTracker()
    clean.add(torch.tensor([1.0, 9.0]))
    dirty.add(torch.tensor([math.nan, 2.0]))
    clean.merge(dirty)
    assert clean.value is not None and math.isnan(float(clean.value[0]))
    assert float(clean.value[1]) == 9.0

    other = MaxTracker()
    other.add(torch.tensor([4.0, 3.0]))
    dirty.merge(other)
    assert dirty.value is not None and math.isnan(float(dirty.value[0]))
    assert float(dirty.value[1]) == 3.0


@SETTINGS
@given(data=st.data(), count=st.integers(2, 30), seed=st.integers(0, 999))
def test_max_tracker_merge_equals_one_tracker_fed_everything(
    data: st.DataObject, count: int, seed: int
) -> None:
    x = values(seed, count, 3)
    cut = data.draw(st.integers(1, count - 1))
    whole, first, second = MaxTracker(), MaxTracker(), MaxTracker()
    for i, row in enumerate(x):
        whole.add(row)
        (first if i < cut else second).add(row)
    first.merge(second)
    assert first.value is not None
    assert torch.equal(first.value, whole.value)
    assert torch.equal(first.value, x.amax(dim=0))


def test_max_tracker_merge_with_empty() -> None:
    t = MaxTracker()
    t.add(torch.tensor([1.0, -1.0]))
    t.merge(MaxTracker())
    assert t.value is not None and t.value.tolist() == [1.0, -1.0]
    empty = MaxTracker()
    empty.merge(t)
    assert empty.value is not None and empty.value.tolist() == [1.0, -1.0]


# --- RegimeStats, LayerStats: two halves merged equal one accumulator fed all ---------------


def make_batches(seed: int, sizes: list[tuple[int, int]], channels: int) -> list[Tensor]:
    """Batches [B, C, L] for each (B, L) in `sizes`: N = B·L values per channel."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, length in sizes:
        shift = torch.randn(channels, 1, generator=gen, dtype=torch.float64)
        out.append(torch.randn(b, channels, length, generator=gen, dtype=torch.float64) + shift)
    return out


def feed(regime: RegimeStats, x: Tensor, seed: int) -> None:
    """What the audit's hook does with one batch, plus some error maxima."""
    mean = x.mean(dim=(0, 2))
    var = x.var(dim=(0, 2), correction=0)
    regime.add_batch(x.shape[0] * x.shape[2], x.shape[0], mean, var)
    gen = torch.Generator().manual_seed(seed)
    regime.err_abs.add(torch.rand(x.shape[1], generator=gen))
    regime.err_ratio.add(torch.rand(x.shape[1], generator=gen) * 2)


def assert_moments_equal(got: Moments, want: Moments) -> None:
    assert got.count == want.count
    if want.mean is None:
        assert got.mean is None and got.m2 is None
        return
    assert_close(got.mean, want.mean)
    assert got.m2 is not None and want.m2 is not None
    assert_close(got.m2, want.m2)


def assert_trackers_equal(got: MaxTracker, want: MaxTracker) -> None:
    if want.value is None:
        assert got.value is None
    else:
        assert got.value is not None and torch.equal(got.value, want.value)


def assert_regimes_equal(got: RegimeStats, want: RegimeStats) -> None:
    for name in MOMENT_FIELDS:
        assert_moments_equal(getattr(got, name), getattr(want, name))
    assert_trackers_equal(got.err_abs, want.err_abs)
    assert_trackers_equal(got.err_ratio, want.err_ratio)
    assert (got.calls, got.min_n, got.min_batch) == (want.calls, want.min_n, want.min_batch)


sizes_strategy = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 4)), min_size=1, max_size=10)


@SETTINGS
@given(data=st.data(), sizes=sizes_strategy, channels=st.integers(1, 3), seed=st.integers(0, 999))
def test_regime_stats_merge_of_two_halves_equals_one_pass(
    data: st.DataObject, sizes: list[tuple[int, int]], channels: int, seed: int
) -> None:
    batches = make_batches(seed, sizes, channels)
    cut = data.draw(st.integers(0, len(batches)), label="cut")  # either half may be empty
    whole, first, second = RegimeStats(), RegimeStats(), RegimeStats()
    for i, x in enumerate(batches):
        feed(whole, x, seed + i)
        feed(first if i < cut else second, x, seed + i)
    first.merge(second)
    assert_regimes_equal(first, whole)

    # And against the values themselves, not only against the other accumulator.
    ns = [b * length for b, length in sizes]
    assert first.calls == len(batches)
    assert first.min_n == min(ns)
    assert first.min_batch == min(b for b, _ in sizes)
    assert first.batch_means.count == len(batches)
    assert first.batch_vars.count == sum(n > 1 for n in ns)  # N = 1 has no unbiased variance
    pooled = torch.cat([x.transpose(0, 1).reshape(channels, -1) for x in batches], dim=1)
    assert first.population.count == sum(ns)
    assert_close(first.population.mean, pooled.mean(dim=1))
    assert_close(first.population.variance(correction=0), pooled.var(dim=1, correction=0))
    means = torch.stack([x.mean(dim=(0, 2)) for x in batches])
    assert_close(first.batch_means.mean, means.mean(dim=0))
    if len(batches) > 1:
        assert_close(first.batch_means.variance(), means.var(dim=0))


def test_regime_stats_min_counts_ignore_an_empty_side() -> None:
    """0 means "nothing seen": merging an empty accumulator must not make the minimum 0."""
    seen = RegimeStats()
    for x in make_batches(2, [(4, 3), (5, 2)], 2):
        feed(seen, x, 0)
    assert (seen.min_n, seen.min_batch) == (10, 4)
    seen.merge(RegimeStats())
    assert (seen.min_n, seen.min_batch, seen.calls) == (10, 4, 2)
    empty = RegimeStats()
    empty.merge(seen)
    assert (empty.min_n, empty.min_batch, empty.calls) == (10, 4, 2)


def test_regime_stats_merge_takes_the_smaller_minimum_from_either_side() -> None:
    small, large = RegimeStats(), RegimeStats()
    feed(small, make_batches(3, [(2, 1)], 2)[0], 0)
    feed(large, make_batches(4, [(6, 3)], 2)[0], 0)
    a, b = RegimeStats(), RegimeStats()
    a.merge(large)
    a.merge(small)
    b.merge(small)
    b.merge(large)
    for r in (a, b):
        assert (r.min_n, r.min_batch, r.calls) == (2, 2, 2)


def feed_update(u: UpdateStats, seed: int, channels: int, count_error: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name in TRACKER_FIELDS:
        getattr(u, name).add(torch.rand(channels, generator=gen, dtype=torch.float64))
    u.count_errors += int(count_error)


@SETTINGS
@given(data=st.data(), sizes=sizes_strategy, channels=st.integers(1, 3), seed=st.integers(0, 999))
def test_layer_stats_merge_of_two_halves_equals_one_pass(
    data: st.DataObject, sizes: list[tuple[int, int]], channels: int, seed: int
) -> None:
    batches = make_batches(seed, sizes, channels)
    cut = data.draw(st.integers(0, len(batches)), label="cut")
    errors = data.draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches)))
    whole, first, second = LayerStats(), LayerStats(), LayerStats()
    for i, x in enumerate(batches):
        for target in (whole, first if i < cut else second):
            feed(target.eval, x, seed + i)
            feed(target.train, x * 1.5 + 0.25, seed + 1000 + i)
            feed_update(target.update, seed + i, channels, errors[i])
    first.merge(second)
    assert_regimes_equal(first.train, whole.train)
    assert_regimes_equal(first.eval, whole.eval)
    for name in TRACKER_FIELDS:
        assert_trackers_equal(getattr(first.update, name), getattr(whole.update, name))
    assert first.update.count_errors == whole.update.count_errors == sum(errors)
    assert first.train.calls == first.eval.calls == len(batches)


def test_layer_stats_merge_propagates_nan_in_update_residuals() -> None:
    a, b = LayerStats(), LayerStats()
    a.update.var_ratio.add(torch.tensor([0.5, 0.2]))
    b.update.var_ratio.add(torch.tensor([0.1, math.nan]))
    a.merge(b)
    value = a.update.var_ratio.value
    assert value is not None
    assert float(value[0]) == 0.5 and math.isnan(float(value[1]))


def test_moments_match_numpy_on_a_known_example() -> None:
    """A hand-checkable case: values 1..6 split 2 + 4 (mean 3.5, unbiased var 3.5)."""
    x = np.arange(1.0, 7.0)
    m = Moments()
    for part in (x[:2], x[2:]):
        m.merge(chunk_moments(torch.from_numpy(part).unsqueeze(1)))
    assert m.count == 6
    assert float(m.mean[0]) == pytest.approx(3.5, rel=1e-15)
    assert float(m.variance()[0]) == pytest.approx(3.5, rel=1e-15)
    assert float(m.variance(correction=0)[0]) == pytest.approx(35 / 12, rel=1e-15)
