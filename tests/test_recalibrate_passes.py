"""`bnaudit.recalibrate` in one train-mode pass per batch gives the audit's precise statistics.

The reference is what recalibration computed before: the statistics the audit's own passes
accumulate (`run_passes` + `recalibrated_stats`), and, for the train regime,
torch.optim.swa_utils.update_bn, the same average.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from bnaudit.check.audit import AuditOptions
from bnaudit.measure.passes import recalibrated_stats, run_passes
from bnaudit.recalibrate.recalibration import recalibrate
from tests import nets


def audit_stats(model: nn.Module, batches, regime: str, train_mode: str = "bn"):
    options = AuditOptions(impact=False, fold=False, regime=regime, train_mode=train_mode)
    passes = run_passes(model, batches, options)
    return recalibrated_stats(passes, regime, model)[0]


def assert_same_stats(got, want) -> None:
    assert set(got) == set(want)
    for name, (mean, var) in want.items():
        torch.testing.assert_close(got[name][0], mean, rtol=1e-6, atol=1e-7)  # float32 buffers
        torch.testing.assert_close(got[name][1], var, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nets.build_cnn()
    nets.calibrate(model, nets.make_images(20 * 16, seed=1), 16)
    return model.eval()


@pytest.mark.parametrize("regime", ["train", "eval"])
@pytest.mark.parametrize("train_mode", ["bn", "all"])
def test_recalibrate_gives_the_audits_statistics(
    cnn: nn.Module, regime: str, train_mode: str
) -> None:
    model = cnn
    batches = list(torch.split(nets.make_images(4 * 16, seed=5), 16))
    before = copy.deepcopy(model.state_dict())
    r = recalibrate(model, batches, regime=regime, train_mode=train_mode)
    assert_same_stats(r.stats, audit_stats(model, batches, regime, train_mode))
    assert r.batches == 4 and set(r.counts.values()) == {4}
    if regime == "train":
        assert r.forward_passes == 4  # one pass per batch, statistics only
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is left as it was


def test_train_regime_equals_update_bn_and_streams_the_batches() -> None:
    torch.manual_seed(0)
    model = nets.build_mlp()
    nets.calibrate(model, nets.mlp_data(20 * 32, seed=1), 32)
    model.eval()
    batches = list(torch.split(nets.mlp_data(5 * 32, seed=7), 32))
    r = recalibrate(model, iter(batches), layers=("4", "7"))  # an iterator: read once
    assert set(r.stats) == {"4", "7"} and r.batches == 5
    reference = copy.deepcopy(model)
    update_bn(batches, reference)
    for name, (mean, var) in r.stats.items():
        bn = reference.get_submodule(name)
        torch.testing.assert_close(mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, bn.running_var, rtol=1e-5, atol=1e-6)


def test_no_verify_writes_the_statistics_of_one_pass_without_auditing(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`recalibrate --no-verify`: the same checkpoint as with the audits, and no audit run."""
    from typer.testing import CliRunner

    from bnaudit.check import run as check
    from bnaudit.cli import app
    from bnaudit.demo import make_demo

    ckpt, data = make_demo(tmp_path / "demo", calib_batches=4)
    common = ["recalibrate", str(ckpt), "--model", "bnaudit.demo:build_model", "--data", str(data)]
    verified = CliRunner().invoke(app, [*common, "-o", str(tmp_path / "a.pt")])
    assert verified.exit_code == 0, verified.output
    audits = [0]
    real = check.audit

    def counting(*args, **kwargs):
        audits[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(check, "audit", counting)
    quick = CliRunner().invoke(app, [*common, "--no-verify", "-o", str(tmp_path / "b.pt")])
    assert quick.exit_code == 0, quick.output
    assert audits[0] == 0 and "not audited: --no-verify" in quick.stdout
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
