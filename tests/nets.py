"""Small models and data for the tests; also usable as --model / --data specs.

`tests/nets.py:build_cnn`, `tests/nets.py:build_mlp`, `tests/nets.py:build_relu_first` and
`tests/nets.py:build_relu_both` are factories called with no arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnaudit.demo import build_model as build_cnn  # the demo's small residual CNN
from bnaudit.demo import calibrate, make_images

__all__ = [
    "TRAIN_BATCH",
    "GatedNet",
    "build_cnn",
    "build_mlp",
    "build_relu_both",
    "build_relu_first",
    "calibrate",
    "healthy_cnn",
    "healthy_mlp",
    "make_images",
    "mlp_data",
]

TRAIN_BATCH = 32  # the batch size the healthy models' running stats were accumulated at


def build_mlp(depth: int = 4, width: int = 32, d_in: int = 20) -> nn.Module:
    """Linear-BN1d-ReLU blocks; BN layers are named "1", "4", "7", ... in the Sequential."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 3))


class GatedNet(nn.Module):
    """Two conv → BN blocks behind an input check torch.fx cannot trace (data-dependent control
    flow). `between[i]` is what block i runs between its conv and its BN:
    "none", "relu", "inplace" (nn.ReLU(inplace=True)), "relu_" (Tensor.relu_), "dropout"
    (eval mode: the tensor itself), "shape" (reads the shape only), "side" (the conv's output
    also feeds the `side` conv), "residual" (BN's output plus the conv's output).
    Modules are registered conv, BN, ReLU, as most code declares them, whatever runs first.
    """

    def __init__(self, *between: str) -> None:
        super().__init__()
        self.between = between or ("none", "none")
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace="inplace" in self.between)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.side, self.drop = nn.Conv2d(8, 8, 1), nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.isfinite(x).all():
            raise ValueError("non-finite input")
        for conv, bn, between in zip(
            (self.conv1, self.conv2), (self.bn1, self.bn2), self.between, strict=True
        ):
            y = conv(x)
            if between in ("relu", "inplace"):
                z = bn(self.act(y))
            elif between == "relu_":
                z = bn(y.relu_())
            elif between == "dropout":
                z = bn(self.drop(y))
            elif between == "shape":
                z = bn(y) * (y.shape[1] / 8)
            elif between == "side":
                z = bn(y) + self.side(y)
            elif between == "residual":
                z = bn(y) + y
            else:
                z = bn(y)
            x = torch.relu(z)
        return self.head(x.mean(dim=(2, 3)))


def build_relu_first() -> nn.Module:
    """conv1 → ReLU → bn1, then conv2 → bn2: one fold pair."""
    return GatedNet("relu", "none")


def build_relu_both() -> nn.Module:
    """conv → ReLU → BN twice: no fold pair."""
    return GatedNet("relu", "relu")


def mlp_data(count: int, seed: int, d_in: int = 20) -> Tensor:
    """Correlated, off-centre features: a low-rank signal plus noise."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(5, d_in, generator=torch.Generator().manual_seed(99))
    z = torch.randn(count, 5, generator=gen)
    return z @ mixing + 0.5 * torch.randn(count, d_in, generator=gen) + 1.0


def healthy_cnn(seed: int = 0) -> nn.Module:
    """The demo CNN whose running stats are an EMA over many batches of the data."""
    torch.manual_seed(seed)
    model = build_cnn()
    calibrate(model, make_images(300 * TRAIN_BATCH, seed=seed + 1), TRAIN_BATCH)
    return model.eval()


def healthy_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_mlp()
    calibrate(model, mlp_data(400 * TRAIN_BATCH, seed=seed + 1), TRAIN_BATCH)
    return model.eval()
