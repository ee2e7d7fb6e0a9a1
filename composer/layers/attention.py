"""The torch module behind the `attention` op (see composer/ops/attention.py for the parts).

Submodules and their state_dict names:
  `qkv`                           one linear to q, k, v (the default);
  `q`, `kv`                       separate linears with a key source (`kv = reduce(...)` or any KeySource);
  `sr` / `pool`, `norm`           `reduce`'s strided conv or average pool and its norm (PVT), registered
                                  flat; other key sources under their `module_name`;
  `q`, `k`, `v`                   separate linears with `query = first(n)`;
  `conv_q`, `conv_k`, `conv_v`    CvT's convolutional projection, each `.conv` (depthwise, no bias)
                                  and `.bn`, followed by the linears `q`, `k`, `v`;
  `relative_position_bias_table`  the relative bias (window or grid groups), with the non-persistent
                                  buffer `relative_position_index`; (heads, 2w-1, ...) for
                                  `relative_bias_map`;
  `relative_pos`                  `learned_bias`: a dense (heads, queries, keys) bias (CMT);
  `linear_pos`, `pos_bias_u`, `pos_bias_v`  `relative_xl` (buffers `pos_table`, `pos_index`);
  `temperature`, `query_embedding`          `score = cosine(...)` (buffer `seq_length_scale`);
  `kv_tokens`                     `extra_kv = kv_tokens(n)`: (2, n, C) learned keys and values;
  `an_bias`, `na_bias`, `ah_bias`, `aw_bias`, `ha_bias`, `wa_bias`, `dwc`   `agents = agents(n)`;
  `lepe`                          LePE's depthwise conv on V or on the input (added to the output);
  `w`                             `score = performer(m)`: the frozen (m, head_dim) random features;
  `cpb_fc1`, `cpb_fc2`            `position = continuous_bias`: the bias MLP (buffers `cpb_table`, `cpb_index`);
  `relative_pos_bias_local`, `learnable_tokens`, `learnable_bias`   `neighbourhood(..., bias, tokens)`;
  `rel_pos_msg`                   `window(messengers = true)` with `relative_bias`: two scalars per head;
  an extra key source's modules   `extra_kv = reduce(...)`: `sr`, `norm` flat, with `q` and `kv` linears;
  `proj`                          the output projection.
Masks and index tables are buffers, built once at construction (`neighbour_index`/`neighbour_mask`
for neighbourhood partitions: every query's keys gathered from the projected tokens plus one zero
token; routed partitions gather the top-k regions' tokens per input).

`CascadedAttention`, the module behind the `cascaded_attention` op (EfficientViT-M's cascaded group
attention over a map: `qkvs.<i>`, `dws.<i>`, `attention_biases`), is at the end of this file.

Over 500 lines: it is the module of one op with pluggable parts, each part's submodules and forward
step in the one `Attention`; splitting the parts into objects of their own is the token-mixer
issue's work (attention as an algebra of primitives), which rewrites this module.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from . import attention_parts as parts
from .core import ChannelLinear, tie_owner, trunc_normal_


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for tail in _product(lists[1:]):
            yield (head, *tail)


def _relative_index(window: int, ndim: int) -> torch.Tensor:
    """(N, N) index into a ((2w-1)^ndim)-row table for every pair of positions of a w^ndim group."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * ndim, indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + window - 1  # (ndim, N, N), each in [0, 2w-2]
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for d in range(ndim):
        index = index * (2 * window - 1) + rel[d]
    return index


def _perm(ndim: int, mode: str) -> list[int]:
    # the grid is viewed as (count, size) per dim for windows and (size, count) for grid groups;
    # the permutation brings the group-count axes first and the in-group axes after them
    counts = [1 + 2 * d + (mode == "grid") for d in range(ndim)]
    members = [1 + 2 * d + (mode != "grid") for d in range(ndim)]
    return [0, *counts, *members, 2 * ndim + 1]


def _sizes(grid, size) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size,) * len(grid)


def _split(grid, size, mode):
    return [s for g, w in zip(grid, _sizes(grid, size)) for s in ((g // w, w) if mode == "window" else (w, g // w))]


def padded_grid(grid, size: int) -> tuple:
    """`grid` padded at the end of every dim up to a multiple of the window `size`."""
    return tuple(-(-g // size) * size for g in grid)


def partition_windows(x: torch.Tensor, grid, size, mode: str = "window") -> torch.Tensor:
    """(B, *grid, C) -> (B * groups, size**ndim, C). `window`: contiguous size^d windows (Swin);
    `grid`: each group holds the size^d tokens at stride grid/size (MaxViT grid attention)."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, *_split(grid, size, mode), c).permute(*_perm(len(grid), mode))
    return x.reshape(-1, math.prod(_sizes(grid, size)), c)


def unpartition_windows(x: torch.Tensor, grid, size, b, mode: str = "window") -> torch.Tensor:
    """The inverse of `partition_windows`: (B * groups, size**ndim, C) -> (B, prod(grid), C)."""
    c, ndim = x.shape[-1], len(grid)
    split = _split(grid, size, mode)
    perm = _perm(ndim, mode)
    x = x.reshape(b, *[split[p - 1] for p in perm[1:-1]], c)
    x = x.permute(*sorted(range(len(perm)), key=perm.__getitem__))
    return x.reshape(b, -1, c)


def _shift_mask(grid, window, shift) -> torch.Tensor:
    """-100 where a query and a key came from different regions of the rolled image (Swin)."""
    labels = torch.zeros(grid, dtype=torch.long)
    slices = [(slice(0, -window), slice(-window, -shift), slice(-shift, None))] * len(grid)
    count = 0
    for region in _product(slices):
        labels[region] = count
        count += 1
    windows = partition_windows(labels[None, ..., None], grid, window).squeeze(-1)  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


def _crop(x: torch.Tensor, grid) -> torch.Tensor:
    """(B, *padded, C) -> (B, *grid, C): the first `grid` positions of every dim. Traced with
    symbolic sizes (torch.export with dynamic height and width), gathered with `index_select`: a
    slice's strides would make the tracer guess whether anything was padded (a guard true only at
    the example's size)."""
    if all(type(g) is int for g in grid):
        return x[(slice(None), *[slice(0, g) for g in grid])]
    for d, g in enumerate(grid):
        x = x.index_select(d + 1, torch.arange(g, device=x.device))
    return x


def _conv_cls(ndim: int):
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]


def _to_map(t: torch.Tensor, grid) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def _to_tokens(m: torch.Tensor) -> torch.Tensor:
    return m.flatten(2).transpose(1, 2)


class TokensOf(nn.Module):
    """(B, C, *grid) -> (B, N, C): the default key source (keys and values from the tokens)."""

    def forward(self, x):
        return _to_tokens(x)


class ReduceKeys(nn.Module):
    """The `reduce` key source: a ratio-strided conv (`sr`) or average pool (`pool`), then `norm`
    over the tokens; (B, C, *grid) -> (B, M, C). `ratio=0` only flattens and normalises."""

    def __init__(self, dim, ndim, ratio=0, mode="conv", norm=None, pointwise=False, act=None):
        super().__init__()
        if pointwise:  # a 1x1 conv with bias before the pooling (TransNeXt)
            self.sr = _conv_cls(ndim)(dim, dim, 1)
        if act is not None:
            self.act = act
        if ratio:
            if mode in ("conv", "depthwise"):
                self.sr = _conv_cls(ndim)(dim, dim, ratio, ratio, groups=dim if mode == "depthwise" else 1)
            else:
                self.pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[ndim - 1](ratio, ratio)
        self.norm = norm if norm is not None else nn.Identity()
        self.norm_map = isinstance(norm, nn.modules.batchnorm._BatchNorm)  # batch norm over the map (CMT)

    def forward(self, x):
        if hasattr(self, "sr"):
            x = self.sr(x)
        if hasattr(self, "act"):
            x = self.act(x)
        if hasattr(self, "pool"):
            x = self.pool(x)
        if self.norm_map:
            return _to_tokens(self.norm(x))
        return self.norm(_to_tokens(x))


class Attention(nn.Module):
    """Multi-head attention over (B, extra + prod(grid), C) tokens; see the module docstring."""

    def __init__(self, dim, out, heads, grid, extra=0, qkv_bias=True, proj_bias=True, partition=None, size=0,
                 shift=0, padded=None, dilation=1, pad_mask=False, regions=0, topk=0, relative_bias=False,
                 learned_bias=None, relative_xl=False, key_source=None, key_source_name=None, key_source_query=False,
                 kv_grid=None, conv_proj=None, lepe=0, lepe_source="v", scale=None, input_query=False, queries=0,
                 keys_rest=False, cosine=None, kv_tokens=None, agents=None, cin=None, performer=None,
                 value_skip=False, local_bias=False, local_tokens=False, extra_source=None, extra_source_name=None,
                 extra_grid=None, continuous_bias=None, messengers=False, tie=None):
        super().__init__()
        self.value_skip, self.messengers = value_skip, messengers
        self.extra_grid = tuple(extra_grid) if extra_grid is not None else None
        cin = dim if cin is None else cin  # input channels; `dim` is the width of q, k, v
        self.input_query = input_query  # x carries [tokens (dim), queries (dim)]: kv from `qkv`
        self.heads, self.head_dim = heads, dim // heads
        self.qk_scale = self.head_dim ** -0.5 if scale is None else scale
        self.grid, self.extra = tuple(grid), extra
        self.partition, self.size, self.shift = partition, size, shift
        self.padded = tuple(padded) if padded is not None else self.grid  # the grid the groups tile
        self.scale = scale  # None: SDPA's default, head_dim^-0.5 (`qk_scale` where the product is explicit)
        self.queries, self.keys_rest = queries, keys_rest
        self.lepe_source = lepe_source
        ndim = len(self.grid)
        local = partition in ("window", "grid")
        self.group = (size,) * ndim if local else self.grid  # the grid of one window/grid group
        self.kv_grid = tuple(kv_grid) if kv_grid is not None else self.group
        # ---- projections
        if conv_proj is not None:  # CvT: depthwise conv + BN per q, k, v, then a linear each
            kernel, stride_kv = conv_proj
            self.stride_kv = stride_kv
            for name, stride in (("q", 1), ("k", stride_kv), ("v", stride_kv)):
                conv = _conv_cls(ndim)(cin, cin, kernel, stride, kernel // 2, groups=cin, bias=False)
                bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1](cin)
                self.add_module(f"conv_{name}", nn.Sequential(OrderedDict(conv=conv, bn=bn)))
        if conv_proj is not None or queries:
            self.q = ChannelLinear(cin, dim, qkv_bias)
            self.k = ChannelLinear(cin, dim, qkv_bias)
            self.v = ChannelLinear(cin, dim, qkv_bias)
        elif key_source is not None or extra_source is not None:
            # keys and values from a key source (PVT), or extra keys from one (TransNeXt): q and kv linears
            self.q = ChannelLinear(cin, dim, qkv_bias)
            self.kv = ChannelLinear(cin, 2 * dim, qkv_bias)
            self.key_source_query = key_source_query
            if key_source is not None:
                self._register_source("_key_source", key_source, key_source_name)
            if extra_source is not None:
                self._register_source("_extra_source", extra_source, extra_source_name)
        else:
            self.qkv = ChannelLinear(cin, (2 if input_query else 3) * dim, qkv_bias)
        if lepe:
            self.lepe = _conv_cls(ndim)(dim, dim, lepe, 1, lepe // 2, groups=dim)
        self.proj = ChannelLinear(dim, out, proj_bias) if out else nn.Identity()  # out=0: no projection
        # ---- scores
        self.cosine = cosine is not None
        if cosine is not None:  # TransNeXt: l2-normalised q, k; softplus temperature; log(keys) scale
            init, query_embedding, length_scale = cosine
            self.temperature = nn.Parameter(torch.full((heads, 1, 1), math.log(math.expm1(init))))
            if query_embedding:
                self.query_embedding = nn.Parameter(trunc_normal_(torch.empty(heads, 1, self.head_dim), 0.02))
            self.length_scale = length_scale
        self.kv_tokens_count = 0
        if kv_tokens is not None:
            count, std = kv_tokens
            self.kv_tokens_count = count
            self.kv_tokens = nn.Parameter(trunc_normal_(torch.empty(2, count, dim), std))
        n_extra = self.kv_tokens_count + (math.prod(self.extra_grid) if self.extra_grid is not None else 0)
        self.performer = performer is not None
        if performer is not None:  # FAVOR+: frozen orthogonal random features, scaled by sqrt(m)
            features, self.performer_eps = performer
            w = nn.init.orthogonal_(torch.empty(features, self.head_dim)) * math.sqrt(features)
            self.w = nn.Parameter(w, requires_grad=False)
        # ---- which keys a query sees
        if partition == "neighbourhood":
            index, inside = parts.neighbourhood_index(self.grid, size, dilation)
            self.register_buffer("neighbour_index", index, persistent=False)
            mask = torch.where(inside, 0.0, float("-inf"))[:, None] if pad_mask else None  # (N, 1, K)
            self.register_buffer("neighbour_mask", mask, persistent=False)
            keys = (inside.sum(-1) if pad_mask else torch.full((index.shape[0],), index.shape[1])) + n_extra
            length = keys.float().log()[:, None]  # (N, 1): per query
        elif partition == "routed":
            self.regions, self.topk = regions, topk
            self.region = tuple(g // regions for g in self.grid)
            length = math.log(topk * math.prod(self.region) + n_extra)
        elif queries:
            length = math.log(extra + math.prod(self.grid) - (queries if keys_rest else 0) + n_extra)
        else:
            length = math.log(math.prod(self.kv_grid) + (0 if local or key_source is not None else extra) + n_extra
                              + (1 if messengers else 0))
        if self.cosine:
            self.register_buffer("seq_length_scale", torch.as_tensor(length) if self.length_scale else None,
                                 persistent=False)
        # ---- position
        self.bias_map = relative_bias == "map"
        if self.bias_map:  # (heads, 2w-1, ...) read at the key-minus-query offset (TF MaxViT)
            self.relative_position_bias_table = nn.Parameter(
                nn.init.normal_(torch.empty(heads, *[2 * size - 1] * ndim), std=0.02)
            )
            self.register_buffer("relative_position_index", _relative_index(size, ndim).t().contiguous(),
                                 persistent=False)
        elif relative_bias:
            self.relative_position_bias_table = nn.Parameter(
                trunc_normal_(torch.empty((2 * size - 1) ** ndim, heads), 0.02)
            )
            self.register_buffer("relative_position_index", _relative_index(size, ndim), persistent=False)
        self.learned_bias = learned_bias is not None
        if learned_bias is not None:  # CMT: a dense (heads, queries, keys) bias, maybe one per stage (tie)
            nq, nk, std = learned_bias
            owner = tie_owner(tie, self)
            if owner is self:
                self.relative_pos = nn.Parameter(nn.init.normal_(torch.empty(heads, nq, nk), std=std))
            else:  # a plain attribute: not registered, so the table is stored once
                self.__dict__["_bias_owner"] = owner
        self.relative_xl = relative_xl
        if relative_xl:  # Transformer-XL / Conformer relative positions over the token index
            t = extra + math.prod(self.grid)
            self.linear_pos = ChannelLinear(dim, dim, bias=False)
            self.pos_bias_u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(heads, self.head_dim)))
            self.pos_bias_v = nn.Parameter(nn.init.xavier_uniform_(torch.empty(heads, self.head_dim)))
            self.register_buffer("pos_table", parts.sinusoid_relative(t, dim), persistent=False)
            self.register_buffer("pos_index", parts.relative_offset_index(t), persistent=False)
        if messengers and relative_bias:  # messenger -> all (row) and grid -> messenger (column) scalars
            self.rel_pos_msg = nn.Parameter(trunc_normal_(torch.empty(heads, 2, 1, 1), 0.02))
        if local_bias:  # TransNeXt: a bias per head and neighbour offset
            k = size ** ndim
            self.relative_pos_bias_local = nn.Parameter(trunc_normal_(torch.empty(heads, k), 0.0004))
        if local_tokens:  # TransNeXt's learnable tokens: query-conditioned neighbour weights
            k = size ** ndim
            self.learnable_tokens = nn.Parameter(trunc_normal_(torch.empty(heads, self.head_dim, k), 0.02))
            self.learnable_bias = nn.Parameter(torch.zeros(heads, 1, k))
        self.continuous = continuous_bias is not None
        if continuous_bias is not None:
            hidden, key_grid, coords, drop = continuous_bias
            self.cpb_fc1 = ChannelLinear(ndim, hidden)
            self.cpb_act = nn.ReLU()
            self.cpb_drop = nn.Dropout(drop) if drop else nn.Identity()
            self.cpb_fc2 = ChannelLinear(hidden, heads)
            index, table = parts.continuous_table(self.group, tuple(key_grid), coords)  # one group's queries
            self.register_buffer("cpb_index", index, persistent=False)
            self.register_buffer("cpb_table", table, persistent=False)
            self.cpb_keys = math.prod(key_grid)
        mask = None
        if partition == "window" and shift:
            mask = _shift_mask(self.padded, size, shift)[:, None]  # (nW, 1, N, N)
        self.register_buffer("attn_mask", mask, persistent=False)
        # ---- agents
        self.agents = agents is not None
        if agents is not None:
            count, kernel, table = agents
            self.agent_count, self.agent_side = count, round(count ** (1 / ndim))
            std = 0.02
            self.an_bias = nn.Parameter(trunc_normal_(torch.empty(heads, count, *[table] * ndim), std))
            self.na_bias = nn.Parameter(trunc_normal_(torch.empty(heads, count, *[table] * ndim), std))
            names = (("ah_bias", "ha_bias"), ("aw_bias", "wa_bias"))
            for i in range(ndim):
                kshape = [self.kv_grid[j] if j == i else 1 for j in range(ndim)]
                qshape = [self.group[j] if j == i else 1 for j in range(ndim)]
                setattr(self, names[i][0], nn.Parameter(trunc_normal_(torch.empty(1, heads, count, *kshape), std)))
                setattr(self, names[i][1], nn.Parameter(trunc_normal_(torch.empty(1, heads, *qshape, count), std)))
            self.agent_axes = [n for pair in names[:ndim] for n in pair]
            self.dwc = _conv_cls(ndim)(dim, dim, kernel, 1, kernel // 2, groups=dim)

    # ------------------------------------------------------------------ helpers
    def _register_source(self, attr, source, name):
        if name is None:  # children and own parameters registered flat (reduce: `sr`/`pool`, `norm`)
            for child_name, child in source.named_children():
                self.add_module(child_name, child)
            for param_name, param in source.named_parameters(recurse=False):  # deformable: `rpe_table`
                self.register_parameter(param_name, param)
            object.__setattr__(self, attr, source)  # not registered twice
        else:
            self.add_module(name, source)
            object.__setattr__(self, attr + "_name", name)

    def _source(self, attr):
        name = getattr(self, attr + "_name", None)
        return getattr(self, name) if name is not None else getattr(self, attr)

    def _continuous_bias(self):
        """(heads, N, M): the bias MLP over the distinct relative coordinates, gathered."""
        b = self.cpb_fc2(self.cpb_drop(self.cpb_act(self.cpb_fc1(self.cpb_table))))  # (U, heads)
        return b.t()[:, self.cpb_index].view(-1, math.prod(self.group), self.cpb_keys)

    def _bias(self, mask=None):
        """The additive score bias: position tables, then `mask` (the shifted windows' mask for the
        grid at hand, (nW, 1, N, N))."""
        bias = None
        if hasattr(self, "relative_position_bias_table"):
            n = self.relative_position_index.shape[0]
            if self.bias_map:
                table = self.relative_position_bias_table.flatten(1)[:, self.relative_position_index.view(-1)]
                bias = table.view(-1, n, n)  # (heads, N, N)
            else:
                table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
                bias = table.view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)
            if hasattr(self, "rel_pos_msg"):  # the messenger first: its row, then its column
                h, m = self.rel_pos_msg.shape[0], bias.shape[-1]
                bias = torch.cat([self.rel_pos_msg[:, 0].expand(h, m, 1), bias], -1)
                bias = torch.cat([self.rel_pos_msg[:, 1].expand(h, 1, m + 1), bias], -2)
        if self.continuous and self.partition != "neighbourhood":
            bias = self._continuous_bias()
        if mask is not None:
            bias = mask if bias is None else bias + mask  # (nW, heads, N, N)
        if bias is not None and self.kv_tokens_count:
            bias = F.pad(bias, (self.kv_tokens_count, 0))  # learned kv tokens: no bias
        if self.learned_bias:
            rp = self._learned_bias()
            bias = rp if bias is None else bias + rp
        return bias

    def _learned_bias(self):
        owner = self.__dict__.get("_bias_owner", self)
        return owner.relative_pos

    def _heads(self, t):
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], self.heads * self.head_dim)

    def _windows(self, grid):
        """(the grid the windows tile, the shifted windows' mask) for tokens on `grid`: the build
        grid's, or at another grid (a model run at another input size) padded up to a multiple of
        the window with the mask for it, computed once per grid. The window and the shift stay the
        build's (as timm's Swin does with strict_img_size=False)."""
        symbolic = not all(type(g) is int for g in grid)  # traced by torch.export with dynamic sizes
        if not symbolic and grid == self.grid:  # `grid` itself when nothing is padded (the forward
            return (grid if self.padded == self.grid else self.padded), self.attn_mask  # tests identity)
        if self.partition != "window":
            return grid, None
        padded = padded_grid(grid, self.size)
        if not symbolic and padded == grid:
            padded = grid
        if not self.shift:
            return padded, None
        if symbolic:  # made in the traced program, for whatever size it gets
            return padded, _shift_mask(padded, self.size, self.shift)[:, None].to(self.attn_mask)
        cache = self.__dict__.setdefault("_masks", {})
        mask = cache.get(padded)
        if mask is None or mask.device != self.attn_mask.device:
            mask = cache[padded] = _shift_mask(padded, self.size, self.shift)[:, None].to(self.attn_mask)
        return padded, mask

    def _xl_tables(self, length):
        """relative_xl's sinusoid table (2T-1, C) and offset index (T, T) for T tokens: the buffers at
        the build length, else made for T (once per length; in the traced program when symbolic)."""
        dev = self.pos_table.device
        if type(length) is not int:
            return parts.sinusoid_relative(length, self.pos_table.shape[1]).to(dev), \
                parts.relative_offset_index(length).to(dev)
        if length == self.pos_index.shape[0]:
            return self.pos_table, self.pos_index
        cache = self.__dict__.setdefault("_xl", {})
        made = cache.get(length)
        if made is None or made[0].device != dev:
            with torch.device(dev):
                made = cache[length] = (parts.sinusoid_relative(length, self.pos_table.shape[1]),
                                        parts.relative_offset_index(length))
        return made

    def _roll(self, x, shift):
        nd = x.dim() - 2
        return torch.roll(x, [shift] * nd, dims=list(range(1, nd + 1)))

    def _conv_project(self, x, grid):
        e = self.extra
        cls, img = x[:, :e], x[:, e:]
        m = _to_map(img, grid)
        q, k, v = (torch.cat([cls, _to_tokens(getattr(self, f"conv_{n}")(m))], 1) for n in "qkv")
        return self.q(q), self.k(k), self.v(v)

    def _project(self, x, grid):
        """q (B', L, C), k and v (B', M, C) tokens; `grid`: the tokens' grid at run time."""
        c = self.heads * self.head_dim
        if self.input_query:
            x, q = x.split(c, dim=-1)
            k, v = self.qkv(x).split(c, dim=-1)
        elif hasattr(self, "qkv"):
            q, k, v = self.qkv(x).split(c, dim=-1)
        elif hasattr(self, "conv_q"):
            q, k, v = self._conv_project(x, grid)
        elif self.queries:
            src = x[:, self.queries:] if self.keys_rest else x
            q, k, v = self.q(x[:, : self.queries]), self.k(src), self.v(src)
        elif self.extra_grid is not None:  # the tokens' keys; the extra source's in `_extra_keys`
            q = self.q(x)
            k, v = self.kv(x).split(c, dim=-1)
        else:
            q = self.q(x)
            source = self._source("_key_source")
            if self.key_source_query:
                src = source(_to_map(x, grid), _to_map(q, grid))
            else:
                src = source(_to_map(x, grid))
            if isinstance(src, tuple):  # a key source with a score bias (B, heads, N, M), added in `_attention`
                src, self._source_bias = src
            k, v = self.kv(src).split(c, dim=-1)
        return q, k, v

    def _extra_keys(self, x, grid):
        """Keys and values of the extra key source, heads split: (B, h, P, d) each."""
        c = self.heads * self.head_dim
        k, v = self.kv(self._source("_extra_source")(_to_map(x, grid))).split(c, dim=-1)
        k, v = self._heads(k), self._heads(v)
        return (F.normalize(k, dim=-1) if self.cosine else k), v

    def _performer(self, q, k, v):
        """FAVOR+ linear attention: phi(q) (phi(K)^T V) / (phi(q) . sum_j phi(k_j) + eps), per head."""
        m = self.w.shape[0]

        def phi(t):
            return torch.exp(t @ self.w.t() - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(m)

        qp, kp = phi(q), phi(k)  # (B, h, N, m), (B, h, M, m)
        kv = kp.transpose(-2, -1) @ v  # (B, h, m, d)
        norm = qp @ kp.sum(2).unsqueeze(-1)  # (B, h, N, 1)
        return (qp @ kv) / (norm + self.performer_eps)

    def _cosine_q(self, q):
        q = F.normalize(q, dim=-1)
        if hasattr(self, "query_embedding"):
            q = q + self.query_embedding
        q = q * F.softplus(self.temperature)
        if self.seq_length_scale is not None:
            q = q * self.seq_length_scale
        return q

    def _with_kv_tokens(self, k, v):
        """Prepend the learned key/value tokens: k, v (..., S, d) with heads at dim 1."""
        n = self.kv_tokens_count
        t = self.kv_tokens.view(2, n, self.heads, self.head_dim).transpose(1, 2)  # (2, heads, n, d)
        if self.cosine:
            t = torch.stack([F.normalize(t[0], dim=-1), t[1]])
        shape = (1, self.heads) + (1,) * (k.dim() - 4) + (n, self.head_dim)
        tk, tv = (s.view(shape).expand(*k.shape[:-2], n, self.head_dim) for s in t)
        return torch.cat([tk, k], -2), torch.cat([tv, v], -2)

    def _scores(self, q, k, bias):
        scale = 1.0 if self.cosine else self.qk_scale
        a = (q * scale) @ k.transpose(-2, -1)
        return a if bias is None else a + bias

    def _attend(self, q, k, v, bias):
        scale = 1.0 if self.cosine else self.scale
        if (bias is not None and not q.is_cuda) or q.dim() != 4 or self.queries:
            # an additive bias on the CPU: SDPA's float-mask path re-checks the mask every call and is
            # slower than the plain product (timm's Swin does the same); few queries (first(n)): plain
            # matmuls, as the references, which FLOP counters also see
            return self._scores(q, k, bias).softmax(dim=-1) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    # ------------------------------------------------------------------ forward
    takes_grid = True  # the builder passes the grid the tokens lie on at run time

    def forward(self, x, grid=None):
        """`grid`: the grid of the tokens at run time (the build grid when not given). Only the
        configurations the op's `runtime_grid` admits ever get another grid than the build one."""
        grid = self.grid if grid is None else tuple(grid)
        padded, mask = self._windows(grid)
        b, n = x.shape[:2]
        c = self.heads * self.head_dim
        x_in = x
        if self.messengers:  # one prefix token per window: it joins its window
            msg, x = x[:, :self.extra], x[:, self.extra:]
        if self.partition in ("window", "grid"):
            x = x.reshape(b, *grid, x.shape[-1])
            pad_first = self.__dict__.get("pad_first", False)  # see the op's `build`
            if self.shift and not pad_first:
                x = self._roll(x, -self.shift)
            if padded is not grid:  # zero tokens at the end of every dim (Twins, Swin)
                x = F.pad(x, [0, 0] + [a for g, p in zip(grid[::-1], padded[::-1]) for a in (0, p - g)])
            if self.shift and pad_first:
                x = self._roll(x, -self.shift)
            x = partition_windows(x, padded, self.size, self.partition)
            if self.messengers:
                x = torch.cat([msg.reshape(-1, 1, msg.shape[-1]), x], 1)  # (B * nW, 1 + N, C)
        q, k, v = self._project(x, grid)
        v_skip = v
        extra = self._extra_keys(x, grid) if self.extra_grid is not None else None
        if self.agents:
            y = self._agents(q, k, v)
        else:
            y, v = self._attention(q, k, v, b, extra, mask)
        if hasattr(self, "lepe"):  # LePE: a depthwise conv added to the output
            if self.lepe_source == "input":
                y = y + _to_tokens(self.lepe(_to_map(x_in, grid)))
            else:  # over V: per window/grid group, else over the whole map
                y = y + _to_tokens(self.lepe(_to_map(v, self.group if self.partition else grid)))
        if self.messengers:
            msg, y = y[:, 0].reshape(b, -1, c), y[:, 1:]
        if self.partition in ("window", "grid"):
            y = unpartition_windows(y, padded, self.size, b, self.partition)
            if self.shift and pad_first:
                y = self._roll(y.view(b, *padded, c), self.shift).reshape(b, -1, c)
            if padded is not grid:
                y = _crop(y.view(b, *padded, c), grid).reshape(b, -1, c)
            if self.shift and not pad_first:
                y = self._roll(y.view(b, *grid, c), self.shift).reshape(b, -1, c)
        if self.messengers:
            y = torch.cat([msg, y], 1)
        if self.value_skip:  # T2T: y = v + proj(attention)
            return self.proj(y) + v_skip
        return self.proj(y)

    def _attention(self, q, k, v, b, extra=None, mask=None):
        """(y tokens (B', L, C), v tokens for LePE); `extra`: the extra source's keys and values;
        `mask`: the shifted windows' mask for the grid at hand."""
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        v_tokens = v
        if self.performer:
            return self._merge(self._performer(q, k, v)), self._merge(v_tokens)
        q_unit = F.normalize(q, dim=-1) if hasattr(self, "learnable_tokens") else None
        bias = None
        if self.relative_xl:  # ((q + u) k^T + (q + v') P_{i-j}^T) * scale
            table, index = self._xl_tables(q.shape[2])
            p = self.linear_pos(table).view(-1, self.heads, self.head_dim).transpose(0, 1)  # (h, 2T-1, d)
            pos = (q + self.pos_bias_v[:, None]) @ p.transpose(-2, -1)  # (B, h, T, 2T-1)
            pos = pos.gather(-1, index.expand(*pos.shape[:2], -1, -1))
            q = q + self.pos_bias_u[:, None]
            bias = pos * self.qk_scale
        if self.cosine:
            q, k = self._cosine_q(q), F.normalize(k, dim=-1)
        if self.partition == "neighbourhood":
            y = self._neighbourhood(q, k, v, extra, q_unit)
        elif self.partition == "routed":
            y = self._routed(q, k, v)
        else:
            if self.kv_tokens_count:
                k, v = self._with_kv_tokens(k, v)
            if extra is not None:  # extra keys from a source: more keys, the same softmax
                k, v = torch.cat([k, extra[0]], 2), torch.cat([v, extra[1]], 2)
            pb = self._bias(mask)
            if pb is not None:
                bias = pb if bias is None else bias + pb
            sb = self.__dict__.pop("_source_bias", None)  # from the key source (deformable(bias = true))
            if sb is not None:
                bias = sb if bias is None else bias + sb
            bw, nw = q.shape[0], q.shape[2]
            if mask is not None:
                nwin = mask.shape[0]
                q, k, v = (t.reshape(t.shape[0] // nwin, nwin, self.heads, t.shape[2], self.head_dim)
                           for t in (q, k, v))  # bias (nW, 1|heads, N, N)
            y = self._attend(q, k, v, bias).reshape(bw, self.heads, nw, self.head_dim)
        return self._merge(y), self._merge(v_tokens)

    def _neighbourhood(self, q, k, v, extra=None, q_unit=None):
        """Each query attends to its gathered neighbours (and to the extra source's keys, in the same
        softmax): q (B, h, N, d) -> (B, h, N, d)."""
        b, h, n, d = k.shape
        idx = self.neighbour_index
        count = idx.shape[1]
        zero = k.new_zeros(b, h, 1, d)
        k = torch.cat([k, zero], 2)[:, :, idx.view(-1)].view(b, h, n, count, d)
        v = torch.cat([v, zero], 2)[:, :, idx.view(-1)].view(b, h, n, count, d)
        bias = self.neighbour_mask
        if hasattr(self, "relative_pos_bias_local"):
            lb = self.relative_pos_bias_local.view(h, 1, 1, count)
            bias = lb if bias is None else bias + lb
        if self.kv_tokens_count:
            k, v = self._with_kv_tokens(k, v)
            if bias is not None:
                bias = F.pad(bias, (self.kv_tokens_count, 0))
        if self.learned_bias:
            rp = self._learned_bias().unsqueeze(2)  # (h, N, 1, K)
            bias = rp if bias is None else bias + rp
        logits = self._scores(q.unsqueeze(3), k, bias)  # (B, h, N, 1, K)
        if extra is None:
            a = logits.softmax(-1)
        else:  # the pooled keys: one set for every query, one softmax with the neighbours
            pooled = self._scores(q, extra[0], self._continuous_bias() if self.continuous else None)  # (B, h, N, P)
            a = torch.cat([logits, pooled.unsqueeze(3)], -1).softmax(-1)
            a, a_pooled = a.split([logits.shape[-1], pooled.shape[-1]], -1)
        if q_unit is not None:  # query-conditioned neighbour weights, added after the softmax
            dyn = (q_unit @ self.learnable_tokens + self.learnable_bias).unsqueeze(3)  # (B, h, N, 1, K)
            a = a + F.pad(dyn, (self.kv_tokens_count, 0))
        y = (a @ v).squeeze(3)  # (B, h, N, d)
        if extra is not None:
            y = y + a_pooled.squeeze(3) @ extra[1]
        return y

    def _routed(self, q, k, v):
        """Bi-level routing: q, k, v (B, h, N, d) -> (B, h, N, d)."""
        b = q.shape[0]
        region = self.region
        q, k, v = (partition_windows(self._merge(t).view(b, *self.grid, -1), self.grid, region).view(
            b, -1, math.prod(region), self.heads * self.head_dim) for t in (q, k, v))  # (B, R, w, C)
        with torch.no_grad():  # region affinity, no gradient (BiFormer detaches)
            affinity = q.mean(2) @ k.mean(2).transpose(-2, -1)  # (B, R, R)
            index = affinity.topk(self.topk, dim=-1).indices  # (B, R, topk)
        batch = torch.arange(b, device=q.device)[:, None, None]
        r, w = q.shape[1], q.shape[2]
        k, v = (t[batch, index].reshape(b * r, self.topk * w, -1) for t in (k, v))  # (B*R, topk*w, C)
        q = q.reshape(b * r, w, -1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.kv_tokens_count:
            k, v = self._with_kv_tokens(k, v)
        y = self._attend(q, k, v, None)  # (B*R, h, w, d)
        y = unpartition_windows(self._merge(y), self.grid, region, b)  # (B, N, C)
        return self._heads(y)

    def _agents(self, q, k, v):
        """Agent attention: q (B', N, C), k, v (B', M, C) -> (B', N, C)."""
        bw, n, c = q.shape
        h, a = self.heads, self.agent_count
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)[len(self.group) - 1]
        agents = _to_tokens(pool(_to_map(q, self.group), self.agent_side))  # (B', a, C)
        q, k, vh, agents = self._heads(q), self._heads(k), self._heads(v), self._heads(agents)
        scale = self.qk_scale
        axes = [getattr(self, name) for name in self.agent_axes]
        bias1 = parts.resize_table(self.an_bias, self.kv_grid) + parts.axis_tables(axes[0::2], h, a, self.kv_grid, False)
        agent_v = ((agents * scale) @ k.transpose(-2, -1) + bias1).softmax(-1) @ vh  # (B', h, a, d)
        bias2 = parts.resize_table(self.na_bias, self.group).transpose(-2, -1) + parts.axis_tables(
            axes[1::2], h, a, self.group, True)
        y = self._merge(((q * scale) @ agents.transpose(-2, -1) + bias2).softmax(-1) @ agent_v)
        vmap = _to_map(v, self.kv_grid)
        if self.kv_grid != self.group:
            vmap = F.interpolate(vmap, size=self.group, mode=("linear", "bilinear")[len(self.group) - 1])
        return y + _to_tokens(self.dwc(vmap))


# ------------------------------------------------------------------------------ cascaded group attention
def _offset_index(group) -> torch.Tensor:
    """(N, N) index of the absolute offset (|d1|, |d2|, ...) between two positions of a group, in
    mixed radix (|d1| * g2 + |d2| in 2-D): the order in which the offsets first occur."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in group], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).abs()
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for d, g in enumerate(group):
        index = index * g + rel[d]
    return index


def _conv_bn(ndim, cin, cout, kernel=1, groups=1):
    conv = _conv_cls(ndim)(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1](cout)
    return nn.Sequential(OrderedDict(conv=conv, bn=bn))


class CascadedAttention(nn.Module):
    """Cascaded group attention over a map (B, C, *grid) (the `cascaded_attention` op).

    Submodules: `qkvs.<i>` (1x1 conv + BN to q, k, v of head i), `dws.<i>` (depthwise conv + BN on
    the query; absent for kernel 0), parameter `attention_biases` (heads x prod(group)) with the
    non-persistent buffer `attention_bias_idxs`. With windows the map is zero-padded to the padded
    grid, cut into windows, attended window by window, and cropped back."""

    def __init__(self, dim, heads, key_dim, kernels, grid, size=0, padded=None, offset_bias=False, scale=None):
        super().__init__()
        ndim = len(grid)
        self.heads, self.key_dim, self.val_dim = heads, key_dim, dim // heads
        self.grid, self.size = tuple(grid), size
        self.padded = tuple(padded) if padded is not None else self.grid
        self.group = (size,) * ndim if size else self.grid
        self.scale = key_dim ** -0.5 if scale is None else scale
        self.qkvs = nn.ModuleList(_conv_bn(ndim, self.val_dim, 2 * key_dim + self.val_dim) for _ in range(heads))
        self.dws = nn.ModuleList(_conv_bn(ndim, key_dim, key_dim, k, groups=key_dim) if k else nn.Identity()
                                 for k in kernels)
        if offset_bias:
            n = 1
            for g in self.group:
                n *= g
            self.attention_biases = nn.Parameter(torch.zeros(heads, n))
            self.register_buffer("attention_bias_idxs", _offset_index(self.group), persistent=False)

    def _padded(self, grid):
        """The grid the windows tile for a map on `grid`: the build's, or at another grid (another
        input size) padded up to a multiple of the build's window (timm's LocalWindowAttention)."""
        if grid == self.grid:
            return self.padded
        return padded_grid(grid, self.size)

    def _windows(self, x, grid, padded):
        b, c = x.shape[:2]
        x = x.movedim(1, -1)
        if padded != grid:  # zeros at the end of every dim
            x = F.pad(x, [0, 0] + [a for g, p in zip(grid[::-1], padded[::-1]) for a in (0, p - g)])
        x = partition_windows(x, padded, self.size)  # (B * nW, N, C)
        return x.transpose(1, 2).reshape(x.shape[0], c, *self.group)

    def _unwindows(self, y, b, grid, padded):
        c = y.shape[1]
        y = unpartition_windows(y.flatten(2).transpose(1, 2), padded, self.size, b)  # (B, prod(padded), C)
        y = y.view(b, *padded, c)
        if padded != grid:
            y = y[(slice(None), *[slice(0, g) for g in grid])]
        return y.movedim(-1, 1).contiguous()

    def forward(self, x):
        b, grid = x.shape[0], tuple(x.shape[2:])  # the grid at run time (the op admits others with windows)
        windowed = self.size and self.group != grid
        if windowed:
            padded = self._padded(grid)
            x = self._windows(x, grid, padded)
        bias = None
        if hasattr(self, "attention_biases"):
            bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N)
        bw, spatial = x.shape[0], x.shape[2:]
        outs, feat = [], None
        for i, (chunk, qkv, dw) in enumerate(zip(x.chunk(self.heads, dim=1), self.qkvs, self.dws)):
            feat = chunk if i == 0 else feat + chunk
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            # explicit matmuls: with head dims this small (and an additive bias) they beat the fused
            # CPU kernel, and they are the reference's formulation
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, d, N)
            scores = (q * self.scale).transpose(1, 2) @ k  # (B, N, N)
            if bias is not None:
                scores = scores + bias[i]
            feat = (v @ scores.softmax(-1).transpose(1, 2)).reshape(bw, self.val_dim, *spatial)
            outs.append(feat)
        y = torch.cat(outs, 1)
        return self._unwindows(y, b, grid, padded) if windowed else y
