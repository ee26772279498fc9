"""Architectures of the model zoo (no torchvision): digits MLP/CNN, CIFAR-style VGG-16 and ResNets."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["DigitsMLP", "DigitsCNN", "VGG16", "BasicBlock", "CifarResNet", "resnet20", "resnet56"]


class DigitsMLP(nn.Module):
    """A 3-layer MLP for 8x8 digits: flattens ``batch x 1 x 8 x 8`` itself, returns ``batch x 10`` logits."""

    def __init__(self, hidden: Sequence[int] = (256, 128), num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """``batch x 1 x 8 x 8`` (or ``batch x 64``) -> ``batch x 10``."""
        x = self.flatten(x)
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """A 5-layer CNN for 8x8 digits: three 3x3 convs (1->32->64->64, same padding) and two FC layers.

    Shapes: ``batch x 1 x 8 x 8`` -> conv1, conv2 -> pool (4x4) -> conv3 -> pool (2x2) ->
    ``batch x 256`` -> fc1 (128) -> fc2 (10 logits).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``batch x 1 x 8 x 8`` -> ``batch x 10``."""
        x = self.act(self.conv1(x))
        x = self.pool(self.act(self.conv2(x)))
        x = self.pool(self.act(self.conv3(x)))
        return self.fc2(self.act(self.fc1(self.flatten(x))))


_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """CIFAR-style VGG-16 with BatchNorm: 13 3x3 convs (``features``) and 3 FC layers (``classifier``).

    Input ``batch x 3 x 32 x 32``; after five poolings the feature map is ``batch x 512 x 1 x 1``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``batch x 3 x 32 x 32`` -> ``batch x num_classes``."""
        return self.classifier(self.flatten(self.features(x)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, or a 1x1 conv-BN one when the shape changes (option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        """``batch x c_in x H x W`` -> ``batch x c_out x H/stride x W/stride``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): 3 stages of ``n`` BasicBlocks (16, 32, 64 channels).

    Depth ``6n + 2``: ``n = 3`` is ResNet-20, ``n = 9`` ResNet-56. Input ``batch x 3 x 32 x 32``.
    """

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        c = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, width, stride=2 if (i > 0 and j == 0) else 1))
                c = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """``batch x 3 x 32 x 32`` -> ``batch x num_classes``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27 M parameters with option-B shortcuts)."""
    return CifarResNet(3, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (0.86 M parameters with option-B shortcuts)."""
    return CifarResNet(9, num_classes)
