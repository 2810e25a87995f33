"""A small labelled classification task for the evidence tests; usable as --model / --data specs.

`tests/labelled.py:build` is the architecture; `tests/labelled.py:loader` a DataLoader of
(features, labels) batches, as most training code has one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

D_IN, CLASSES, BATCH = 16, 4, 32


def build() -> nn.Module:
    return nn.Sequential(
        nn.Linear(D_IN, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, CLASSES),
    )


def task(count: int, seed: int) -> tuple[Tensor, Tensor]:
    """Four overlapping Gaussian classes in 16 dimensions, off-centre (BN has work to do)."""
    centres = 0.6 * torch.randn(CLASSES, D_IN, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=gen)
    x = centres[labels] + torch.randn(count, D_IN, generator=gen) + 3.0
    return x, labels


def trained(*, frozen_stats: bool, steps: int = 300, seed: int = 0) -> nn.Module:
    """Trained with BN in train mode: healthy running statistics.

    `frozen_stats`: then every BN's running statistics are moved on purpose and γ, β changed so
    that the eval-mode function stays exactly the same, the end state of fine-tuning with BN
    frozen around statistics from elsewhere: the weights fit those statistics, not the data's,
    so they are stale relative to the data and recalibrating them to it hurts the model.
    """
    torch.manual_seed(seed)
    model = build()
    x, y = task(steps * BATCH, seed + 1)
    _fit(model, list(zip(x.split(BATCH), y.split(BATCH), strict=True)))
    if frozen_stats:
        with torch.no_grad():
            for bn in _bns(model):
                sd = (bn.running_var + bn.eps).sqrt()
                # Each channel's mean moves by up to 3 sds, its variance by a factor 1/4 to 4.
                c = bn.num_features
                shift = sd * torch.linspace(-3.0, 3.0, c)[torch.randperm(c)]
                bn.bias.add_(bn.weight * shift / sd)
                bn.running_mean.add_(shift)
                bn.running_var.mul_(torch.logspace(-0.6, 0.6, c)[torch.randperm(c)])
                bn.weight.mul_((bn.running_var + bn.eps).sqrt() / sd)
    return model.eval()


def _bns(model: nn.Module) -> list[nn.BatchNorm1d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]


def _fit(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for xb, yb in batches:
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def loader(count: int = 512, seed: int = 123, shuffle: bool = False) -> DataLoader:
    x, y = task(count, seed)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=shuffle)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).double().mean())
