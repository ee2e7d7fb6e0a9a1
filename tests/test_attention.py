"""The attention op against independent, straightforward implementations of the papers' formulas.

Each reference below is written from the paper (explicit loops over windows/groups, explicit
gathers, softmax(q k^T * scale + bias) v, torch.roll for Swin's shift, Swin's mask built by hand
from region labels), takes the op module's weights and must agree within 1e-5 (in float64).
Hypothesis checks the shape, parameter and MAC rules against the built modules."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from composer.ops.attention import LePE, Attention, ConvProj, Grid, Reduce, RelativeBias, Window
from composer.ops.norm import LayerNorm
from composer.shapes import Shape, ShapeError

torch.set_num_threads(1)
TOL = 1e-5


def build(op, x):
    """The op's module for input shape `x`, in float64 with every parameter and BN statistic random."""
    y = op.infer(x)
    torch.manual_seed(0)
    mod = op.build(x, y).double().eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)
        for name, b in mod.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return mod, y


def p(mod, name):
    return dict(mod.named_parameters())[name].detach()


def linear(x, mod, name):
    b = dict(mod.named_parameters()).get(f"{name}.bias")
    y = x @ p(mod, f"{name}.weight").T
    return y if b is None else y + b.detach()


def sdpa(q, k, v, heads, scale=None, bias=None):
    """softmax(q k^T * scale + bias) v, heads split explicitly. q: (N, C), k, v: (M, C); bias (heads, N, M)."""
    n, c = q.shape
    d = c // heads
    scale = d ** -0.5 if scale is None else scale
    out = []
    for h in range(heads):
        qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))
        s = (qh @ kh.T) * scale
        if bias is not None:
            s = s + bias[h]
        out.append(torch.softmax(s, -1) @ vh)
    return torch.cat(out, -1)


def coords(grid):
    return list(itertools.product(*[range(g) for g in grid]))


def flat(c, grid):
    i = 0
    for ci, g in zip(c, grid):
        i = i * g + ci
    return i


def groups(grid, size, mode):
    """Token index lists per group; members in row-major order of their in-group coordinates."""
    if mode == "window":  # contiguous size^d blocks (Swin, MaxViT block attention)
        starts = itertools.product(*[range(0, g, size) for g in grid])
        return [[flat([s + a for s, a in zip(st_, off)], grid) for off in coords((size,) * len(grid))] for st_ in starts]
    stride = [g // size for g in grid]  # MaxViT grid attention: members at stride grid/size
    return [[flat([a * s + o for a, s, o in zip(off, stride, origin)], grid) for off in coords((size,) * len(grid))]
            for origin in coords(stride)]


def relative_bias(table, size, ndim):
    """(heads, N, N): table row for the relative offset (dy, dx) of two members, offsets read off the coordinates."""
    members = coords((size,) * ndim)
    n = len(members)
    bias = torch.zeros(table.shape[1], n, n, dtype=table.dtype)
    for i, a in enumerate(members):
        for j, b in enumerate(members):
            row = 0
            for d in range(ndim):
                row = row * (2 * size - 1) + (a[d] - b[d] + size - 1)
            bias[:, i, j] = table[row]
    return bias


def swin_mask(grid, window, shift, members):
    """-100 between tokens of different regions of the rolled map (the Swin paper's cyclic-shift mask)."""
    def label(c):
        lab = 0
        for ci, g in zip(c, grid):
            lab = lab * 3 + (0 if ci < g - window else 1 if ci < g - shift else 2)
        return lab

    cs = coords(grid)
    labels = torch.tensor([label(cs[i]) for i in members])
    return torch.where(labels[:, None] != labels[None, :], -100.0, 0.0).double()


def ref_partitioned(x, mod, grid, heads, size, mode, shift=0, lepe=None):
    """Window/grid attention, with relative bias, optional shift (Swin) and optional LePE, token by token."""
    b, n, c = x.shape
    ndim = len(grid)
    if shift:
        x = torch.roll(x.view(b, *grid, c), [-shift] * ndim, list(range(1, ndim + 1))).reshape(b, n, c)
    table = dict(mod.named_parameters()).get("relative_position_bias_table")
    bias = relative_bias(table.detach(), size, ndim) if table is not None else torch.zeros(heads, 1, 1, dtype=x.dtype)
    qkv = linear(x, mod, "qkv")
    out = torch.zeros(b, n, c, dtype=x.dtype)
    for bi in range(b):
        for members in groups(grid, size, mode):
            q, k, v = qkv[bi, members].split(c, -1)
            bb = bias + (swin_mask(grid, size, shift, members) if shift else 0)
            y = sdpa(q, k, v, heads, bias=bb)
            if lepe is not None:
                y = y + dwconv(v.T.reshape(c, *(size,) * ndim), p(mod, "lepe.weight"), p(mod, "lepe.bias"), 1,
                               lepe // 2).reshape(c, -1).T
            out[bi, members] = y
    out = linear(out, mod, "proj")
    if shift:
        out = torch.roll(out.view(b, *grid, -1), [shift] * ndim, list(range(1, ndim + 1))).reshape(b, n, -1)
    return out


def dwconv(m, weight, bias, stride, pad):
    """Depthwise conv of one (C, *grid) map as an explicit sum over kernel offsets."""
    ndim, k = m.dim() - 1, weight.shape[-1]
    m = F.pad(m, [pad] * (2 * ndim))
    outsz = [(s - k) // stride + 1 for s in m.shape[1:]]
    out = torch.zeros(m.shape[0], *outsz, dtype=m.dtype)
    for off in coords((k,) * ndim):
        sl = tuple(slice(o, o + stride * (s - 1) + 1, stride) for o, s in zip(off, outsz))
        out += weight[(slice(None), 0, *off)].view(-1, *[1] * ndim) * m[(slice(None), *sl)]
    return out if bias is None else out + bias.view(-1, *[1] * ndim)


def batchnorm(m, mod, name):
    w, b = p(mod, f"{name}.weight"), p(mod, f"{name}.bias")
    buf = dict(mod.named_buffers())
    mean, var = buf[f"{name}.running_mean"], buf[f"{name}.running_var"]
    shape = (-1,) + (1,) * (m.dim() - 1)
    return (m - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5) * w.view(shape) + b.view(shape)


def layernorm(t, mod, name, eps=1e-5):
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + eps) * p(mod, f"{name}.weight") + p(mod, f"{name}.bias")


def ref_sra(x, mod, grid, heads, ratio, mode):
    """PVT's spatial-reduction attention: keys/values from a ratio-strided patch conv (or average) + LayerNorm."""
    b, n, c = x.shape
    q = linear(x, mod, "q")
    out = []
    for bi in range(b):
        m = x[bi].T.reshape(c, *grid)
        red = []
        for cell in coords([g // ratio for g in grid]):  # one reduced token per ratio^d patch
            patch = m[(slice(None), *[slice(ci * ratio, (ci + 1) * ratio) for ci in cell])]
            if mode == "conv":
                w = p(mod, "sr.weight")  # (C, C, r, ...)
                red.append((w * patch[None]).flatten(1).sum(1) + p(mod, "sr.bias"))
            else:
                red.append(patch.flatten(1).mean(1))
        src = layernorm(torch.stack(red), mod, "norm")
        k, v = linear(src, mod, "kv").split(c, -1)
        out.append(sdpa(q[bi], k, v, heads))
    return linear(torch.stack(out), mod, "proj")


def ref_cvt(x, mod, grid, heads, extra, kernel, stride, scale):
    """CvT: q/k/v = Linear(BN(DWConv(map))), k and v strided; class tokens bypass the convolutions."""
    b, n, c = x.shape
    out = []
    for bi in range(b):
        cls, m = x[bi, :extra], x[bi, extra:].T.reshape(c, *grid)
        qkv = []
        for name, s in (("q", 1), ("k", stride), ("v", stride)):
            t = batchnorm(dwconv(m, p(mod, f"conv_{name}.conv.weight"), None, s, kernel // 2), mod, f"conv_{name}.bn")
            qkv.append(linear(torch.cat([cls, t.reshape(c, -1).T]), mod, name))
        out.append(sdpa(*qkv, heads, scale=scale))
    return linear(torch.stack(out), mod, "proj")


def ref_global_lepe(x, mod, grid, heads, kernel):
    b, n, c = x.shape
    q, k, v = linear(x, mod, "qkv").split(c, -1)
    out = []
    for bi in range(b):
        lepe = dwconv(v[bi].T.reshape(c, *grid), p(mod, "lepe.weight"), p(mod, "lepe.bias"), 1, kernel // 2)
        out.append(sdpa(q[bi], k[bi], v[bi], heads) + lepe.reshape(c, -1).T)
    return linear(torch.stack(out), mod, "proj")


def run(mod, x):
    with torch.no_grad():
        return mod(x)


# (a) PVT spatial-reduction attention, and the average-pool reduction (LITv2 Lo-Fi)
@pytest.mark.parametrize("grid,ratio,mode", [((8, 8), 4, "conv"), ((8, 6), 2, "conv"), ((16,), 4, "conv"),
                                             ((8, 8), 2, "pool"), ((12,), 3, "pool")])
def test_spatial_reduction_matches_reference(grid, ratio, mode):
    x_shape = Shape(32, grid, "tokens")
    mod, _ = build(Attention(heads=2, kv=Reduce(ratio=ratio, mode=mode, norm=LayerNorm())), x_shape)
    x = torch.randn(2, math.prod(grid), 32, dtype=torch.float64)
    assert (run(mod, x) - ref_sra(x, mod, grid, 2, ratio, mode)).abs().max() < TOL


# (b) Swin shifted windows with relative bias, (c) MaxViT block (window, no shift) and grid attention
@pytest.mark.parametrize("grid,part,shift", [
    ((14, 14), Window(size=7, shift=3), 3),
    ((14, 14), Window(size=7), 0),
    ((14, 14), Grid(size=7), 0),
    ((12, 8), Grid(size=4), 0),
    ((28,), Window(size=7, shift=3), 3),
    ((28,), Grid(size=7), 0),
])
def test_partitioned_attention_matches_reference(grid, part, shift):
    x_shape = Shape(24, grid, "tokens")
    mod, _ = build(Attention(heads=3, partition=part, position=RelativeBias()), x_shape)
    x = torch.randn(2, math.prod(grid), 24, dtype=torch.float64)
    ref = ref_partitioned(x, mod, grid, 3, part.size, part.mode, shift)
    assert (run(mod, x) - ref).abs().max() < TOL


@pytest.mark.parametrize("grid,shift", [((10, 9), 0), ((10, 9), 2), ((11,), 2)])
def test_padded_window_matches_reference(grid, shift):
    """`window(size, pad = true)`: zero tokens appended up to a multiple of the window (unmasked keys, as in
    timm's Twins and Swin), attention on the padded grid, output cropped."""
    part = Window(size=4, shift=shift, pad=True)
    mod, _ = build(Attention(heads=2, partition=part, position=RelativeBias()), Shape(16, grid, "tokens"))
    padded = tuple(-(-g // 4) * 4 for g in grid)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    xp = torch.zeros(2, *padded, 16, dtype=torch.float64)
    xp[(slice(None), *[slice(0, g) for g in grid])] = x.view(2, *grid, 16)
    ref = ref_partitioned(xp.view(2, -1, 16), mod, padded, 2, 4, "window", shift)
    ref = ref.view(2, *padded, 16)[(slice(None), *[slice(0, g) for g in grid])].reshape(2, -1, 16)
    assert (run(mod, x) - ref).abs().max() < TOL


def test_shift_mask_is_used():
    """The mask matters: without it (shift on a plain roll) the outputs differ."""
    grid = (14, 14)
    mod, _ = build(Attention(heads=3, partition=Window(size=7, shift=3), position=RelativeBias()), Shape(24, grid, "tokens"))
    assert mod.attn_mask is not None and (mod.attn_mask != 0).any()
    assert "relative_position_index" not in mod.state_dict() and "attn_mask" not in mod.state_dict()


# (d) CvT convolutional projection (with and without a class token, strided keys/values)
@pytest.mark.parametrize("grid,extra,stride,scale", [((8, 8), 0, 2, None), ((7, 7), 1, 2, 32 ** -0.5),
                                                     ((6, 6), 1, 1, None), ((10,), 0, 2, None)])
def test_conv_projection_matches_reference(grid, extra, stride, scale):
    x_shape = Shape(32, grid, "tokens", extra)
    mod, y = build(Attention(heads=4, projection=ConvProj(kernel=3, stride_kv=stride), scale=scale), x_shape)
    x = torch.randn(2, x_shape.tokens, 32, dtype=torch.float64)
    assert (run(mod, x) - ref_cvt(x, mod, grid, 4, extra, 3, stride, scale)).abs().max() < TOL


@pytest.mark.parametrize("grid,kernel", [((6, 6), 3), ((9,), 5)])
def test_lepe_matches_reference(grid, kernel):
    x_shape = Shape(16, grid, "tokens")
    mod, _ = build(Attention(heads=2, position=LePE(kernel=kernel)), x_shape)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    assert (run(mod, x) - ref_global_lepe(x, mod, grid, 2, kernel)).abs().max() < TOL


def test_lepe_per_window_matches_reference():
    """LePE inside (grid) groups: the depthwise conv runs over each group's own size^d map."""
    grid = (8, 8)
    mod, _ = build(Attention(heads=2, partition=Grid(size=4), position=LePE(kernel=3)), Shape(16, grid, "tokens"))
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    assert (run(mod, x) - ref_partitioned(x, mod, grid, 2, 4, "grid", 0, lepe=3)).abs().max() < TOL


def test_shape_errors():
    with pytest.raises(ShapeError):
        Attention(heads=2, partition=Grid(size=5)).infer(Shape(16, (14, 14), "tokens"))
    with pytest.raises(ShapeError):
        Attention(heads=2, position=RelativeBias()).infer(Shape(16, (14, 14), "tokens"))
    with pytest.raises(ShapeError):
        Attention(heads=2, kv=Reduce(ratio=2), position=LePE()).infer(Shape(16, (8, 8), "tokens"))
    with pytest.raises(ShapeError):
        Attention(heads=2, partition=Window(size=4), kv=Reduce(ratio=2)).infer(Shape(16, (8, 8), "tokens"))


# --- the rules: shape, parameters and MACs on random valid configurations --------------------------------------

@st.composite
def configs(draw):
    ndim = draw(st.sampled_from([1, 2]))
    heads = draw(st.integers(1, 3))
    c = heads * draw(st.sampled_from([2, 4, 8]))
    kind = draw(st.sampled_from(["global", "window", "grid", "reduce", "conv_proj"]))
    position, partition, kv, projection, extra = None, None, None, None, 0
    if kind in ("window", "grid"):
        size = draw(st.integers(1, 4))
        pad = kind == "window" and draw(st.booleans())
        if pad:
            grid = tuple(draw(st.integers(1, 3 * size)) for _ in range(ndim))
        else:
            grid = tuple(size * draw(st.integers(1, 3)) for _ in range(ndim))
        if kind == "window":
            partition = Window(size=size, shift=draw(st.integers(0, size - 1)), pad=pad)
        else:
            partition = Grid(size=size)
        position = draw(st.sampled_from([None, RelativeBias(), LePE(kernel=3)]))
    else:
        grid = tuple(draw(st.integers(2, 9)) for _ in range(ndim))
        if kind == "reduce":
            kv = Reduce(ratio=draw(st.integers(1, min(grid))), mode=draw(st.sampled_from(["conv", "pool"])),
                        norm=draw(st.sampled_from([None, LayerNorm()])))
        elif kind == "conv_proj":
            projection = ConvProj(kernel=draw(st.sampled_from([1, 3])), stride_kv=draw(st.integers(1, 2)))
            extra = draw(st.integers(0, 1))
        else:
            extra = draw(st.integers(0, 1))
        if not extra and (kv is None or kv.ratio == 1) and (projection is None or projection.stride_kv == 1):
            position = draw(st.sampled_from([None, LePE(kernel=3)]))
    op = Attention(heads=heads, partition=partition, kv=kv, projection=projection, position=position,
                   qkv_bias=draw(st.booleans()), proj_bias=draw(st.booleans()),
                   out=draw(st.sampled_from([None, 6])))
    return op, Shape(c, grid, "tokens", extra)


def explicit_sdpa(q, k, v, attn_mask=None, scale=None, **_):
    """SDPA with explicit matmuls (the flop counter counts 0 for the fused CPU kernel)."""
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        s = s + attn_mask
    return s.softmax(-1) @ v


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_rules_match_module(config):
    op, x = config
    y = op.infer(x)
    torch.manual_seed(0)
    mod = op.build(x, y).eval()
    assert op.params(x, y) == sum(t.numel() for t in mod.parameters())
    inp = torch.randn(2, x.tokens, x.channels)
    # the MAC rule counts linears, convs, q k^T and attn v: compare with the flop counter on a path where the
    # attention is explicit matmuls (FlopCounterMode counts 0 for the fused CPU SDPA kernel)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(F, "scaled_dot_product_attention", explicit_sdpa)
        with FlopCounterMode(display=False) as counter:
            out = mod(inp)
    assert out.shape == (2, y.tokens, y.channels) and y.layout == "tokens" and y.spatial == x.spatial
    counted = counter.get_total_flops() / 2 / 2  # flops -> MACs, per sample (batch 2)
    assert abs(op.macs(x, y) - counted) <= 0.05 * counted
    with torch.no_grad():
        assert torch.allclose(out, mod(inp), atol=1e-5)  # the explicit path is the fused one
