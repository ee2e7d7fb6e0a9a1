"""The module behind the `member_attention` op."""

from __future__ import annotations

import torch
from torch import nn


class MemberAttention(nn.Module):
    """Channels [members | keys | values] (each members * C) -> C: member 0 attends to the keys."""

    def __init__(self, members, channels, heads=1, scale=None, channel_first=True):
        super().__init__()
        self.members, self.channels, self.heads, self.channel_first = members, channels, heads, channel_first
        self.scale = scale if scale is not None else (channels // heads) ** -0.5

    def forward(self, x):
        if self.channel_first:
            x = x.movedim(1, -1)
        m, c, h = self.members, self.channels, self.heads
        sets = x.unflatten(-1, (3, m, h, c // h)).transpose(-3, -2)  # (..., 3, heads, members, head_dim)
        q, k, v = sets[..., 0, :, :1, :], sets[..., 1, :, :, :], sets[..., 2, :, :, :]
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)  # (..., heads, 1, members)
        y = torch.matmul(attn, v).flatten(-3)                        # (..., C), heads concatenated
        return y.movedim(-1, 1) if self.channel_first else y

    def extra_repr(self) -> str:
        return f"members={self.members}, channels={self.channels}, heads={self.heads}, scale={self.scale:.4g}"
