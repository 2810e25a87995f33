"""Fold pairs are the dataflow seen on the first batch, not module order (issue 11).

`tests.nets.GatedNet` declares conv, BN, ReLU in that order, as most code does, but its forward
decides what runs between each conv and its BN, behind an input check torch.fx cannot trace.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from bnaudit import audit
from bnaudit.cli import app
from bnaudit.measure.fold import check_folds
from tests import nets

FOLD_CODES = {"fold-mismatch", "fold-risk"}
RELU_FIRST = f"{Path(nets.__file__).resolve()}:build_relu_first"
RELU_BOTH = f"{Path(nets.__file__).resolve()}:build_relu_both"
WHY_RELU = "bn1: its input is not the output of conv1 (an operation between them: relu)"


def healthy(model: nn.Module, batches: int = 100) -> nn.Module:
    torch.manual_seed(0)
    nets.calibrate(model, nets.make_images(nets.TRAIN_BATCH * batches, seed=1), nets.TRAIN_BATCH)
    return model.eval()


def images(count: int = 4) -> list[Tensor]:
    return list(torch.split(nets.make_images(nets.TRAIN_BATCH * count, seed=11), nets.TRAIN_BATCH))


@pytest.fixture(scope="module")
def relu_first() -> nn.Module:
    return healthy(nets.build_relu_first())


def test_untraceable_conv_relu_bn_is_not_judged_as_a_fold(relu_first: nn.Module) -> None:
    report = audit(relu_first, images())
    assert not {f.code for f in report.findings} & FOLD_CODES
    assert report.layer("bn1").metrics.fold.into == ""
    bn2 = report.layer("bn2").metrics
    assert bn2.fold.into == "conv2" and bn2.fold.checked and bn2.fold.ratio < 1
    assert report.passed
    (note,) = [n for n in report.notes if n.startswith("fold pairs")]
    assert note.startswith("fold pairs by observed dataflow on the first batch: 1 of 2 BN layers")
    assert "torch.fx could not trace" in note and WHY_RELU in note


@pytest.mark.parametrize(
    ("between", "why"),
    [
        ("none", ""),
        ("dropout", ""),  # eval-mode dropout hands back the tensor itself
        ("shape", ""),  # reading the shape is not a use of the values
        ("relu", "its input is not the output of conv1 (an operation between them: relu)"),
        ("inplace", "(an operation between them: the tensor changed in place by relu)"),
        ("relu_", "(an operation between them: the tensor changed in place by relu_)"),
        ("side", "conv1's output is also used by side: folding would change it"),
        ("residual", "conv1's output is also used by add: folding would change it"),
    ],
)
def test_what_sits_between_conv1_and_bn1_decides_the_pair(between: str, why: str) -> None:
    pairs, checks = check_folds(nets.GatedNet(between, "none").eval(), images(1)[0])
    paired = {p.bn: p.conv for p in pairs.pairs}
    assert paired.get("bn2") == "conv2" and checks["bn2"].checked
    if why:
        assert "bn1" not in paired and "bn1" not in checks
        assert why in dict(pairs.skipped)["bn1"]
    else:
        assert paired.get("bn1") == "conv1" and checks["bn1"].ratio < 1 and not pairs.skipped


def test_in_place_relu_keeps_the_tensor_object_but_is_not_a_pair() -> None:
    """What the version counter is for: BN gets the very object the conv returned."""
    model = nets.GatedNet("inplace", "none").eval()
    seen: dict[str, Tensor] = {}
    hooks = [
        model.conv1.register_forward_hook(lambda m, a, out: seen.setdefault("conv", out)),
        model.bn1.register_forward_pre_hook(lambda m, a: seen.setdefault("bn", a[0])),
    ]
    try:
        pairs, _ = check_folds(model, images(1)[0])
    finally:
        for h in hooks:
            h.remove()
    assert seen["bn"] is seen["conv"]
    assert "bn1" in dict(pairs.skipped) and [p.bn for p in pairs.pairs] == ["bn2"]
    report = audit(healthy(nets.GatedNet("inplace", "none"), batches=20), images(2))
    assert report.layer("bn1").metrics.fold.into == ""
    assert not {f.code for f in report.findings} & FOLD_CODES


def test_pairs_follow_the_data_not_the_registration_order() -> None:
    class Reordered(nn.Module):  # module order would pair conv2 with bn1 and conv1 with bn2
        def __init__(self) -> None:
            super().__init__()
            self.conv2, self.bn1 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
            self.conv1, self.bn2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x: Tensor) -> Tensor:
            if not torch.isfinite(x).all():  # torch.fx cannot trace this
                raise ValueError("non-finite input")
            return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    report = audit(healthy(Reordered(), batches=20), images(2))
    assert {r.name: r.metrics.fold.into for r in report.layers} == {"bn1": "conv1", "bn2": "conv2"}
    assert all(r.metrics.fold.checked and r.metrics.fold.ratio < 1 for r in report.layers)
    assert not {f.code for f in report.findings} & {"fold-mismatch"}


# --- the commands ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relu_first_files(relu_first: nn.Module, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("relu_first")
    ckpt, data = folder / "model.pt", folder / "calib.pt"
    torch.save(relu_first.state_dict(), ckpt)
    torch.save(nets.make_images(nets.TRAIN_BATCH * 4, seed=11), data)
    return ckpt, data


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_check_recalibrate_and_show_pass_on_a_healthy_relu_first_net(
    relu_first_files, tmp_path: Path
) -> None:
    ckpt, data = relu_first_files
    check = run("check", ckpt, "--model", RELU_FIRST, "--data", data)
    assert check.exit_code == 0, check.output
    # The notes are wrapped to the terminal's width: compare with the line breaks undone.
    assert "fold-mismatch" not in check.stdout and WHY_RELU in " ".join(check.stdout.split())
    fixed = tmp_path / "fixed.pt"
    recal = run("recalibrate", ckpt, "--model", RELU_FIRST, "--data", data, "-o", fixed)
    assert recal.exit_code == 0, recal.output
    show = run("show", ckpt, "--model", RELU_FIRST, "--data", data, "--layer", "bn1")
    assert show.exit_code == 0, show.output
    assert "verdict: " in show.stdout and "verdict: fail" not in show.stdout


def test_fold_says_why_a_bn_is_not_folded(relu_first_files, tmp_path: Path) -> None:
    ckpt, data = relu_first_files
    out = tmp_path / "folded.pt"
    result = run("fold", ckpt, "--model", RELU_FIRST, "--data", data, "-o", out)
    assert result.exit_code == 0, result.output
    assert "folded bn2 into conv2\n" in result.stdout
    assert f"not folded {WHY_RELU}\n" in result.stdout and "1 pairs" in result.stdout
    saved = torch.load(out, weights_only=True)["bnaudit_fold"]
    assert saved["pairs"] == [["conv2", "bn2"]] and "relu" in saved["not_folded"]["bn1"]


def test_fold_refuses_when_no_pair_can_be_folded(relu_first_files, tmp_path: Path) -> None:
    ckpt, data = relu_first_files  # the same keys: build_relu_both only runs them differently
    out = tmp_path / "folded.pt"
    result = run("fold", ckpt, "--model", RELU_BOTH, "--data", data, "-o", out)
    assert result.exit_code == 2 and not out.exists()
    (message,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert "no conv/linear -> BatchNorm pair to fold" in message
    assert WHY_RELU in message
    assert "bn2: its input is not the output of conv2 (an operation between them: relu)" in message
