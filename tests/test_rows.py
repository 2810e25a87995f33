"""Results folded K at a time (`bnaudit.measure.rows`, `RegimeStats.add_batches`) against one at a
time."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bnaudit.core import formulas as F
from bnaudit.measure import rows
from bnaudit.measure.statistics import LayerStats, Moments, RegimeStats


def assert_same_moments(a: Moments, b: Moments) -> None:
    assert a.count == b.count
    for x, y in ((a.mean, b.mean), (a.m2, b.m2)):
        assert (x is None) == (y is None)
        if x is not None and y is not None:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def assert_same_regime(a: RegimeStats, b: RegimeStats) -> None:
    for name in ("batch_means", "batch_vars", "biased_vars", "population"):
        assert_same_moments(getattr(a, name), getattr(b, name))
    for name in ("err_abs", "err_ratio"):
        x, y = getattr(a, name).value, getattr(b, name).value
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)
    assert (a.calls, a.min_n, a.min_batch) == (b.calls, b.min_n, b.min_batch)


@pytest.mark.parametrize("n", [1, 2, 640])
def test_add_batches_is_k_add_batch(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    means = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 3 + 1
    variances = torch.rand(7, 5, generator=gen, dtype=torch.float64) * 2
    one, many = RegimeStats(), RegimeStats()
    one.add_batch(n, 4, means[0], variances[0])  # something there already: a merge
    many.add_batch(n, 4, means[0], variances[0])
    for k in range(1, 7):
        one.add_batch(n, 3, means[k], variances[k])
    many.add_batches(n, 3, means[1:], variances[1:])
    assert_same_regime(many, one)


def test_rows_fold_each_kind_as_one_call_at_a_time() -> None:
    """Rows of both regimes and two batch sizes, with update checks, folded in small blocks."""
    gen = torch.Generator().manual_seed(0)
    c = 6
    old_mean = torch.randn(c, generator=gen, dtype=torch.float64)
    old_var = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    check = rows.UpdateCheck(old_mean, old_var, 0.1, 1e-5, torch.float32)
    kept, direct = LayerStats(), LayerStats()
    before = rows.RESULT_VALUES
    rows.RESULT_VALUES = 5 * c * 6  # a fold every 6 calls
    try:
        r = rows.Rows(c, check)
        for i in range(20):
            train, n, batch = i % 2 == 0, (64 if i < 13 else 48), (16 if i < 13 else 12)
            mean = torch.randn(c, generator=gen, dtype=torch.float64)
            var = torch.rand(c, generator=gen, dtype=torch.float64)
            err, ratio = var * 1e-7, var * 0.1
            got = F.running_update(old_mean, old_var, mean, var, n, 0.1, 0)[:2]
            update = [t.float() for t in got] if train else None
            r.add(kept, (train, n, batch, 0.0), (mean, var, err, ratio), update)
            regime = direct.train if train else direct.eval
            regime.err_abs.add(err)
            regime.err_ratio.add(ratio)
            regime.add_batch(n, batch, mean, var)
            if update is not None:
                direct.update.add(
                    *F.update_residuals(
                        old_mean, old_var, mean, var, n, 0.1, update[0].double(),
                        update[1].double(), 1e-5, torch.float32,
                    )
                )  # fmt: skip
        r.fold(kept)
    finally:
        rows.RESULT_VALUES = before
    assert_same_regime(kept.train, direct.train)
    assert_same_regime(kept.eval, direct.eval)
    for f in dataclasses.fields(direct.update):
        a, b = getattr(kept.update, f.name), getattr(direct.update, f.name)
        if f.name == "count_errors":
            assert a == b
        else:
            torch.testing.assert_close(a.value, b.value, rtol=1e-12, atol=0)
