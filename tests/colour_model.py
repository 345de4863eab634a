"""A tiny classifier whose answer is fixed by construction: the image's dominant colour.

``build()`` (for ``model.factory: tests.colour_model:build``) averages the normalized image
per channel (``avgpool`` → 3 features, the embedding) and ``fc`` scores red, green and blue as
10 × those means. A photo blended 60 % with pure red (green, blue) has that channel's mean at
least 0.5 above the others after ImageNet normalization, so its class wins with a logit margin
of 5 or more: no CPU's rounding can change the answer.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

CLASSES = ("red", "green", "blue")
TINTS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build() -> nn.Module:
    net = ColourNet()
    with torch.no_grad():
        net.fc.weight.copy_(10 * torch.eye(3))
        net.fc.bias.zero_()
    return net


def tinted(photo: Image.Image, colour: str, alpha: float = 0.6) -> Image.Image:
    """``photo`` blended ``alpha`` with the pure colour: a real image whose class is certain."""
    return Image.blend(photo.convert("RGB"), Image.new("RGB", photo.size, TINTS[colour]), alpha)
