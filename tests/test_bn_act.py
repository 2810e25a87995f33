"""timm-style BatchNormAct2d, measured at the input of its `drop`/`act` child.

The class below copies timm's forward (its own running-stat update, `F.batch_norm`, then
dropout and an in-place activation). References: the same network with a plain BatchNorm2d and
the activation as a separate module (its BN sees the same input and makes the same normalised
value, so every metric must agree), and the general float64 path for the fast one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnaudit
from bnaudit import Severity
from bnaudit.demo import calibrate, make_images
from tests.test_fast_paths import assert_same_report, general_only, grouping


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d forward; `eps_used` plants a wrong eps (as a port might)."""

    def __init__(self, c: int, act: nn.Module, drop: nn.Module | None = None) -> None:
        super().__init__(c)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act
        self.eps_used: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        eps = self.eps if self.eps_used is None else self.eps_used
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, factor, eps
        )
        return self.act(self.drop(x))


class Net(nn.Module):
    """conv → norm(+act) → conv → norm(+act) → conv; the norms chosen by the test."""

    def __init__(self, norm, channels_last: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = norm(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.norm2 = norm(12)
        self.head = nn.Conv2d(12, 4, 1)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.norm2(self.conv2(self.norm1(self.conv1(x)))))


ACTS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "identity": nn.Identity,
}


def pair(act: str, channels_last: bool = False) -> tuple[nn.Module, nn.Module]:
    """(BatchNormAct model, the same weights with BatchNorm2d followed by the activation)."""
    torch.manual_seed(0)
    fused = Net(lambda c: TimmBatchNormAct2d(c, ACTS[act]()), channels_last)
    calibrate(fused, make_images(32 * 20, seed=1), 32)
    plain = Net(lambda c: nn.Sequential(nn.BatchNorm2d(c), ACTS[act]()), channels_last)
    state = {
        k.replace("norm1.", "norm1.0.").replace("norm2.", "norm2.0."): v
        for k, v in fused.state_dict().items()
    }
    plain.load_state_dict(state)
    return fused.eval(), plain.eval()


def images(count: int = 3, size: int = 12) -> list[Tensor]:
    return list(torch.split(make_images(16 * count, seed=7, size=size), 16))


def assert_same_metrics(got: bnaudit.AuditReport, want: bnaudit.AuditReport) -> None:
    names = {"norm1": "norm1.0", "norm2": "norm2.0"}
    for name, other in names.items():
        g, w = got.layer(name).metrics, want.layer(other).metrics
        got_flat = g.flat()
        for field, b in w.flat().items():
            a = got_flat[field]
            if field in ("measured_at", "fold_with", "fold_checked") or (
                field.startswith("fold_") or field == "folded_weight_max"
            ):
                continue  # a BatchNormAct never folds; measured_at is the point of the test
            if isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (name, field, a, b)
            elif not isinstance(b, float):
                assert a == b, (name, field, a, b)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_bn_act_measures_as_bn_then_act(act: str, channels_last: bool) -> None:
    fused, plain = pair(act, channels_last)
    batches = images()
    got, want = bnaudit.audit(fused, batches), bnaudit.audit(plain, batches)
    assert_same_metrics(got, want)
    for name in ("norm1", "norm2"):
        r = got.layer(name)
        assert r.metrics.seen.measured_at == "input of drop"
        assert r.metrics.train.recon.ratio < 1 and r.metrics.eval.recon.ratio < 1
        # The same verdicts as BatchNorm2d, plus this one.
        codes = [(f.code, f.severity) for f in r.findings]
        extra = ("nonstandard-forward", Severity.INFO)
        assert extra in codes
        codes.remove(extra)
        assert codes == [(f.code, f.severity) for f in want.layer(f"{name}.0").findings]


@pytest.mark.parametrize("act", sorted(ACTS))
def test_bn_act_fast_path_is_the_general_path(act: str) -> None:
    fused, _ = pair(act)
    for size in (12, 48):  # 12: small activations, measured in groups; 48: in the hooks
        batches = images(size=size)
        fast = bnaudit.audit(fused, batches)
        with grouping(0), general_only():
            general = bnaudit.audit(fused, batches)
        assert_same_report(fast, general)


def test_bn_act_with_dropout_in_train_mode_all() -> None:
    """train_mode="all" turns the dropout on: the tap before it still reads the normalisation."""
    torch.manual_seed(0)
    model = Net(lambda c: TimmBatchNormAct2d(c, nn.ReLU(inplace=True), nn.Dropout(0.5)))
    calibrate(model, make_images(32 * 20, seed=1), 32)
    model.eval()
    torch.manual_seed(3)
    report = bnaudit.audit(model, images(), train_mode="all")
    for name in ("norm1", "norm2"):
        m = report.layer(name).metrics
        assert m.seen.measured_at == "input of drop" and m.train.recon.ratio < 1
    assert not model.training and not model.norm1.drop.training  # modes put back


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_planted_eps_inside_bn_act_is_diagnosed(act: str) -> None:
    """A wrong eps ahead of the activation: read before the activation, it is named as eps."""
    fused, _ = pair(act)
    with torch.no_grad():
        fused.norm1.running_var.mul_(1e-3)  # small variances: an eps ×10 shows
    fused.norm1.eps_used = fused.norm1.eps * 10
    report = bnaudit.audit(fused, images())
    m = report.layer("norm1").metrics
    assert m.eval.recon.ratio > 1
    assert m.eval.recon.explanation_key == "eps" and m.eval.recon.explanation_ratio <= 1
    codes = {f.code: f for f in report.layer("norm1").findings}
    assert codes["nonstandard-forward"].severity == Severity.WARN
    assert "recon-eval" in codes
    # norm2 is untouched and stays exact.
    assert report.layer("norm2").metrics.eval.recon.ratio < 1
    with grouping(0), general_only():
        assert_same_report(report, bnaudit.audit(fused, images()))


def test_tap_not_called_falls_back_to_the_output() -> None:
    """A layer with drop/act children whose forward skips them: measured at its output."""

    class Skips(TimmBatchNormAct2d):
        def forward(self, x: Tensor) -> Tensor:
            return nn.BatchNorm2d.forward(self, x)

    torch.manual_seed(0)
    model = Net(lambda c: Skips(c, nn.ReLU()))
    calibrate(model, make_images(32 * 10, seed=1), 32)
    report = bnaudit.audit(model.eval(), images())
    m = report.layer("norm1").metrics
    assert m.seen.measured_at == "" and m.seen.calls == 3 and m.train.recon.ratio < 1
    found = {f.code: f for f in report.layer("norm1").findings}
    assert "still computes plain BN" in found["nonstandard-forward"].message


class ActOnly(nn.BatchNorm2d):
    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__(c)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


def test_shared_activation_module_is_measured_once_per_call() -> None:
    """One activation module used by both norms and after them: each norm's own calls only."""
    torch.manual_seed(0)
    shared = nn.ReLU()
    model = nn.Sequential(Net(lambda c: ActOnly(c, shared)), shared)
    calibrate(model, make_images(32 * 10, seed=1), 32)
    report = bnaudit.audit(model.eval(), images())
    for name in ("0.norm1", "0.norm2"):
        m = report.layer(name).metrics
        assert m.seen.calls == 3 and m.seen.measured_at == "input of act" and m.eval.recon.ratio < 1
