"""Consecutive passes measured in one kernel call (`bnaudit.measure.grouped` blocks) and
recalibration values merged K at a time (`bnaudit.measure.impact`): the same results as one pass,
one call at a time."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

import bnaudit
from bnaudit.measure import grouped, impact
from bnaudit.recalibrate.recalibration import recalibrate
from tests import nets
from tests.test_fast_paths import assert_same_report, grouping, mixed_model


@contextlib.contextmanager
def blocks(values: int) -> Iterator[None]:
    before = grouped.BLOCK_VALUES
    grouped.BLOCK_VALUES = values
    try:
        yield
    finally:
        grouped.BLOCK_VALUES = before


def uneven_batches() -> list[Tensor]:
    """Batch sizes that change and come back (each change starts other groups), one Inf."""
    data = nets.mlp_data(102, seed=7)
    sizes = [16, 16, 10, 16, 16, 12, 16]
    batches = list(torch.split(data, sizes))
    batches[4] = batches[4].clone()
    batches[4][3, 2] = math.inf  # this pass's blocks miss: measured pass by pass, then alone
    return batches


@pytest.mark.parametrize("inf", [False, True])
def test_blocks_measure_as_one_pass_at_a_time(inf: bool) -> None:
    model = mixed_model()
    batches = uneven_batches()
    if not inf:
        batches[4] = torch.nan_to_num(batches[4], posinf=0.0)
    with blocks(1):  # every block one pass: the grouping of each pass on its own
        per_pass = bnaudit.audit(model, batches)
    with grouping(0):  # no groups at all: every call in its own hook
        alone = bnaudit.audit(model, batches)
    kept = bnaudit.audit(model, batches)
    assert_same_report(kept, per_pass)
    assert_same_report(kept, alone)
    assert kept.layer("shared").metrics.seen.calls == 2 * len(batches)
    assert (kept.layer("plain").metrics.seen.nonfinite_inputs > 0) == inf


def test_blocks_are_released_after_the_passes() -> None:
    model = mixed_model()
    seen: list[grouped.Deferred] = []
    finish = grouped.Deferred.finish

    def spy(self: grouped.Deferred) -> None:
        seen.append(self)
        finish(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grouped.Deferred, "finish", spy)
        bnaudit.audit(model, uneven_batches())
    (deferred,) = seen
    assert deferred.blocks == {} and deferred.values == 0 and deferred.groups == {}


@pytest.mark.parametrize("kept", [1, impact.KEPT_VALUES])
def test_recalibration_merges_k_at_a_time_as_one_at_a_time(kept: int) -> None:
    """K values merged at once (`Moments.add_values`) against the running-stat update."""
    model = mixed_model()
    batches = [b for b in uneven_batches() if torch.isfinite(b).all()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(impact, "KEPT_VALUES", kept)  # 1: merged after every call
        got = recalibrate(model, batches)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(impact, "KEPT_VALUES", 1)
        one = recalibrate(model, batches)
    assert got.stats.keys() == one.stats.keys()
    for name, (mean, var) in got.stats.items():
        torch.testing.assert_close(mean, one.stats[name][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, one.stats[name][1], rtol=1e-12, atol=1e-12)
