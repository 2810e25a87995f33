"""`bnaudit check --model timm:NAME --data DIR` with the real timm, end to end, when it is
installed (it is not a dev dependency: CI does not download it; `pip install timm` to run these).

timm imports torchvision. Where torchvision's compiled ops were built for another torch, its
import fails on `operator torchvision::nms does not exist`: the two schemas its Python code
registers fakes for are then defined here, which is all timm's import needs (no op runs).

The checkpoints are calibrated with timm's own evaluation transform (`timm.data.create_transform`
from the model's data config): the audit, which preprocesses with PIL and numpy, must find the
same statistics, so a healthy model passes and only the planted layer fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnaudit.cli import app

BATCH = 8
_KEEP: list[Any] = []  # the stub library lives as long as the imported torchvision


def _define_torchvision_schemas() -> None:
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)


def _import_timm() -> ModuleType:
    with warnings.catch_warnings():  # third-party import-time warnings are not bnaudit's
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module("timm")
        except RuntimeError as exc:
            if "torchvision::" not in str(exc):
                raise
        for name in [n for n in sys.modules if n.split(".")[0] in ("timm", "torchvision")]:
            del sys.modules[name]  # the half-imported packages, imported again below
        _define_torchvision_schemas()
        return importlib.import_module("timm")


@pytest.fixture(scope="module")
def timm() -> ModuleType:
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install timm); CI does not download it")
    return _import_timm()


def image_folder(root: Path, count: int = 16) -> Path:
    """Images of assorted sizes, PNG and JPEG, one folder down (found recursively)."""
    from PIL import Image

    folder = root / "images" / "class_a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(60, 120, 2))
        pixels = rng.uniform(0, 255, 3) + rng.normal(0, 40, (h, w, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root / "images"


def timm_batches(timm: ModuleType, model: nn.Module, folder: Path, size: int | None) -> list:
    """The folder through timm's own evaluation transform, in sorted order, batches of BATCH."""
    from PIL import Image

    config = timm.data.resolve_data_config({}, model=model)
    if size is not None:
        config["input_size"] = (3, size, size)
    transform = timm.data.create_transform(**config)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [transform(Image.open(f).convert("RGB")) for f in files]
    return [torch.stack(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: list) -> None:
    """Running stats = the mean over batches of the train-mode batch statistics (momentum None:
    a cumulative average), as the audit measures them; only BN layers in train mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum, m.training = None, True
    for b in batches:
        model(b)
    for m in bns:
        m.momentum, m.training = 0.1, False
        m.num_batches_tracked.fill_(10_000)  # a long training run: no warm-up finding


@torch.no_grad()
def plant_stale(conv: nn.Module) -> None:
    """Scale a conv's output channels by 1.5-3x, as fine-tuning with frozen BN would."""
    scale = 1.5 + 1.5 * torch.rand(conv.weight.shape[0], generator=torch.Generator().manual_seed(1))
    conv.weight.mul_(scale.view(-1, *[1] * (conv.weight.dim() - 1)))


@pytest.mark.parametrize(
    ("name", "size", "conv", "bn", "bn_type"),
    [
        ("resnet18", None, "layer2.0.conv1", "layer2.0.bn1", "BatchNorm2d"),  # 224: the default
        ("efficientnet_b0", 64, "blocks.3.0.conv_pw", "blocks.3.0.bn1", "BatchNormAct2d"),
    ],
)
def test_real_timm_model_on_an_image_folder(
    timm: ModuleType,
    tmp_path: Path,
    name: str,
    size: int | None,
    conv: str,
    bn: str,
    bn_type: str,
) -> None:
    folder = image_folder(tmp_path)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    calibrate(model, timm_batches(timm, model, folder, size))
    torch.save(model.state_dict(), tmp_path / "healthy.pt")
    plant_stale(model.get_submodule(conv))
    torch.save(model.state_dict(), tmp_path / "stale.pt")

    def check(ckpt: str) -> tuple[int, str, dict]:
        args = ["check", str(tmp_path / ckpt), "--model", f"timm:{name}", "--data", str(folder)]
        args += ["--batch-size", str(BATCH), "--json", str(tmp_path / f"{ckpt}.json")]
        args += [f"--image-size={size}"] if size else []
        result = CliRunner().invoke(app, args, env={"COLUMNS": "100"})
        assert result.exit_code in (0, 1), result.output
        doc = json.loads((tmp_path / f"{ckpt}.json").read_text())
        return result.exit_code, result.stdout, doc

    code, out, doc = check("healthy.pt")
    assert code == 0, out
    assert out.splitlines()[-1].startswith("PASS: no finding at fail or worse")
    notes = " ".join(doc["summary"]["notes"])
    assert f"timm's data config for {name}" in notes and "16 images in 2 batches of 8" in notes
    layers = {r["name"]: r for r in doc["layers"]}
    assert layers[bn]["type"] == bn_type
    # bnaudit's PIL/numpy preprocessing feeds the tensors timm's transform made
    shifts = [r["metrics"]["stale_shift_max"] for r in doc["layers"]]
    assert all(s is not None and s < 1e-3 for s in shifts), max(s or 0 for s in shifts)

    code, out, doc = check("stale.pt")
    assert code == 1, out
    failing = [(r["name"], f["code"]) for r in doc["layers"] for f in r["findings"]
               if f["severity"] == "fail"]  # fmt: skip
    assert failing == [(bn, "stale-stats")]
    assert any(line.split()[:4] == ["FAIL", "stale-stats", "1", bn] for line in out.splitlines())
