"""Fold verification and the `fold` and `recalibrate` commands."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from typer.testing import CliRunner

from bnaudit import Severity, audit
from bnaudit.cli import app
from bnaudit.core import formulas as F
from bnaudit.demo import PLANTED_LAYER, build_model, make_demo, make_images
from bnaudit.measure.fold import check_folds, fold_model
from tests.test_variants import ConvNet, FrozenBatchNorm2d, calibrated, images


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def randomised_bn(bn: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(bn.weight.shape, generator=gen))
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.05)
    return bn.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_fold_formula_matches_torch(bias: bool) -> None:
    conv, bn = nn.Conv2d(3, 6, 3, bias=bias).double().eval(), randomised_bn(nn.BatchNorm2d(6))
    bn = bn.double()
    fused = fuse_conv_bn_eval(conv, bn)
    w, b = F.fold(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
    )
    torch.testing.assert_close(w, fused.weight.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, fused.bias.detach(), rtol=1e-12, atol=1e-12)
    lin, bn1 = nn.Linear(4, 6).double().eval(), randomised_bn(nn.BatchNorm1d(6)).double()
    fused = fuse_linear_bn_eval(lin, bn1)
    w, b = F.fold(
        lin.weight, lin.bias, bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, bn1.eps
    )
    torch.testing.assert_close(w, fused.weight.detach(), rtol=1e-12, atol=1e-12)


def test_demo_pairs_are_observed() -> None:
    pairs, checks = check_folds(build_model(), make_images(4, seed=0))
    assert len(pairs.pairs) == 9 and not pairs.skipped and not pairs.note  # fx traces it
    assert all(c.checked and c.ratio < 1 for c in checks.values())


def test_healthy_folds_match(healthy_cnn: nn.Module) -> None:
    report = audit(healthy_cnn, images(count=2))
    for r in report.layers:
        assert r.metrics.fold.into and r.metrics.fold.checked, r.name
        assert r.metrics.fold.ratio < 1, r.name
    assert not {f.code for f in report.findings} & {"fold-mismatch", "fold-risk"}


def test_fold_mismatch_when_the_layer_is_not_the_eval_formula() -> None:
    class NoEpsFrozen(FrozenBatchNorm2d):  # what it computes is not what a fold bakes in
        def forward(self, x: Tensor) -> Tensor:
            scale = (self.weight * self.running_var.rsqrt()).reshape(1, -1, 1, 1)
            return (x - self.running_mean.reshape(1, -1, 1, 1)) * scale + self.bias.reshape(
                1, -1, 1, 1
            )

    torch.manual_seed(0)
    source = calibrated(ConvNet(nn.BatchNorm2d), batches=30)
    with torch.no_grad():
        source.norm2.running_var.mul_(1e-4)
    model = ConvNet(NoEpsFrozen)
    model.load_state_dict({k: v for k, v in source.state_dict().items() if "num_b" not in k})
    report = audit(model.eval(), images(count=2))
    # Both layers forget eps; the fold (which keeps it) misses most where the variance is tiny.
    assert {f.layer for f in report.findings if f.code == "fold-mismatch"} == {"norm1", "norm2"}
    ratio = {r.name: r.metrics.fold.ratio for r in report.layers}
    assert ratio["norm2"] > 10 * ratio["norm1"] > 10


def test_fold_risk_float16_and_int8() -> None:
    torch.manual_seed(0)
    model = calibrated(ConvNet(nn.BatchNorm2d), batches=30)
    with torch.no_grad():
        model.norm1.weight[0] = 3e4  # one channel folded far beyond the others: int8 risk
        model.norm2.weight[1] = 1e3
        model.norm2.running_var[1] = 1e-7  # and a fold scale of ~3e5: float16 overflow
    report = audit(model, images(count=2))
    risky = {f.layer: f for f in report.findings if f.code == "fold-risk"}
    assert set(risky) == {"norm1", "norm2"}
    assert "int8" in risky["norm1"].message and "float16" in risky["norm2"].message
    assert all(f.severity == Severity.WARN for f in risky.values())


# --- the commands ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_demo(tmp_path_factory.mktemp("demo"), calib_batches=6)


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


SPEC = "bnaudit.demo:build_model"


def test_fold_command_writes_a_checked_folded_model(demo, tmp_path: Path) -> None:
    ckpt, data = demo
    before = sha(ckpt)
    out = tmp_path / "folded.pt"
    result = run("fold", ckpt, "--model", SPEC, "--data", data, "-o", out)
    assert result.exit_code == 0, result.output
    assert "9 pairs (found by observed dataflow on the first batch)" in result.stdout
    assert "not folded" not in result.stdout and sha(ckpt) == before
    saved = torch.load(out, weights_only=True)
    assert len(saved["bnaudit_fold"]["pairs"]) == 9
    model = build_model()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    x = torch.load(data)[:8]
    pairs, _ = check_folds(model, x)
    folded = fold_model(model, pairs)
    folded.load_state_dict(saved["state_dict"], strict=True)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    again = run("fold", ckpt, "--model", SPEC, "--data", data, "-o", out)
    assert again.exit_code == 2 and "--force" in again.stderr


def test_recalibrate_fixes_the_planted_layer(demo, tmp_path: Path) -> None:
    ckpt, data = demo
    before = sha(ckpt)
    out = tmp_path / "fixed.pt"
    result = run("recalibrate", ckpt, "--model", SPEC, "--data", data, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"{PLANTED_LAYER}" in result.stdout and "fail -> " in result.stdout
    assert sha(ckpt) == before
    model = build_model()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    gate = run("check", out, "--model", SPEC, "--data", data, "--max-output-change", "0.05")
    assert gate.exit_code == 0, gate.output
    assert run("recalibrate", ckpt, "--model", SPEC, "--data", data, "-o", ckpt).exit_code == 2


def test_recalibrate_keeps_a_lightning_container(demo, tmp_path: Path) -> None:
    ckpt, data = demo
    state = torch.load(ckpt, weights_only=True)
    lightning = {
        "epoch": 7,
        "global_step": 700,
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "optimizer_states": [{"lr": 0.1}],
    }
    src, out = tmp_path / "last.ckpt", tmp_path / "fixed.ckpt"
    torch.save(lightning, src)
    result = run(
        "recalibrate", src, "--model", SPEC, "--data", data, "--layers", "layer2.*", "-o", out
    )
    assert result.exit_code == 0, result.output
    fixed = torch.load(out, weights_only=True)
    assert fixed.keys() == lightning.keys() and fixed["epoch"] == 7
    assert fixed["optimizer_states"] == [{"lr": 0.1}]
    changed = {
        k for k, v in lightning["state_dict"].items() if not torch.equal(v, fixed["state_dict"][k])
    }
    assert f"model.{PLANTED_LAYER}.running_mean" in changed
    assert all(k.startswith("model.layer2.") for k in changed)
    assert all(
        k.split(".")[-1] in {"running_mean", "running_var", "num_batches_tracked"} for k in changed
    )
