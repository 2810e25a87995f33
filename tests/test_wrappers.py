"""Checkpoints of wrapped models: SWA's AveragedModel, torch.compile, DDP, timm EMA, Lightning.

Each state dict is the wrapper's own `state_dict()`, or keys laid out exactly as it lays them
out where building the wrapper needs more than a test has (a process group, a compiler).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from typer.testing import CliRunner

from bnaudit.cli import app
from bnaudit.demo import PLANTED_LAYER, make_images, plant_stale
from tests import nets

DEMO_SPEC = "bnaudit.demo:build_model"
MLP_SPEC = f"{Path(nets.__file__).resolve()}:build_mlp"
MLP_LAYERS = ["1", "4", "7", "10"]
SWA_NOTE = "torch.optim.swa_utils.AveragedModel checkpoint (n_averaged = 2)"

runner = CliRunner()


def check(*args: object) -> Any:
    return runner.invoke(app, ["check", *map(str, args), "-f", "json"])


def findings(doc: dict[str, Any]) -> dict[str, set[str]]:
    return {r["name"]: {f["code"] for f in r["findings"]} for r in doc["layers"]}


class Holder(nn.Module):
    """A wrapper that holds the model under one attribute name, as the real ones do:
    torch.compile's OptimizedModule (`_orig_mod`), DDP and timm ModelEmaV2/V3 (`module`)."""

    def __init__(self, attr: str, model: nn.Module) -> None:
        super().__init__()
        self.add_module(attr, model)


@pytest.fixture
def swa(healthy_cnn: nn.Module) -> AveragedModel:
    """SWA over two differently trained copies of the demo CNN, without update_bn.

    The second copy's layer2.conv1 is rescaled (fine-tuned, in effect), so the averaged conv
    is 1.25-2x the first's while every BN keeps the first copy's statistics: the BN right
    behind it is stale, exactly what update_bn exists for.
    """
    other = copy.deepcopy(healthy_cnn)
    plant_stale(other)
    averaged = AveragedModel(healthy_cnn)
    averaged.update_parameters(healthy_cnn)
    averaged.update_parameters(other)
    assert int(averaged.n_averaged) == 2
    return averaged


@pytest.fixture
def images(tmp_path: Path) -> Path:
    path = tmp_path / "calib.pt"
    torch.save(make_images(2 * 32, seed=3), path)
    return path


def test_averaged_model_with_stale_bn_fails_on_the_layer(
    swa: AveragedModel, images: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "swa.pt"
    torch.save(swa.state_dict(), ckpt)
    result = check(ckpt, "--model", DEMO_SPEC, "--data", images)
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    stale = {name for name, codes in findings(doc).items() if "stale-stats" in codes}
    assert stale == {PLANTED_LAYER}  # named without the wrapper's `module.`
    notes = doc["summary"]["notes"]
    assert any(n.startswith(SWA_NOTE) and "update_bn" in n for n in notes), notes
    assert any("'module.'" in n and "AveragedModel" in n for n in notes), notes


def test_averaged_model_audits_statically(swa: AveragedModel, tmp_path: Path) -> None:
    ckpt = tmp_path / "swa.pt"
    torch.save(swa.state_dict(), ckpt)
    result = check(ckpt)
    assert result.exit_code == 0, result.output  # staleness needs data
    doc = json.loads(result.stdout)
    assert PLANTED_LAYER in findings(doc) and not any(
        n.startswith("module.") for n in findings(doc)
    )
    assert any(n.startswith(SWA_NOTE) for n in doc["summary"]["notes"])


def _swa_of_compiled(model: nn.Module) -> dict[str, torch.Tensor]:
    """AveragedModel(torch.compile(model)): keys `n_averaged`, `module._orig_mod.*`."""
    averaged = AveragedModel(Holder("_orig_mod", model))
    averaged.update_parameters(averaged.module)
    return averaged.state_dict()


def _compiled_ddp(model: nn.Module) -> dict[str, torch.Tensor]:
    """torch.compile(DDP(model)): `_orig_mod.module.*`."""
    return Holder("_orig_mod", Holder("module", model)).state_dict()


def _lightning_swa(model: nn.Module) -> dict[str, Any]:
    """A Lightning module with an AveragedModel as `model`: `model.n_averaged`, `model.module.*`."""
    averaged = AveragedModel(model)
    averaged.update_parameters(model)
    return {"epoch": 3, "state_dict": Holder("model", averaged).state_dict()}


def _timm_ema(model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ModelEmaV3(model).state_dict(): `self.module = deepcopy(model)`, nothing else."""
    return Holder("module", copy.deepcopy(model)).state_dict()


@pytest.mark.parametrize(
    ("save", "prefix", "says", "averaged"),
    [
        (_swa_of_compiled, "module._orig_mod.", ["AveragedModel", "torch.compile"], True),
        (_compiled_ddp, "_orig_mod.module.", ["torch.compile", "DDP"], False),
        (_lightning_swa, "model.module.", ["Lightning", "AveragedModel"], True),
        (_timm_ema, "module.", ["ModelEmaV2/V3"], False),
    ],
)
def test_wrapper_combinations_are_recognised(
    healthy_mlp: nn.Module,
    tmp_path: Path,
    save: Any,
    prefix: str,
    says: list[str],
    averaged: bool,
) -> None:
    ckpt = tmp_path / "wrapped.pt"
    torch.save(save(healthy_mlp), ckpt)
    for extra in ([], ["--model", MLP_SPEC]):
        result = check(ckpt, *extra)
        assert result.exit_code == 0, (extra, result.output)
        doc = json.loads(result.stdout)
        assert [r["name"] for r in doc["layers"]] == MLP_LAYERS, extra
        notes = doc["summary"]["notes"]
        wrapper = [n for n in notes if n.startswith(f"wrapper prefix {prefix!r}")]
        assert len(wrapper) == 1 and all(w in wrapper[0] for w in says), (extra, notes)
        assert wrapper[0].index(says[0]) <= wrapper[0].index(says[-1])  # the outer one first
        swa_notes = [n for n in notes if "n_averaged = 1" in n]
        assert len(swa_notes) == int(averaged), (extra, notes)


def test_a_model_that_is_itself_an_averaged_model_loads_as_is(
    healthy_mlp: nn.Module, tmp_path: Path
) -> None:
    """--model building the AveragedModel takes `n_averaged` as its own buffer."""
    factory = tmp_path / "swa_model.py"
    factory.write_text(
        "from torch.optim.swa_utils import AveragedModel\n\nfrom tests.nets import build_mlp\n\n\n"
        "def build():\n    return AveragedModel(build_mlp())\n"
    )
    averaged = AveragedModel(healthy_mlp)
    averaged.update_parameters(healthy_mlp)
    torch.save(averaged.state_dict(), tmp_path / "swa.pt")
    result = check(tmp_path / "swa.pt", "--model", f"{factory}:build")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["name"] for r in doc["layers"]] == [f"module.{n}" for n in MLP_LAYERS]
    assert not any("n_averaged" in n for n in doc["summary"]["notes"])


def test_recalibrate_keeps_the_averaged_model_container(
    swa: AveragedModel, images: Path, tmp_path: Path
) -> None:
    src, out = tmp_path / "swa.pt", tmp_path / "fixed.pt"
    saved = swa.state_dict()
    torch.save(saved, src)
    result = runner.invoke(
        app, ["recalibrate", str(src), "--model", DEMO_SPEC, "--data", str(images), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    fixed = torch.load(out, weights_only=True)
    assert list(fixed) == list(saved)  # `module.` keys and n_averaged, in the same order
    assert fixed["n_averaged"].dtype == saved["n_averaged"].dtype
    assert int(fixed["n_averaged"]) == 2
    changed = {k for k, v in saved.items() if not torch.equal(v, fixed[k])}
    assert f"module.{PLANTED_LAYER}.running_mean" in changed
    assert all(
        k.rpartition(".")[2] in {"running_mean", "running_var", "num_batches_tracked"}
        for k in changed
    )
    AveragedModel(nets.build_cnn()).load_state_dict(fixed, strict=True)
    gate = check(out, "--model", DEMO_SPEC, "--data", images)
    assert gate.exit_code == 0, gate.output
