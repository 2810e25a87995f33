"""Small models trained in seconds for the stale-evidence tests: a classifier of generated
images and a U-Net whose `DoubleConv` applies one BatchNorm2d after both of its convs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSES, SIZE, CROP = 6, 16, 12
OFFSETS = torch.tensor([0.4, -0.2, 0.1]).reshape(1, 3, 1, 1)


def _templates() -> Tensor:
    t = torch.randn(CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    return F.avg_pool2d(t, 3, 1, 1) * 2.0


TEMPLATES = _templates()


def images(
    n: int, seed: int, classes: list[int] | None = None, shift: float = 0.0, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Class templates plus noise and a per-image brightness, cropped at random to CROP."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(classes) if classes is not None else torch.arange(CLASSES)
    y = pool[torch.randint(0, len(pool), (n,), generator=g)]
    x = TEMPLATES[y] + 0.8 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    x = (x + 0.5 * torch.randn(n, 1, 1, 1, generator=g) + OFFSETS) * scale + shift
    corners = torch.randint(0, SIZE - CROP + 1, (n, 2), generator=g).tolist()
    return torch.stack([x[k, :, i : i + CROP, j : j + CROP] for k, (i, j) in enumerate(corners)]), y


def crops_of_few(sources: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """`n` random crops of `sources` images, shuffled: correlated, not independent, samples."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (sources,), generator=g)
    full = TEMPLATES[y] + 0.8 * torch.randn(sources, 3, SIZE, SIZE, generator=g) + OFFSETS
    which = torch.randint(0, sources, (n,), generator=g)
    corners = torch.randint(0, SIZE - CROP + 1, (n, 2), generator=g).tolist()
    crops = [
        full[s, :, i : i + CROP, j : j + CROP] for s, (i, j) in zip(which, corners, strict=True)
    ]
    return torch.stack(crops), y[which]


def classifier() -> nn.Module:
    layers: list[nn.Module] = []
    for cin, cout, stride in ((3, 16, 1), (16, 32, 2), (32, 32, 1), (32, 32, 2)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))


def bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def train(model: nn.Module, steps: int, seed: int, *, frozen: bool = False, **data) -> nn.Module:
    """Adam on cross entropy; `frozen`: every BN in eval mode (its statistics frozen)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for bn in bns(model) if frozen else ():
        bn.eval()
    for s in range(steps):
        x, y = images(32, seed * 1000 + s, **data)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def stats_from(model: nn.Module, batches: list[Tensor]) -> None:
    """Running statistics from train-mode forwards on `batches` (a cumulative average)."""
    model.train()
    for bn in bns(model):
        bn.reset_running_stats()
        bn.momentum = None
    for x in batches:
        model(x)
    for bn in bns(model):
        bn.momentum = 0.1
    model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).double().mean())


# --- the U-Net: one BatchNorm2d per DoubleConv, called after both of its convs ------------------


def masks(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Noisy images of one bright disc each, and the disc's mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    c = torch.randint(3, SIZE - 3, (n, 2), generator=g)
    r = torch.randint(2, 5, (n,), generator=g)
    inside = (yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2
    mask = (inside <= r[:, None, None] ** 2).float()
    x = mask * 1.5 + 0.6 * torch.randn(n, SIZE, SIZE, generator=g)
    x = x + 0.3 * torch.randn(n, 1, 1, generator=g)
    return (x[:, None] * scale + shift), mask[:, None]


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn = nn.BatchNorm2d(cout)  # shared by both convs

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.c2(F.relu(self.bn(self.c1(x))))))


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d1, self.d2, self.u = DoubleConv(1, 8), DoubleConv(8, 16), DoubleConv(24, 8)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.d1(x)
        b = self.d2(F.max_pool2d(a, 2))
        return self.head(self.u(torch.cat([a, F.interpolate(b, scale_factor=2)], 1)))


def unet_frozen(seed: int = 0) -> nn.Module:
    """Statistics from another distribution, then trained with every BN frozen in eval mode."""
    torch.manual_seed(seed)
    model = UNet()
    with torch.no_grad():  # ten train-mode batches of the EMA, as a short warm-up leaves them
        model.train()
        for s in range(10):
            model(masks(16, 7000 + s, shift=1.0, scale=0.5)[0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for bn in bns(model):
        bn.eval()
    for s in range(150):
        x, y = masks(16, 1000 + s)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def iou(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        p, t = model.eval()(x) > 0, y > 0.5
    return float((p & t).sum() / (p | t).sum())
