"""The torch side of `composer.ops.cluster`: soft clustering into slots and dispatch back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftCluster(nn.Module):
    """Soft clustering over a map (B, C, *S) or tokens (B, N, C); see `composer.ops.cluster.Cluster`.
    With `paired` the input carries [features (C), slot source (C)] along its channels."""

    def __init__(self, dim, slots, ndim, mixer=None, init="pool", paired=False, scale=None, learnable_scale=True,
                 tokens=False, grid=()):
        super().__init__()
        self.slots, self.ndim, self.paired, self.tokens = slots, ndim, paired, tokens
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

    def forward(self, x):
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
        elif self.paired:
            src = source.transpose(1, 2).reshape(b, c, *self.grid) if self.tokens else source
            init = self._pool(src)
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
        return f"slots={self.slots}^{self.ndim}, paired={self.paired}"
