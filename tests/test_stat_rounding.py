"""torch's rounded batch statistics on channels-last inputs: allowed for, and nothing more.

torch's CPU kernel sums each channel's values one row after another when the channels are the
innermost dim, so at large N its own batch mean and variance are off by many roundings
(`formulas.stat_rounding`). Before the allowance, a healthy channels-last BatchNorm2d at
N = 401,408 failed `recon-train` and `running-update`. The allowance must cover what torch does
and still let a real mistake through at the same N.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import bnaudit
from bnaudit.core import blocked
from bnaudit.core import formulas as F

U32 = 2.0**-24


def data(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    x = torch.randn(shape, generator=gen)
    if kind == "relu":  # half the terms equal: their roundings do not cancel
        return x.clamp_min(0)
    if kind == "quantised":
        return (x * 16).round() / 16 + 0.3
    return x * 0.5 + 3.0


def torch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """The batch mean and biased variance torch's own kernel computed (momentum 1 copies them)."""
    bn = nn.BatchNorm2d(x.shape[1], momentum=1.0)
    with torch.no_grad():
        bn(x)
    n = F.values_per_channel(x)
    return bn.running_mean.double(), bn.running_var.double() * (n - 1) / n


@pytest.mark.parametrize("kind", ["normal", "relu", "quantised"])
def test_the_bound_covers_torchs_channels_last_statistics(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = data(kind, (64, 4, 56, 56), gen).contiguous(memory_format=torch.channels_last)
    assert F.sums_rows_in_order(x) and F.sum_roundoff(x) == U32
    mean, var = F.batch_stats(x.double())
    got_mean, got_var = torch_stats(x)
    d_mean, d_var = F.stat_rounding(F.values_per_channel(x), mean, var, U32)
    assert bool(((got_mean - mean).abs() <= d_mean).all())
    assert bool(((got_var - var).abs() <= d_var).all())
    # Not vacuous: torch's error is far above one rounding of the result.
    assert float(((got_var - var).abs() / (U32 * var)).max()) > 10


def test_nchw_sums_need_no_allowance() -> None:
    """The contiguous kernel's statistics are within a few roundings: no allowance there."""
    gen = torch.Generator().manual_seed(1)
    x = data("relu", (64, 4, 56, 56), gen)
    assert not F.sums_rows_in_order(x) and F.sum_roundoff(x) == 0.0
    mean, var = F.batch_stats(x.double())
    got_mean, got_var = torch_stats(x)
    assert float(((got_var - var).abs() / (U32 * var)).max()) < 64
    assert float(((got_mean - mean).abs() / (U32 * (var + mean**2).sqrt())).max()) < 64


def test_layouts_that_sum_in_order() -> None:
    assert F.sums_rows_in_order(torch.zeros(8, 3))
    assert F.sums_rows_in_order(torch.zeros(8, 3, 1, 1))
    assert F.sums_rows_in_order(torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last))
    cl3d = torch.zeros(2, 3, 2, 4, 4).to(memory_format=torch.channels_last_3d)
    assert F.sums_rows_in_order(cl3d)
    assert not F.sums_rows_in_order(torch.zeros(2, 3, 4, 4))
    assert not F.sums_rows_in_order(torch.zeros(2, 3, 5))
    assert F.sum_roundoff(torch.zeros(8, 3, dtype=torch.float64)) == 2.0**-53
    assert F.sum_roundoff(torch.zeros(8, 3, dtype=torch.bfloat16)) == U32


class LooseEps(nn.BatchNorm2d):
    """Normalises with ε = 0.1 whatever its attribute says (a port that hard-codes ε)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            0.1 if self.momentum is None else self.momentum, 0.1,
        )  # fmt: skip


def large_channels_last(layer: nn.Module) -> tuple[nn.Module, list[Tensor]]:
    """One BN layer calibrated on two post-ReLU channels-last batches of N = 401,408."""
    gen = torch.Generator().manual_seed(2)
    batches = [
        data("relu", (32, 2, 112, 112), gen).contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    ]
    model = nn.Sequential(layer)
    layer.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval(), batches


def test_healthy_channels_last_layer_at_large_n_passes() -> None:
    model, batches = large_channels_last(nn.BatchNorm2d(2))
    # Without the allowance this layer fails: torch's output misses the exact formula.
    x = batches[0]
    bn = model[0]
    mean, var = F.batch_stats(x.double())
    with torch.no_grad():
        y = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    weight, bias = bn.weight.detach().double(), bn.bias.detach().double()
    args = (x, y, mean, var, weight, bias, bn.eps, y.dtype)
    assert float(blocked.reconstruction_error(*args)[1].max()) > 1
    rounding = F.stat_rounding(F.values_per_channel(x), mean, var, U32)
    assert float(blocked.reconstruction_error(*args, rounding)[1].max()) <= 1

    report = bnaudit.audit(model, batches)
    assert [f.code for f in report.findings if f.severity >= bnaudit.Severity.WARN] == []


def test_a_real_mistake_at_the_same_n_still_fails() -> None:
    model, batches = large_channels_last(LooseEps(2))
    report = bnaudit.audit(model, batches)
    codes = {f.code for f in report.findings if f.severity == bnaudit.Severity.FAIL}
    assert "recon-train" in codes
