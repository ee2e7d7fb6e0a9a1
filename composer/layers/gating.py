"""Squeeze-and-excitation, global response norm and gated linear units."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """timm's `SEModule` layout: mean over space, `fc1` (1x1 conv), `act`, `fc2`, `gate`, rescale."""

    def __init__(self, channels: int, hidden: int, ndim: int, act: nn.Module, gate: nn.Module):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
        self.fc1 = conv(channels, hidden, 1, bias=True)
        self.act = act
        self.fc2 = conv(hidden, channels, 1, bias=True)
        self.gate = gate

    def forward(self, x):
        s = x.mean(tuple(range(2, x.ndim)), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class GRN(nn.Module):
    """ConvNeXt V2's global response normalisation, on maps (channel_first) or tokens."""

    def __init__(self, channels: int, eps: float = 1e-6, channel_first: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.eps, self.channel_first = eps, channel_first

    def forward(self, x):
        if self.channel_first:
            spatial, cdim, view = tuple(range(2, x.ndim)), 1, (1, -1) + (1,) * (x.ndim - 2)
        else:
            spatial, cdim, view = (1,), -1, (1, 1, -1)
        g = x.norm(p=2, dim=spatial, keepdim=True)
        n = g / (g.mean(dim=cdim, keepdim=True) + self.eps)
        return x + torch.addcmul(self.beta.view(view), self.gamma.view(view), x * n)


class GLU(nn.Module):
    """First half of the channels times `act` of the second half."""

    def __init__(self, act: nn.Module, channel_first: bool = False):
        super().__init__()
        self.act = act
        self.dim = 1 if channel_first else -1

    def forward(self, x):
        a, b = x.chunk(2, dim=self.dim)
        return a * self.act(b)
