"""Deployed artifacts made at test time: a small model with the three BN placements the exporters
treat differently (conv → BN, conv → ReLU → BN, linear → BN1d), its checkpoint and batches, and
its export by each path (dynamo ONNX, legacy ONNX, TorchScript script/trace, torch.export)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

BATCH = 4  # the artifacts are exported for this batch size, and the data comes in it
MODEL_PY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, eps=1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=eps)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, eps=eps)
        self.fc = nn.Linear(8, 6)
        self.bn3 = nn.BatchNorm1d(6, eps=eps)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.bn2(torch.relu(self.conv2(x)))
        x = x.mean((2, 3))
        return self.head(self.bn3(self.fc(x)))


class Seq1d(nn.Module):
    # BatchNorm1d on [N, C, L]: statistics per channel over the batch and the length.
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.conv2 = nn.Conv1d(6, 4, 1)
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn2(torch.relu(self.conv2(torch.relu(self.bn(self.conv(x))))))


def build(eps=1e-5):
    return Net(eps)


def build_1d():
    return Seq1d()
"""
LAYERS = ("bn1", "bn2", "bn3")


def model_file(folder: Path) -> Path:
    path = folder / "models.py"
    path.write_text(MODEL_PY)
    return path


def trained(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Calibrated statistics and gamma/beta that differ per layer, then eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, *shape[1:]) * 2 + 0.3)
    return model.eval()


def namespace(folder: Path) -> dict:
    """The model module's names (`build`, `build_1d`), imported from its file."""
    scope: dict = {}
    exec(compile(MODEL_PY, str(folder / "models.py"), "exec"), scope)
    return scope


def export(model: nn.Module, x: torch.Tensor, path: Path, how: str, **kwargs: object) -> Path:
    """Export by one path: dynamo, legacy, script, trace or export."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if how == "dynamo":
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, **kwargs)
        elif how == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs)
        elif how == "script":
            torch.jit.save(torch.jit.script(model), str(path))
        elif how == "trace":
            torch.jit.save(torch.jit.trace(model, x), str(path))
        elif how == "export":
            torch.export.save(torch.export.export(model, (x,)), str(path))
        else:
            raise ValueError(how)
    return path


def setup(folder: Path, shape: tuple[int, ...] = (BATCH, 3, 8, 8), factory: str = "build"):
    """(model, checkpoint path, data path, --model spec) of a trained model."""
    model_path = model_file(folder)
    model = trained(namespace(folder)[factory](), shape)
    ckpt = folder / "ck.pt"
    torch.save(model.state_dict(), ckpt)
    data = folder / "data.pt"
    torch.manual_seed(1)
    torch.save(torch.randn(3 * shape[0], *shape[1:]) * 2 + 0.3, data)
    return model, ckpt, data, f"{model_path}:{factory}"
