"""The torch modules behind the core ops (linear, norms, tokens, scales, the `Stack` container).

Only `build` imports this module: the check path never loads torch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn


def conv_class(ndim: int):
    """nn.Conv1d, Conv2d or Conv3d for a grid of `ndim` dims."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]


def bn_class(ndim: int):
    """nn.BatchNorm1d, 2d or 3d for a grid of `ndim` dims."""
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1]


def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    # timm's convention: the cut is at +-2 in absolute value. For std <= 0.2 that is 10 standard
    # deviations or more (a sample beyond it has probability 1.5e-23), so the plain normal is the
    # same distribution without torch's rejection pass (which doubles the build time of a ViT)
    if std <= 0:
        return nn.init.zeros_(t)
    if std <= 0.2:
        return nn.init.normal_(t, std=std)
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


class ChannelLinear(nn.Linear):
    """Linear over channels; on a map (channel_first) it runs channels-last and permutes back."""

    def __init__(self, cin, cout, bias=True, channel_first=False, init_std=0.02):
        self.init_std = init_std  # read by reset_parameters, which nn.Linear's __init__ calls
        super().__init__(cin, cout, bias)
        self.channel_first = channel_first

    def reset_parameters(self) -> None:
        """trunc-normal(init_std) weights, zero bias (instead of nn.Linear's kaiming-uniform, which
        would be drawn and then overwritten: a third of the build time of a transformer)."""
        trunc_normal_(self.weight, self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        if self.channel_first:
            if x.shape[0] > 1 and 3 <= x.dim() <= 5 and x.is_contiguous():
                # a batch with its channels first in memory: as a 1x1 conv, whose per-sample products
                # read the map in place (channels-last, F.linear first copies the whole batch
                # channels-last; 1.2-1.4x slower for a batch of 4-8 maps)
                w = self.weight.view(*self.weight.shape, *([1] * (x.dim() - 2)))
                return _CONVS[x.dim() - 3](x, w, self.bias)
            return F.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)
        return F.linear(x, self.weight, self.bias)


_CONVS = (F.conv1d, F.conv2d, F.conv3d)


class ChannelLayerNorm(nn.LayerNorm):
    def __init__(self, channels, eps=1e-5, affine=True, bias=True, channel_first=False):
        super().__init__(channels, eps, elementwise_affine=affine, bias=bias)
        self.channel_first = channel_first

    def forward(self, x):
        if self.channel_first:
            return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ChannelRMSNorm(nn.RMSNorm):
    def __init__(self, channels, eps=1e-6, channel_first=False):
        super().__init__(channels, eps)
        self.channel_first = channel_first

    def forward(self, x):
        if self.channel_first:
            return super().forward(x.movedim(1, -1)).movedim(-1, 1)
        return super().forward(x)


class ChannelScale(nn.Module):
    def __init__(self, channels, init=1e-5, channel_first=False):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), float(init)))
        self.channel_first = channel_first

    def forward(self, x):
        if self.channel_first:
            return x * self.scale.view(-1, *([1] * (x.ndim - 2)))
        return x * self.scale


class StarReLU(nn.Module):
    def __init__(self, scale=1.0, bias=0.0, learnable=True):
        super().__init__()
        if learnable:
            self.scale = nn.Parameter(torch.tensor([float(scale)]))
            self.bias = nn.Parameter(torch.tensor([float(bias)]))
        else:  # fixed scalars are buffers, so the parameter count is the rule's 0
            self.register_buffer("scale", torch.tensor([float(scale)]))
            self.register_buffer("bias", torch.tensor([float(bias)]))

    def forward(self, x):
        return self.scale * F.relu(x) ** 2 + self.bias


class SquaredReLU(nn.Module):
    def forward(self, x):
        return F.relu(x) ** 2


class ToTokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class ToMap(nn.Module):
    """The `to_map` op written in a blueprint: tokens folded on the grid they lie on at run time."""

    takes_grid = True

    def __init__(self, grid):
        super().__init__()
        self.grid = tuple(grid)

    def forward(self, x, grid=None):
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *(self.grid if grid is None else grid))


class GlobalPool(nn.Module):
    def __init__(self, mode, layout, extra, index=0):
        super().__init__()
        self.mode, self.layout, self.extra, self.index = mode, layout, extra, index

    def forward(self, x):
        if self.mode == "token":
            return x[:, self.index]
        if self.layout == "tokens":
            x = x[:, self.extra :]
            return x.mean(1) if self.mode == "avg" else x.amax(1)
        x = x.flatten(2)
        return x.mean(2) if self.mode == "avg" else x.amax(2)


class PrefixTokens(nn.Module):
    def __init__(self, count, channels, std):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, count, channels))
        if std > 0:
            nn.init.normal_(self.token, std=std)

    def forward(self, x):
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class PosEmbed(nn.Module):
    """An absolute position table (1, prefix + prod(grid), C) added to the tokens; `skip` prefix
    tokens pass without one. At another grid than the one it was built for, the table's grid part is
    resampled to the grid the tokens lie on (timm's `resample_abs_pos_embed`: bicubic with
    antialiasing in 2-D, linear in 1-D, trilinear in 3-D; the prefix rows unchanged). `antialias=False`:
    plain bicubic in 2-D (ViT-Adapter's `_get_pos_embed`)."""

    takes_grid = True

    def __init__(self, tokens, channels, std, skip, init="trunc_normal", trainable=True, grid=(), antialias=True):
        super().__init__()
        table = sinusoid_table(tokens, channels) if init == "sinusoid" else \
            trunc_normal_(torch.empty(1, tokens, channels), std)
        self.pos = nn.Parameter(table, requires_grad=trainable)
        self.skip = skip
        self.grid = tuple(grid)
        self.antialias = antialias

    def table(self, grid) -> torch.Tensor:
        grid = self.grid if grid is None else tuple(grid)
        if all(type(g) is int for g in grid) and grid == self.grid:  # (traced with symbolic sizes: resampled)
            return self.pos
        prefix = self.pos.shape[1] - math.prod(self.grid)
        head, body = self.pos[:, :prefix], self.pos[:, prefix:]
        c, nd = body.shape[-1], len(self.grid)
        body = body.float().reshape(1, *self.grid, c).movedim(-1, 1)
        mode = {1: "linear", 2: "bicubic", 3: "trilinear"}[nd]
        body = F.interpolate(body, size=grid, mode=mode, antialias=nd == 2 and self.antialias)
        body = body.movedim(1, -1).reshape(1, -1, c).to(self.pos.dtype)
        return torch.cat([head, body], dim=1) if prefix else body

    def forward(self, x, grid=None):
        pos = self.table(grid)
        if self.skip:
            return torch.cat([x[:, : self.skip], x[:, self.skip :] + pos], dim=1)
        return x + pos


def sinusoid_table(tokens: int, channels: int) -> torch.Tensor:
    """(1, tokens, channels): channel 2i holds sin(t / 10000^(2i / channels)), channel 2i + 1 the cos
    of the same angle (the Transformer's table over the token index t)."""
    t = torch.arange(tokens, dtype=torch.float64)[:, None]
    j = torch.arange(channels)
    angle = t / torch.pow(10000.0, (2 * (j // 2)).double() / channels)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class PatchMerging(nn.Module):
    """Swin's 2x downsampling of tokens on a grid (given at run time; `out_grid` tells the new one)."""

    takes_grid = True

    def __init__(self, grid, norm, cin, cout):
        super().__init__()
        self.grid = tuple(grid)
        self.norm = norm if norm is not None else nn.Identity()
        self.reduction = ChannelLinear(cin, cout, bias=False)

    def forward(self, x, grid=None):
        grid = self.grid if grid is None else tuple(grid)
        b, _, c = x.shape
        if len(grid) == 1:
            x = x.reshape(b, grid[0] // 2, 2 * c)
        else:
            h, w = grid
            # concatenation order (0,0), (1,0), (0,1), (1,1): the row offset changes fastest, as in Swin
            x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h * w // 4, 4 * c)
        return self.reduction(self.norm(x))

    @staticmethod
    def out_grid(grid):
        return tuple(g // 2 for g in grid)


class Stack(nn.Module):
    """Named submodules run in order (a fixed-structure op such as patch_embed's conv and norm)."""

    def __init__(self, **mods):
        super().__init__()
        for name, mod in mods.items():
            if mod is not None:
                self.add_module(name, mod)

    def forward(self, x):
        for mod in self._modules.values():
            x = mod(x)
        return x


class TokenLinear(nn.Module):
    """A linear along the token axis of (B, N, C): (B, C, N) -> linear over N -> back."""

    def __init__(self, tokens: int, bias: bool, init_std: float, bias_init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tokens, tokens))
        self.bias = nn.Parameter(torch.full((tokens,), float(bias_init))) if bias else None
        trunc_normal_(self.weight, init_std)

    def forward(self, x):
        return F.linear(x.transpose(1, 2), self.weight, self.bias).transpose(1, 2)


class TokenMixing(nn.Module):
    """An MLP applied along the token axis: (B, N, C) -> transpose -> fc1, act, fc2 -> back."""

    def __init__(self, fc1, act, fc2):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.transpose(1, 2)))).transpose(1, 2)


class Scale(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x * self.value

    def extra_repr(self) -> str:
        return f"value={self.value}"


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def built_on_cpu(fn):
    """For index and coordinate tables made with data-dependent ops (nonzero, unique, item) that the
    meta device lacks: compute them on the CPU, then move them to the device the model is being
    built on (so `composer info` and meta builds work)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        target = torch.empty(0).device
        with torch.device("cpu"):
            out = fn(*args, **kwargs)
        return tuple(t.to(target) for t in out) if isinstance(out, tuple) else out.to(target)

    return wrapper


class _Ties(threading.local):
    owners: dict | None = None  # tie key -> the module that owns the shared parameter; None outside a build


_TIES = _Ties()


@contextlib.contextmanager
def tie_scope():
    """While one model is built: modules that declare the same tie key share one parameter."""
    saved, _TIES.owners = _TIES.owners, {}
    try:
        yield
    finally:
        _TIES.owners = saved


def tie_owner(key, module: nn.Module) -> nn.Module:
    """The module that owns the parameter tied under `key`: `module` itself when it comes first
    in this build (or outside a build), else the first one (which `module` must then refer to
    without registering it, so the state_dict holds the parameter once)."""
    owners = _TIES.owners
    if owners is None or key is None:
        return module
    return owners.setdefault(key, module)
