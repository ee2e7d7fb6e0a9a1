"""The torch side of `composer.ops.cluster`: soft clustering into slots and dispatch back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftCluster(nn.Module):
    """Soft clustering over a map (B, C, *S) or tokens (B, N, C); see `composer.ops.cluster.Cluster`.
    `source`: None (slots pooled from the features or learned), "map" or "tokens" (pooled from a
    tensor of that layout passed after the input: `forward(x, source)`), or "paired" (deprecated:
    the input carries [features (C), slot source (C)] along its channels)."""

    def __init__(self, dim, slots, ndim, mixer=None, init="pool", source=None, scale=None, learnable_scale=True,
                 tokens=False, grid=()):
        super().__init__()
        self.slots, self.ndim, self.source, self.tokens = slots, ndim, source, tokens
        self.paired = source == "paired"
        self.grid = tuple(grid)
        value = torch.tensor(float(scale if scale is not None else dim ** -0.5))
        if learnable_scale:
            self.slot_scale = nn.Parameter(value)
        else:
            self.register_buffer("slot_scale", value)
        if init == "learned":
            self.init_slots = nn.Parameter(nn.init.normal_(torch.empty(1, slots ** ndim, dim), std=0.02))
        self.mixer = mixer if mixer is not None else nn.Identity()

    def _pool(self, source_map):
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[self.ndim - 1]
        return pool(source_map, self.slots).flatten(2).transpose(1, 2)  # (B, K, C)

    def forward(self, x, source=None):
        if self.tokens:  # (B, N, C[*2])
            feats = x
            if self.paired:
                feats, source = x.chunk(2, dim=-1)
        else:  # (B, C[*2], *S)
            feats = x
            if self.paired:
                feats, source = x.chunk(2, dim=1)
            feats = feats.flatten(2).transpose(1, 2)
        b, n, c = feats.shape
        if hasattr(self, "init_slots"):
            init = self.init_slots.expand(b, -1, -1)
        elif source is not None:
            tokens = self.tokens if self.paired else self.source == "tokens"
            init = self._pool(source.transpose(1, 2).reshape(b, c, *self.grid) if tokens else source)
        else:
            init = self._pool(feats.transpose(1, 2).reshape(b, c, *self.grid))
        logits = F.normalize(init, dim=-1) @ (self.slot_scale * F.normalize(feats, dim=-1)).transpose(1, 2)  # (B, K, N)
        slots = logits.softmax(dim=-1) @ feats
        slots = self.mixer(slots)
        out = logits.transpose(1, 2).softmax(dim=-1) @ slots  # (B, N, C)
        if self.tokens:
            return out
        return out.transpose(1, 2).reshape(b, c, *self.grid)

    def extra_repr(self) -> str:
        return f"slots={self.slots}^{self.ndim}, source={self.source}"
