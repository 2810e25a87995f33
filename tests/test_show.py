"""`bnaudit show`: the printed snippet really reproduces each kind of layer, in both modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnaudit.cli import app
from bnaudit.demo import PLANTED_LAYER, TRAIN_BATCHES, make_demo
from bnaudit.show.view import describe, render_layer, snippet
from tests.test_variants import FrozenBatchNorm2d


def run_snippet(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Execute the snippet exactly as printed, then apply its by_hand to x."""
    space: dict = {"model": model}
    exec(snippet(describe(model, name)), space)
    return space["by_hand"](space["bn"], x)


def randomised(layer: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean"):
            t = getattr(layer, key, None)
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen))
        if getattr(layer, "running_var", None) is not None:
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=gen) + 0.1)
    return layer


CASES = {
    "bn1d-2d": (lambda: nn.BatchNorm1d(5), (8, 5)),
    "bn1d-3d": (lambda: nn.BatchNorm1d(5), (8, 5, 7)),
    "bn2d": (lambda: nn.BatchNorm2d(5), (4, 5, 3, 3)),
    "bn3d": (lambda: nn.BatchNorm3d(5), (4, 5, 2, 3, 3)),
    "no-affine": (lambda: nn.BatchNorm2d(5, affine=False), (4, 5, 3, 3)),
    "cumulative": (lambda: nn.BatchNorm2d(5, momentum=None), (4, 5, 3, 3)),
    "no-running-stats": (lambda: nn.BatchNorm2d(5, track_running_stats=False), (4, 5, 3, 3)),
    "instance": (lambda: nn.InstanceNorm2d(5, affine=True, track_running_stats=True), (4, 5, 3, 3)),
    "frozen": (lambda: FrozenBatchNorm2d(5), (4, 5, 3, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_snippet_reproduces_the_layer(case: str, training: bool) -> None:
    make, shape = CASES[case]
    model = nn.Sequential(nn.Identity(), randomised(make())).double().train(training)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = model[1](x)
    torch.testing.assert_close(run_snippet(model, "1", x), expected, rtol=1e-10, atol=1e-10)


def test_formulas_name_the_attributes() -> None:
    model = nn.Sequential(randomised(nn.BatchNorm2d(3, momentum=None)))
    text = render_layer(describe(model, "0"))
    assert "var_b = x.var(dims, unbiased=False)" in text
    assert "1/(bn.num_batches_tracked + 1)" in text  # momentum None: cumulative
    assert "var_b·N/(N−1)" in text and "bn.running_var + bn.eps" in text
    assert "C = 3, eps = 1e-05, momentum = None" in text


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_demo(tmp_path_factory.mktemp("demo"), calib_batches=2)


def test_show_command_with_data(demo_files: tuple[Path, Path]) -> None:
    ckpt, data = demo_files
    args = [
        "show",
        str(ckpt),
        "--model",
        "bnaudit.demo:build_model",
        "--data",
        str(data),
        "--layer",
        PLANTED_LAYER,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"{PLANTED_LAYER}: BatchNorm2d")
    assert f"num_batches_tracked = {TRAIN_BATCHES}" in out
    assert f'bn = model.get_submodule("{PLANTED_LAYER}")' in out
    assert "Measured (2 calls" in out and "stale-stats" in out


def test_show_without_data_has_no_measurements(demo_files: tuple[Path, Path]) -> None:
    ckpt, _ = demo_files
    args = ["show", str(ckpt), "--model", "bnaudit.demo:build_model", "--layer", "stem.1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Measured" not in result.stdout and "def by_hand" in result.stdout


def test_show_unknown_layer_suggests_names(demo_files: tuple[Path, Path]) -> None:
    ckpt, _ = demo_files
    args = ["show", str(ckpt), "--model", "bnaudit.demo:build_model", "--layer", "layer2.bn"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--layer layer2.bn: no BatchNorm layer" in result.stderr
    assert "layer2.bn1" in result.stderr
