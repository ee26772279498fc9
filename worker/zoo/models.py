"""Architectures of the model zoo (no torchvision): digits MLP/CNN, CIFAR-style VGG-16 and ResNets,
a MobileNetV2-style net (with timm-style fused BatchNorm+activation modules) and a small
transformer encoder over integer tokens."""

from __future__ import annotations

from collections.abc import Sequence

import math

import torch
from torch import Tensor, nn

__all__ = [
    "DigitsMLP",
    "DigitsCNN",
    "VGG16",
    "BasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet56",
    "BatchNormAct2d",
    "InvertedResidual",
    "MobileNetV2",
    "mobilenet",
    "SelfAttention",
    "EncoderBlock",
    "TokenTransformer",
    "transformer",
]


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


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation, in one module (like timm's ``BatchNormAct2d``).

    It *is* an ``nn.BatchNorm2d`` (same parameters, buffers and state-dict names) with one child,
    ``act``; ``forward`` normalizes, then applies ``act``. Code that treats every ``BatchNorm2d``
    as a pure affine normalization must not drop the activation.
    """

    def __init__(self, num_features: int, act_layer: type[nn.Module] = nn.ReLU6, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        """``batch x C x H x W`` -> the same shape: ``act(batchnorm(x))``."""
        return self.act(super().forward(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (BN, ReLU6) -> 3x3 depthwise (BN, ReLU6) -> 1x1 project (BN), + x.

    Args:
        c_in, c_out: channels; the residual add is used when ``stride == 1 and c_in == c_out``.
        stride: of the depthwise conv.
        expand: expansion ratio ``t`` (hidden channels ``t * c_in``); ``1`` has no expand conv.
        fused: normalize+activate with one :class:`BatchNormAct2d` (``bn1``/``bn2``) instead of a
            ``BatchNorm2d`` and a separate ``nn.ReLU6`` (``act``).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, fused: bool = True) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        self.fused = fused

        def norm_act(c: int) -> nn.Module:
            return BatchNormAct2d(c) if fused else nn.BatchNorm2d(c)

        self.conv_pw: nn.Module | None = None
        if expand != 1:
            self.conv_pw = nn.Conv2d(c_in, hidden, 1, bias=False)
            self.bn1 = norm_act(hidden)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = norm_act(hidden)
        self.conv_pwl = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.act: nn.Module = nn.Identity() if fused else nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        """``batch x c_in x H x W`` -> ``batch x c_out x H/stride x W/stride``."""
        out = x
        if self.conv_pw is not None:
            out = self.act(self.bn1(self.conv_pw(out)))
        out = self.act(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return x + out if self.use_res else out


#: MobileNetV2 stages after the stride-2 stem: (expansion t, channels c, blocks n, first stride s).
_MOBILENET_CFG: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1), (6, 96, 1, 1))


class MobileNetV2(nn.Module):
    """A small MobileNetV2-style net for ``batch x 3 x 32 x 32`` inputs (Sandler et al., 2018).

    Stem 3x3 conv (16 channels, stride 2: ``digits32`` images are upsampled 8x8 ones, so 16x16
    loses nothing and trains 4x faster on a CPU) + BN + ReLU6, then 8 :class:`InvertedResidual`
    blocks (stages of :data:`_MOBILENET_CFG`: 16 -> 8 -> 4 pixels), a 1x1 conv to ``head`` channels
    with a :class:`BatchNormAct2d`, global average pooling and a linear classifier. The first block
    uses a plain ``BatchNorm2d`` + ``nn.ReLU6``; all others the fused :class:`BatchNormAct2d`.
    """

    def __init__(self, num_classes: int = 10, head: int = 256) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        self.act_stem = nn.ReLU6()
        blocks: list[nn.Module] = []
        c = 16
        for t, width, n, s in _MOBILENET_CFG:
            for j in range(n):
                blocks.append(InvertedResidual(c, width, s if j == 0 else 1, t, fused=bool(blocks)))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Conv2d(c, head, 1, bias=False)
        self.bn_head = BatchNormAct2d(head)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``batch x 3 x 32 x 32`` -> ``batch x num_classes``."""
        x = self.act_stem(self.bn_stem(self.conv_stem(x)))
        x = self.bn_head(self.conv_head(self.blocks(x)))
        return self.classifier(self.flatten(self.pool(x)))


def mobilenet(num_classes: int = 10) -> MobileNetV2:
    """The zoo's MobileNetV2-style net for 3x32x32 inputs."""
    return MobileNetV2(num_classes)


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit ``q``/``k``/``v``/``out`` ``nn.Linear`` projections.

    Every projection is an ordinary ``nn.Linear`` (``d_model -> d_model``), so each is compressible
    on its own (e.g. by svd). Input and output ``batch x tokens x d_model``.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``batch x T x d`` -> ``batch x T x d``."""
        b, t, d = x.shape
        h = self.heads

        def split(z: Tensor) -> Tensor:
            return z.reshape(b, t, h, -1).transpose(1, 2)  # batch x heads x T x head_dim

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, -1))


class EncoderBlock(nn.Module):
    """A pre-LayerNorm transformer encoder block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, d_model: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``batch x T x d`` -> ``batch x T x d``."""
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TokenTransformer(nn.Module):
    """A small transformer encoder classifier over integer token ids (``batch x 64`` int64).

    The zoo's ``transformer``: each 8x8 digit as 64 grey-level tokens (ids ``0..16``, raster
    order). Each token id is embedded (``embed``, ``pixel_dim`` wide); the embeddings of each 2x2
    block of pixels are concatenated and projected (``patch``, an ``nn.Linear``) to one of 16 patch
    tokens (a pixel-per-token model learned far too slowly on 1347 samples and 2 CPU cores). A
    learned CLS vector is prepended, learned position embeddings added, ``layers``
    :class:`EncoderBlock` s run, and the final LayerNorm of the CLS position is classified.

    Args:
        vocab: token ids ``0 .. vocab - 1``.
        side: the image side (``side * side`` tokens per sample, ``side`` even).
        pixel_dim: width of one token's embedding (``4 * pixel_dim`` enters ``patch``).
        d_model, heads, layers, mlp: width, attention heads (head dim ``d_model / heads``), depth and
            the MLP's hidden width.
    """

    def __init__(
        self, vocab: int = 17, side: int = 8, pixel_dim: int = 16, d_model: int = 64, heads: int = 4,
        layers: int = 3, mlp: int = 128, num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.side = side
        self.pixel_dim = pixel_dim
        n_patches = (side // 2) ** 2
        self.blocks = nn.Sequential(*[EncoderBlock(d_model, heads, mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.embed = nn.Embedding(vocab, pixel_dim)  # N(0, 1) init
        self.patch = nn.Linear(4 * pixel_dim, d_model)  # PyTorch's default init
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, d_model) * 0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """``batch x side*side`` int64 token ids -> ``batch x num_classes`` logits."""
        if tokens.is_floating_point():
            raise TypeError(f"TokenTransformer takes integer token ids, got {tokens.dtype}")
        b, h = len(tokens), self.side // 2
        e = self.embed(tokens.long()).reshape(b, h, 2, h, 2, self.pixel_dim)
        e = e.permute(0, 1, 3, 2, 4, 5).reshape(b, h * h, 4 * self.pixel_dim)  # 2x2 pixel blocks
        x = torch.cat([self.cls.expand(b, -1, -1), self.patch(e)], dim=1) + self.pos
        x = self.ln(self.blocks(x))
        return self.head(x[:, 0])


def transformer(num_classes: int = 10) -> TokenTransformer:
    """The zoo's transformer: 2x2-pixel patch tokens, 3 layers, d_model 64, 4 heads (head dim 16), MLP 128."""
    return TokenTransformer(num_classes=num_classes)
