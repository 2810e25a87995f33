"""Built-in demo: a small residual CNN, calibrated on generated images, with one stale layer.

`python -m bnaudit.demo DIR` writes DIR/model.pt (state dict) and DIR/calib.pt (sample images);
`bnaudit check DIR/model.pt --model bnaudit.demo:build_model --data DIR/calib.pt` then flags the
planted layer, `PLANTED_LAYER`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

# The conv whose weights change after calibration (fine-tuning with frozen BN, in effect), and
# the BN right behind it: the one layer whose running stats go stale.
PLANTED_CONV = "layer2.conv1"
PLANTED_LAYER = "layer2.bn1"


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DemoNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.layer1 = Block(16, 16)
        self.layer2 = Block(16, 32, stride=2)
        self.layer3 = Block(32, 64, stride=2)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def build_model() -> nn.Module:
    """The demo architecture (the --model factory): weights come from the checkpoint."""
    return DemoNet()


def make_images(count: int, seed: int, size: int = 32) -> Tensor:
    """Smooth random images with a per-image brightness and fixed per-channel offsets."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 3, size, size, generator=gen)
    smooth = nn.functional.avg_pool2d(noise, 5, stride=1, padding=2) * 2.0
    brightness = 0.5 * torch.randn(count, 1, 1, 1, generator=gen)
    offsets = torch.tensor([0.4, -0.2, 0.1]).reshape(1, 3, 1, 1)
    return smooth + 0.3 * noise + brightness + offsets


@torch.no_grad()
def calibrate(model: nn.Module, images: Tensor, batch_size: int) -> None:
    """Run train-mode forwards so every BN's running stats describe the data.

    The forwards average cumulatively (momentum=None): an EMA would need ~300 batches for the
    initial values (mean 0, variance 1) to fade, which took the demo minutes on a busy CPU;
    the cumulative average is exact after any number. Each BN's momentum is put back after.
    """
    # A QAT ConvBn scales its conv by the running variance while it learns it, so early
    # batches are normalised with wrong statistics: those keep the EMA, which forgets them.
    fused = {id(m.bn) for m in model.modules() if hasattr(m, "freeze_bn_stats")}
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in fused
    ]
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    model.train()
    try:
        for bn in bns:
            bn.momentum = None
        for batch in torch.split(images, batch_size):
            if batch.shape[0] > 1:
                model(batch)
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        model.train(was_training)


@torch.no_grad()
def plant_stale(model: nn.Module, conv_name: str = PLANTED_CONV, seed: int = 1) -> None:
    """Rescale one conv's output channels by 1.5–3×, as fine-tuning with frozen BN would.

    A positive per-channel scale is undone exactly by batch statistics in train mode, so the
    layers after the BN behind this conv see the same train-mode input as before: only that
    BN's running stats are stale.
    """
    conv = model.get_submodule(conv_name)
    gen = torch.Generator().manual_seed(seed)
    scale = 1.5 + 1.5 * torch.rand(conv.out_channels, generator=gen)
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))


# Calibration batches: T = 40 leaves the initial values a weight (1 - 0.1)^40 = 0.015 for the
# audit's momentum check, under its 0.05 limit, so the planted layer stays the only finding.
TRAIN_BATCHES = 40


def make_demo(
    folder: Path, *, seed: int = 0, calib_batches: int = 8, batch_size: int = 32
) -> tuple[Path, Path]:
    """Write the demo checkpoint and sample batches; returns (checkpoint, data) paths."""
    torch.manual_seed(seed)
    model = build_model()
    calibrate(model, make_images(TRAIN_BATCHES * batch_size, seed=seed + 1), batch_size)
    plant_stale(model)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, data = folder / "model.pt", folder / "calib.pt"
    torch.save(model.state_dict(), ckpt)
    torch.save(make_images(calib_batches * batch_size, seed=seed + 2), data)
    return ckpt, data


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else "demo")
    print(
        f"demo: calibrating a small residual CNN on {TRAIN_BATCHES} batches of generated "
        f"images, then rescaling {PLANTED_CONV} (stale stats at {PLANTED_LAYER})",
        file=sys.stderr,
    )
    ckpt, data = make_demo(folder)
    print(
        f"demo: wrote {ckpt} (stale layer planted at {PLANTED_LAYER}) and {data}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
