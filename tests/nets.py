"""Small models and data for the tests; also usable as --model / --data specs.

`tests/nets.py:build_cnn` and `tests/nets.py:build_mlp` are factories called with no arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnaudit.demo import build_model as build_cnn  # the demo's small residual CNN
from bnaudit.demo import calibrate, make_images

__all__ = [
    "TRAIN_BATCH",
    "build_cnn",
    "build_mlp",
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
