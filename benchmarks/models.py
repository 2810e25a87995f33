"""The benchmark's models, defined here with random initialisation (no torchvision, no download).

Each factory takes no argument, so it also serves as a `bnaudit check --model` spec, e.g.
`benchmarks/models.py:resnet50_like`. Shapes follow the originals; what the benchmark measures is
the audit's cost relative to the forward passes, which depends on the layer mix, not on the
weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class Bottleneck(nn.Module):
    """ResNet-50's block: 1×1 reduce, 3×3, 1×1 expand (×4), each followed by BN."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50Like(nn.Module):
    """ResNet-50's layout: stem, [3, 4, 6, 3] bottlenecks, 53 BatchNorm2d."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks: list[nn.Module] = []
        cin = 64
        for stage, count in enumerate((3, 4, 6, 3)):
            width = 64 * 2**stage
            for i in range(count):
                blocks.append(Bottleneck(cin, width, 2 if i == 0 and stage > 0 else 1))
                cin = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand, 3×3 depthwise, 1×1 linear projection, each with BN."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += conv_bn(hidden, cout, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2Like(nn.Module):
    """MobileNetV2's layout (width 1.0): 17 inverted residuals, 52 BatchNorm2d."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    SETTINGS += ((6, 160, 3, 2), (6, 320, 1, 1))  # (expansion, channels, repeats, stride)

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(3, 32, 3, 2), nn.ReLU6()]
        cin = 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += [*conv_bn(cin, 1280, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class DeepMLP(nn.Sequential):
    """`depth` blocks of Linear → BatchNorm1d → ReLU on small tensors: per-layer overhead."""

    def __init__(self, depth: int = 400, width: int = 64, d_in: int = 64) -> None:
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
            d = width
        super().__init__(*layers, nn.Linear(d, 10))


class CNN3d(nn.Sequential):
    """A small video/volume CNN: Conv3d → BatchNorm3d → ReLU, 6 BatchNorm3d."""

    def __init__(self, classes: int = 10) -> None:
        widths = (3, 16, 32, 32, 64, 64, 64)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
            stride = 2 if i in (1, 3) else 1
            layers += [nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout)]
            layers.append(nn.ReLU())
        super().__init__(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(64, classes))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d in shape: a BatchNorm2d subclass whose forward adds dropout (off)
    and an activation, so its output is not the BN formula."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, BatchNormAct2d(cout)]


class MBConv(nn.Module):
    """EfficientNet's block with BatchNormAct2d: expand, depthwise, squeeze-excite, project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = conv_bn_act(cin, hidden, 1) if expand != 1 else []
        layers += conv_bn_act(hidden, hidden, kernel, stride, groups=hidden)
        self.body = nn.Sequential(*layers)
        squeeze = max(1, cin // 4)
        self.se = nn.Sequential(
            nn.Conv2d(hidden, squeeze, 1), nn.SiLU(), nn.Conv2d(squeeze, hidden, 1), nn.Sigmoid()
        )
        self.project = nn.Sequential(*conv_bn(hidden, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        h = self.project(h * self.se(h.mean((2, 3), keepdim=True)))
        return x + h if self.residual else h


class EfficientNetB0Like(nn.Module):
    """EfficientNet-B0's layout: 16 MBConv blocks, 49 BN, 33 of them BatchNormAct2d."""

    SETTINGS = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3))
    SETTINGS += ((6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = conv_bn_act(3, 32, 3, 2)
        cin = 32
        for expand, cout, repeats, stride, kernel in self.SETTINGS:
            for i in range(repeats):
                layers.append(MBConv(cin, cout, stride if i == 0 else 1, expand, kernel))
                cin = cout
        layers += conv_bn_act(cin, 1280, 1)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def efficientnet_b0_like() -> nn.Module:
    return EfficientNetB0Like()


def resnet50_like() -> nn.Module:
    return ResNet50Like()


def mobilenetv2_like() -> nn.Module:
    return MobileNetV2Like()


def mlp400() -> nn.Module:
    return DeepMLP(400)


def cnn3d() -> nn.Module:
    return CNN3d()


class SmallCNN(nn.Sequential):
    """A small CNN for the per-batch fixed cost: 3 × (conv → BatchNorm2d → ReLU), a BN1d head."""

    def __init__(self) -> None:
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, 16, 1), (16, 32, 2), (32, 32, 1)):
            layers += [*conv_bn(cin, cout, 3, stride), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16)]
        super().__init__(*layers)


def small_cnn() -> nn.Module:
    return SmallCNN()


# --- the shapes users have (issue 25): each a factory of no argument, as a --model spec ------


class AudioNet1d(nn.Sequential):
    """M5-style raw-audio classifier on [B, 1, T]: a strided Conv1d stem, then Conv1d →
    BatchNorm1d → ReLU → MaxPool1d, 4 BatchNorm1d on [B, C, L] activations."""

    def __init__(self, classes: int = 35, width: int = 64) -> None:
        layers: list[nn.Module] = []
        w, w2 = width, 2 * width
        steps = ((1, w, 80, 4), (w, w, 3, 1), (w, w2, 3, 1), (w2, w2, 3, 1))
        for i, (cin, cout, kernel, stride) in enumerate(steps):
            layers += [nn.Conv1d(cin, cout, kernel, stride, kernel // 2 if i else 38)]
            layers += [nn.BatchNorm1d(cout), nn.ReLU(), nn.MaxPool1d(4 if i < 3 else 2)]
        super().__init__(
            *layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * width, classes)
        )


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*conv_bn(cin, cout, 3), nn.ReLU(), *conv_bn(cout, cout, 3), nn.ReLU())


class UNet(nn.Module):
    """A U-Net: 4 down steps and 4 up steps whose inputs concatenate the encoder's skip
    activations, 18 BatchNorm2d (two per double conv)."""

    def __init__(self, classes: int = 2, base: int = 16) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(5)]
        self.down = nn.ModuleList([double_conv(3, widths[0])])
        self.down.extend(double_conv(a, b) for a, b in itertools.pairwise(widths))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(b, a, 2, 2) for a, b in itertools.pairwise(widths)
        )
        self.merge = nn.ModuleList(double_conv(2 * a, a) for a in widths[:-1])
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else torch.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(reversed(self.up), reversed(self.merge), strict=True):
            x = merge(torch.cat((skips.pop(), up(x)), 1))
        return self.head(x)


class Temporal3d(nn.Sequential):
    """An R(2+1)D-style video net: each block a spatial (1×3×3) and a temporal (3×1×1) Conv3d,
    each followed by BatchNorm3d and ReLU; 8 BatchNorm3d."""

    def __init__(self, classes: int = 10) -> None:
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, 32, 2), (32, 64, 1), (64, 64, 2), (64, 128, 1)):
            layers += [nn.Conv3d(cin, cout, (1, 3, 3), (1, stride, stride), (0, 1, 1))]
            layers += [nn.BatchNorm3d(cout), nn.ReLU()]
            layers += [nn.Conv3d(cout, cout, (3, 1, 1), 1, (1, 0, 0)), nn.BatchNorm3d(cout)]
            layers.append(nn.ReLU())
        super().__init__(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(128, classes))


class CRNN(nn.Module):
    """A text-line recogniser: Conv2d → BatchNorm2d → ReLU stages on [B, 1, 32, W], the height
    pooled away, then a bidirectional GRU over the width and a per-step classifier; 5
    BatchNorm2d."""

    def __init__(self, classes: int = 37, hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, pool in ((1, 32, (2, 2)), (32, 64, (2, 2)), (64, 128, (2, 1))):
            layers += [*conv_bn(cin, cout, 3), nn.ReLU(), nn.MaxPool2d(pool)]
        layers += [*conv_bn(128, 128, 3), nn.ReLU(), *conv_bn(128, 256, 3), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.rnn = nn.GRU(256, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.conv(x).mean(2).transpose(1, 2)  # [B, W', C]
        return self.fc(self.rnn(features)[0])


def audio1d() -> nn.Module:
    return AudioNet1d()


def unet() -> nn.Module:
    return UNet()


def temporal3d() -> nn.Module:
    return Temporal3d()


def crnn() -> nn.Module:
    return CRNN()


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def calibrate(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Give the BN layers real running statistics (a cumulative average over `batches`).

    Random-init running stats (0 and 1) would make deep eval-mode activations explode or
    vanish; after this the audit sees a model in the state a trained checkpoint is in.
    """
    layers = bn_layers(model)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    return model.eval()
