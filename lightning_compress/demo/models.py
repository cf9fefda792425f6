"""Reference models for the digits demo, with stable stage names for feature taps and pruning patterns.

Names (``named_modules``):

- :class:`ResidualCNN`: ``stem`` (``stem.conv``, ``stem.bn``), ``stage1`` .. ``stage<num_stages>`` (each a
  ``Sequential`` of :class:`BasicBlock`, e.g. ``stage2.0.conv1``), ``fc``.
- :class:`PlainCNN`: ``block1`` .. ``block3`` (``block1.conv``, ``block1.bn``), ``classifier``.
- :class:`MLP`: ``layers`` (``layers.fc1``, ``layers.fc2``, ...), ``classifier``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class ConvBN(nn.Sequential):
    """``conv`` -> ``bn`` (the activation is applied by the caller)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convolutions (He et al. 2016), with a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResidualCNN(nn.Module):
    """A small ResNet for 8x8 digits: a stem, ``num_stages`` stages of ``depth`` blocks, global pooling, ``fc``.

    Stage ``i`` has ``width * 2**(i-1)`` channels; stages after the first halve the spatial size.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        width: channels of the stem and the first stage.
        depth: residual blocks per stage.
        num_stages: number of stages.

    >>> ResidualCNN(width=8, depth=1)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, depth: int = 1, num_stages: int = 3
    ) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, width=width, depth=depth,
                        num_stages=num_stages)
        self.stem = ConvBN(in_channels, width)
        channels = width
        for index in range(1, num_stages + 1):
            out_channels = width * 2 ** (index - 1)
            stride = 1 if index == 1 else 2
            blocks = [BasicBlock(channels, out_channels, stride)]
            blocks += [BasicBlock(out_channels, out_channels) for _ in range(depth - 1)]
            self.add_module(f"stage{index}", nn.Sequential(*blocks))
            channels = out_channels
        self.num_stages = num_stages
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{index}")(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class PlainCNN(nn.Module):
    """Three conv-BN-ReLU blocks (``width``, ``2*width``, ``2*width`` filters), max pooling after the last two, and
    a flatten into a linear ``classifier``.

    >>> PlainCNN(width=8)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, image_size: int = 8) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x2 poolings), got {image_size!r}.")
        self.block1 = ConvBN(in_channels, width)
        self.block2 = ConvBN(width, 2 * width)
        self.block3 = ConvBN(2 * width, 2 * width)
        self.classifier = nn.Linear(2 * width * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.block1(x))
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.max_pool2d(F.relu(self.block3(x)), 2)
        return self.classifier(torch.flatten(x, 1))


class MLP(nn.Module):
    """A multilayer perceptron over flattened inputs: ``layers.fc1`` .. ``layers.fc<n>`` with ReLU, ``classifier``.

    >>> MLP(hidden=(32,))(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10) -> None:
        super().__init__()
        _check_positive(in_features=in_features, num_classes=num_classes, **{f"hidden[{i}]": h for i, h in
                                                                             enumerate(hidden)})
        self.layers = nn.Sequential()
        width = in_features
        for index, out_features in enumerate(hidden, start=1):
            self.layers.add_module(f"fc{index}", nn.Linear(width, out_features))
            self.layers.add_module(f"act{index}", nn.ReLU())
            width = out_features
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(torch.flatten(x, 1)))
