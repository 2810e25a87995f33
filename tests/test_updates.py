"""The train-mode updates, read and undone a pass at a time (`bnaudit.measure.updates`).

Every call must start from the checkpoint's statistics and have its own update checked, also
a layer's second call in one forward (read before it runs), a call measured on the general path
in the middle of a pass, and a forward that fails half-way.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import bnaudit
from bnaudit.check.audit import AuditOptions
from bnaudit.core.errors import DataError
from bnaudit.measure.passes import run_passes
from bnaudit.measure.updates import Ledger, Update


class Twice(nn.Module):
    """A conv block whose BN layer runs twice per forward (large activations: its own hook
    measures it), and a small BatchNorm1d head that also runs twice (measured in groups)."""

    def __init__(self, bn: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = bn if bn is not None else nn.BatchNorm2d(8)
        self.head = nn.BatchNorm1d(8, momentum=0.3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x))
        h = self.bn(torch.relu(h) * 2 - 1)  # the same layer again, other statistics
        z = self.head(h.mean((2, 3)))
        return self.head(z + 1)


class Skewed(nn.BatchNorm2d):
    """Updates its running mean with momentum 0.5 while it says 0.1: a planted defect."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.5 / 0.9).add_(x.mean((0, 2, 3)), alpha=0.5 - 0.05 / 0.9)
        return y


def calibrated(model: nn.Module, batches: list[Tensor]) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            for x in batches:
                model(x)
    return model.eval()


def batches(count: int = 4, seed: int = 3) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 24, 24, generator=gen) for _ in range(count)]


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_layer_run_twice_per_forward_has_each_update_checked() -> None:
    data = batches()
    model = calibrated(Twice(), data)
    before = state(model)
    report = bnaudit.audit(model, data)
    for name in ("bn", "head"):
        m = report.layer(name).metrics
        assert m.seen.calls == 2 * len(data)
        # Had the second call started from the first's update, T would be off by one and the
        # update off by a whole momentum step.
        assert m.update.count_errors == 0
        assert m.update.mean_ratio <= 1 and m.update.var_ratio <= 1
        assert "running-update" not in {f.code for f in report.layer(name).findings}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_wrong_update_of_a_layer_run_twice_is_found() -> None:
    data = batches()
    model = calibrated(Twice(Skewed(8)), data)
    report = bnaudit.audit(model, data)
    m = report.layer("bn").metrics
    assert m.update.mean_ratio > 1
    assert "running-update" in {f.code for f in report.layer("bn").findings}
    assert report.layer("head").metrics.update.mean_ratio <= 1


def test_a_call_on_the_general_path_reads_the_update_in_the_middle_of_the_pass() -> None:
    data = batches()
    model = calibrated(Twice(), data)
    data[1] = data[1].clone()
    data[1][0, 0, 0, 0] = math.inf  # bn's calls of this batch take the float64 path
    before = state(model)
    report = bnaudit.audit(model, data)
    bn = report.layer("bn").metrics
    assert bn.seen.nonfinite_inputs > 0
    assert bn.update.count_errors == 0
    assert report.layer("head").metrics.update.count_errors == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class FailsLate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm2d(3)
        self.b = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(self.a(x))
        if self.a.training:
            raise RuntimeError("planted failure after two train-mode updates")
        return h


def test_a_forward_failing_after_updates_leaves_the_statistics_as_they_were() -> None:
    data = batches(2)
    model = FailsLate().eval()
    with torch.no_grad():
        model.a.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.b.running_var.copy_(torch.tensor([2.0, 3.0, 0.5]))
    before = state(model)
    with pytest.raises(DataError):
        bnaudit.audit(model, data)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and not model.a.training


def test_the_ledger_reads_each_update_and_puts_the_checkpoint_back() -> None:
    data = batches(1)
    model = calibrated(Twice(), data)
    passes = run_passes(model, data, AuditOptions(impact=False, fold=False))
    probe = next(p for p in passes.probes if p.name == "bn")
    saved = {k: v.clone() for k, v in probe.saved.items()}
    ledger = Ledger()
    probe.ledger = ledger
    update = Update()
    bn = probe.module
    bn.train()
    with torch.no_grad():
        bn(data[0][:, :3].repeat(1, 3, 1, 1)[:, :8])  # changes the buffers
    expected = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    ledger.hold(probe, update)
    assert probe.holding and not update.ready
    ledger.settle()
    assert update.ready and not probe.holding
    assert torch.equal(update.mean, expected[0]) and torch.equal(update.var, expected[1])
    assert update.count == expected[2] == saved["num_batches_tracked"].item() + 1
    assert all(torch.equal(probe.buffer_table[k], v) for k, v in saved.items())
    bn.eval()
