"""Tiny training loops for the watcher's tests: a conv net of three blocks, each conv → BN →
ReLU, trained for a few steps on random batches. Each function plants one training mistake."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

CLASSES = 4
BATCH = 8


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class Net(nn.Module):
    """Three blocks and a linear head; `checkpointed` names the blocks run under
    torch.utils.checkpoint (with `use_reentrant`). BN layers: blocks.0.1, blocks.1.1, blocks.2.1."""

    def __init__(self, checkpointed: tuple[int, ...] = (), use_reentrant: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block(3, 8), block(8, 8), block(8, 8)])
        self.head = nn.Linear(8, CLASSES)
        self.checkpointed, self.use_reentrant = checkpointed, use_reentrant

    def forward(self, x: Tensor) -> Tensor:
        for i, b in enumerate(self.blocks):
            if i in self.checkpointed and torch.is_grad_enabled():
                x = checkpoint(b, x, use_reentrant=self.use_reentrant)
            else:
                x = b(x)
        return self.head(x.mean((2, 3)))


BN = ("blocks.0.1", "blocks.1.1", "blocks.2.1")


class SharedNet(nn.Module):
    """A U-Net `DoubleConv` that applies one BatchNorm2d after both of its convs (two call sites
    per forward, by design) after a 1×1 stem, then a plain block and the head; `checkpointed`
    runs the double conv under torch.utils.checkpoint. BN layers: pair.bn (shared), tail.1."""

    def __init__(self, checkpointed: bool = False, use_reentrant: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)  # reentrant checkpointing needs an input with a gradient
        self.pair = DoubleConv(8, 8)
        self.tail = block(8, 8)
        self.head = nn.Linear(8, CLASSES)
        self.checkpointed, self.use_reentrant = checkpointed, use_reentrant

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        if self.checkpointed and torch.is_grad_enabled():
            x = checkpoint(self.pair, x, use_reentrant=self.use_reentrant)
        else:
            x = self.pair(x)
        return self.head(self.tail(x).mean((2, 3)))


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv2(F.relu(self.bn(self.conv1(x))))))


def batches(count: int, seed: int = 0, shift: float = 0.0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH, 3, 8, 8, generator=g) + shift,
            torch.randint(0, CLASSES, (BATCH,), generator=g),
        )
        for _ in range(count)
    ]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int = 3,
    *,
    accumulate: int = 1,
    extra_forward: bool = False,
    data: list[tuple[Tensor, Tensor]] | None = None,
) -> None:
    """An ordinary loop: `accumulate` micro-batches per optimizer step, each forward and
    backward; `extra_forward` adds a consistency term from a second forward of the same model."""
    data = data or batches(steps * accumulate)
    it = iter(data)
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(accumulate):
            x, y = next(it)
            out = model(x)
            loss = F.cross_entropy(out, y) / accumulate
            if extra_forward:  # a consistency loss: the same model on a perturbed batch
                loss = loss + (model(x + 0.1) - out.detach()).pow(2).mean()
            loss.backward()
        optimizer.step()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
