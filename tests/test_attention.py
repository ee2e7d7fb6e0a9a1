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
from helpers import explicit_sdpa

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


def run_explicit(op, x, batch):
    """Infer and build `op` (seed 0), check its parameter rule, and run a random batch with the attention as
    explicit matmuls under the flop counter (FlopCounterMode counts 0 for the fused CPU SDPA kernel):
    (y, module, input, output, flops)."""
    y = op.infer(x)
    torch.manual_seed(0)
    mod = op.build(x, y).eval()
    assert op.params(x, y) == sum(t.numel() for t in mod.parameters())
    inp = torch.randn(batch, x.tokens, x.channels)
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(F, "scaled_dot_product_attention", explicit_sdpa)
        with FlopCounterMode(display=False) as counter:
            out = mod(inp)
    return y, mod, inp, out, counter.get_total_flops()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_rules_match_module(config):
    op, x = config
    # the MAC rule counts linears, convs, q k^T and attn v: compare with the flop counter on a path where the
    # attention is explicit matmuls
    y, mod, inp, out, flops = run_explicit(op, x, 2)
    assert out.shape == (2, y.tokens, y.channels) and y.layout == "tokens" and y.spatial == x.spatial
    counted = flops / 2 / 2  # flops -> MACs, per sample (batch 2)
    assert abs(op.macs(x, y) - counted) <= 0.05 * counted
    with torch.no_grad():
        assert torch.allclose(out, mod(inp), atol=1e-5)  # the explicit path is the fused one


# === parts added for the Zoo II papers ========================================================================
from composer.ops.attention import (  # noqa: E402
    Agents, Cosine, Dilated, First, Given, KeySource, KvTokens, LearnedBias, Neighbourhood, RelativeXL, Routed,
)


def heads_of(t, heads):
    """(N, C) -> list of (N, d) per head."""
    d = t.shape[-1] // heads
    return [t[..., h * d:(h + 1) * d] for h in range(heads)]


def softmax_attend(q, k, v, heads, score):
    """Per head: softmax(score(h, q_h, k_h)) v_h, concatenated. score returns the (N, M) logits."""
    return torch.cat([torch.softmax(score(h, qh, kh), -1) @ vh
                      for h, (qh, kh, vh) in enumerate(zip(heads_of(q, heads), heads_of(k, heads), heads_of(v, heads)))],
                     -1)


def cosine_logits(mod, keys):
    """TransNeXt: ((q/|q| + e_h) * softplus(t_h) * log(keys)) . (k/|k|)."""
    t = F.softplus(p(mod, "temperature")).flatten()
    e = p(mod, "query_embedding")
    return lambda h, q, k: ((q / q.norm(dim=-1, keepdim=True) + e[h]) * t[h] * math.log(keys)) @ (
        k / k.norm(dim=-1, keepdim=True)).T


@pytest.mark.parametrize("grid,extra,tokens", [((5, 4), 0, 0), ((7,), 1, 0), ((4, 4), 0, 3)])
def test_cosine_score_matches_reference(grid, extra, tokens):
    """Length-scaled cosine attention (TransNeXt's stage-4 attention), with class and learned kv tokens."""
    x_shape = Shape(16, grid, "tokens", extra)
    op = Attention(heads=2, score=Cosine(), extra_kv=KvTokens(count=tokens) if tokens else None)
    mod, _ = build(op, x_shape)
    x = torch.randn(2, x_shape.tokens, 16, dtype=torch.float64)
    q, k, v = linear(x, mod, "qkv").split(16, -1)
    out = []
    for b in range(2):
        kb, vb = k[b], v[b]
        if tokens:
            kb, vb = torch.cat([p(mod, "kv_tokens")[0], kb]), torch.cat([p(mod, "kv_tokens")[1], vb])
        out.append(softmax_attend(q[b], kb, vb, 2, cosine_logits(mod, kb.shape[0])))
    assert (run(mod, x) - linear(torch.stack(out), mod, "proj")).abs().max() < TOL


def ref_unfold(x, mod, grid, heads, size, dilation, mask, cosine=False):
    """DilateFormer's sliding-window attention: nn.Unfold(size, dilation, padding=dilation*(size-1)//2) of the
    key and value maps (zero padding; with `mask` padded keys get -inf, TransNeXt)."""
    b, n, c = x.shape
    d = c // heads
    q, k, v = linear(x, mod, "qkv").split(c, -1)
    hw = grid if len(grid) == 2 else (1, grid[0])
    kern = (size, size) if len(grid) == 2 else (1, size)
    dil = (dilation, dilation) if len(grid) == 2 else (1, dilation)
    pad = (dilation * (size - 1) // 2,) * 2 if len(grid) == 2 else (0, dilation * (size - 1) // 2)
    unfold = torch.nn.Unfold(kern, dilation=dil, padding=pad)
    if cosine:
        k = torch.cat([F.normalize(t, dim=-1) for t in heads_of(k, heads)], -1)
    K = unfold(k.transpose(1, 2).reshape(b, c, *hw)).view(b, heads, d, -1, n)  # (B, h, d, K, N)
    V = unfold(v.transpose(1, 2).reshape(b, c, *hw)).view(b, heads, d, -1, n)
    valid = unfold(torch.ones(1, 1, *hw, dtype=x.dtype)).view(-1, n) > 0  # (K, N)
    qh = q.view(b, n, heads, d).permute(0, 2, 3, 1)  # (B, h, d, N)
    if cosine:
        t = F.softplus(p(mod, "temperature")).view(1, heads, 1, 1)
        e = p(mod, "query_embedding").view(1, heads, d, 1)
        keys = valid.sum(0) if mask else torch.full((n,), valid.shape[0])
        qh = (F.normalize(qh, dim=2) + e) * t * keys.double().log()
        logits = (qh[:, :, :, None] * K).sum(2)  # (B, h, K, N)
    else:
        logits = (qh[:, :, :, None] * K).sum(2) * d ** -0.5
    if mask:
        logits = logits.masked_fill(~valid, float("-inf"))
    a = logits.softmax(2)
    y = (a[:, :, None] * V).sum(3)  # (B, h, d, N)
    return linear(y.permute(0, 3, 1, 2).reshape(b, n, c), mod, "proj")


@pytest.mark.parametrize("grid,part", [
    ((7, 6), Neighbourhood(size=3)),
    ((8, 8), Dilated(size=3, dilation=2)),
    ((9, 7), Dilated(size=3, dilation=3)),
    ((6, 6), Neighbourhood(size=5, mask=True)),
    ((11,), Dilated(size=3, dilation=2)),
    ((9,), Neighbourhood(size=3, mask=True)),
])
def test_neighbourhood_matches_unfold_reference(grid, part):
    mod, _ = build(Attention(heads=2, partition=part), Shape(16, grid, "tokens"))
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    ref = ref_unfold(x, mod, grid, 2, part.size, part.dilation, part.mask)
    assert (run(mod, x) - ref).abs().max() < TOL


@pytest.mark.parametrize("grid", [(6, 5), (10,)])
def test_masked_neighbourhood_cosine_matches_reference(grid):
    """TransNeXt's local branch scoring: cosine with log(unpadded keys) per query, -inf on padded keys."""
    part = Neighbourhood(size=3, mask=True)
    mod, _ = build(Attention(heads=2, partition=part, score=Cosine()), Shape(16, grid, "tokens"))
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    assert (run(mod, x) - ref_unfold(x, mod, grid, 2, 3, 1, True, cosine=True)).abs().max() < TOL


def test_multi_scale_dilated_attention_as_a_parallel_concat():
    """DilateFormer's MSDA: one 1x1 qkv conv, channels split into dilation groups, dilated attention per group,
    one output linear == a concat of `attention(h, partition = dilated(3, r), dim = C / n, proj = false)`."""
    grid, c, dils = (8, 8), 24, (1, 2, 3)
    x_shape = Shape(c, grid, "tokens")
    branches = []
    for r in dils:
        m, y = build(Attention(heads=1, partition=Dilated(size=3, dilation=r), dim=c // 3, proj=False), x_shape)
        assert y.channels == c // 3
        branches.append(m)
    torch.manual_seed(1)
    wo, bo = torch.randn(c, c, dtype=torch.float64) * 0.2, torch.randn(c, dtype=torch.float64)
    x = torch.randn(2, 64, c, dtype=torch.float64)
    ours = torch.cat([run(m, x) for m in branches], -1) @ wo.T + bo
    # the reference: the fused qkv weight as DilateFormer lays it out: (3, n_dil, C/n_dil)
    g = c // 3
    w = torch.cat([p(m, "qkv.weight")[i * g:(i + 1) * g] for i in range(3) for m in branches])  # q groups, k, v
    bias = torch.cat([p(m, "qkv.bias")[i * g:(i + 1) * g] for i in range(3) for m in branches])
    qkv = (x @ w.T + bias).view(2, 64, 3, 3, g)  # (B, N, qkv, group, g)
    unfold_out = []
    for gi, r in enumerate(dils):
        q, k, v = (qkv[:, :, j, gi].transpose(1, 2).reshape(2, g, *grid) for j in range(3))
        unfold = torch.nn.Unfold(3, dilation=r, padding=r)
        K, V = unfold(k).view(2, g, 9, 64), unfold(v).view(2, g, 9, 64)
        a = ((q.reshape(2, g, 1, 64) * K).sum(1) * g ** -0.5).softmax(1)  # (B, 9, N)
        unfold_out.append((a[:, None] * V).sum(2).transpose(1, 2))  # (B, N, g)
    ref = torch.cat(unfold_out, -1) @ wo.T + bo
    assert (ours - ref).abs().max() < TOL


def ref_routed(x, mod, grid, heads, regions, topk, lepe, scale, tokens=0):
    """BiFormer's bi-level routing attention, region by region: region means of q and k, top-k regions by
    affinity, attention to the gathered tokens; LePE (depthwise conv over the whole V map) added before proj."""
    b, n, c = x.shape
    q, k, v = linear(x, mod, "qkv").split(c, -1)
    rs = [g // regions for g in grid]
    members = [[flat([s * r + o for s, r, o in zip(start, rs, off)], grid) for off in coords(rs)]
               for start in coords((regions,) * len(grid))]
    out = torch.zeros(b, n, c, dtype=x.dtype)
    for bi in range(b):
        qr = torch.stack([q[bi, m].mean(0) for m in members])
        kr = torch.stack([k[bi, m].mean(0) for m in members])
        chosen = torch.topk(qr @ kr.T, topk, dim=-1).indices
        for i, m in enumerate(members):
            keys = [t for j in chosen[i].tolist() for t in members[j]]
            kk, vv = k[bi, keys], v[bi, keys]
            if tokens:
                kk, vv = torch.cat([p(mod, "kv_tokens")[0], kk]), torch.cat([p(mod, "kv_tokens")[1], vv])
            out[bi, m] = sdpa(q[bi, m], kk, vv, heads, scale=scale)
        if lepe:
            out[bi] += dwconv(v[bi].T.reshape(c, *grid), p(mod, "lepe.weight"), p(mod, "lepe.bias"), 1,
                              lepe // 2).reshape(c, -1).T
    return linear(out, mod, "proj")


@pytest.mark.parametrize("grid,regions,topk,lepe,tokens", [
    ((8, 8), 4, 3, 5, 0), ((6, 9), 3, 2, 3, 0), ((8, 8), 2, 1, 0, 2), ((12,), 3, 2, 3, 0),
])
def test_routed_matches_reference(grid, regions, topk, lepe, tokens):
    c = 16
    op = Attention(heads=2, partition=Routed(regions=regions, topk=topk), position=LePE(kernel=lepe) if lepe else None,
                   scale=c ** -0.5, extra_kv=KvTokens(count=tokens) if tokens else None)
    mod, _ = build(op, Shape(c, grid, "tokens"))
    x = torch.randn(2, math.prod(grid), c, dtype=torch.float64)
    ref = ref_routed(x, mod, grid, 2, regions, topk, lepe, c ** -0.5, tokens)
    assert (run(mod, x) - ref).abs().max() < TOL


def test_lepe_on_input_matches_reference():
    """BiFormer's global stage: LePE's depthwise conv runs over the attention input, not over V."""
    grid = (6, 6)
    mod, _ = build(Attention(heads=2, position=LePE(kernel=5, source="input")), Shape(16, grid, "tokens"))
    x = torch.randn(2, 36, 16, dtype=torch.float64)
    q, k, v = linear(x, mod, "qkv").split(16, -1)
    ref = torch.stack([sdpa(q[b], k[b], v[b], 2) + dwconv(x[b].T.reshape(16, *grid), p(mod, "lepe.weight"),
                                                           p(mod, "lepe.bias"), 1, 2).reshape(16, -1).T
                       for b in range(2)])
    assert (run(mod, x) - linear(ref, mod, "proj")).abs().max() < TOL


@pytest.mark.parametrize("grid,ratio", [((8, 8), 2), ((6, 4), 1), ((10,), 2)])
def test_learned_bias_matches_reference(grid, ratio):
    """CMT's dense (heads, N, M) bias with pooled keys/values: softmax(q k^T * scale + B) v."""
    op = Attention(heads=2, kv=Reduce(ratio=ratio, mode="pool"), position=LearnedBias(std=1.0))
    mod, _ = build(op, Shape(16, grid, "tokens"))
    n, m = math.prod(grid), math.prod(grid) // ratio ** len(grid)
    assert p(mod, "relative_pos").shape == (2, n, m)
    x = torch.randn(2, n, 16, dtype=torch.float64)
    q = linear(x, mod, "q")
    out = []
    for b in range(2):
        src = F.avg_pool1d(x[b].T[None], ratio)[0] if len(grid) == 1 else F.avg_pool2d(
            x[b].T.reshape(1, 16, *grid), ratio).reshape(16, -1)
        k, v = linear(src.reshape(16, -1).T, mod, "kv").split(16, -1)
        out.append(sdpa(q[b], k, v, 2, bias=p(mod, "relative_pos")))
    assert (run(mod, x) - linear(torch.stack(out), mod, "proj")).abs().max() < TOL


def espnet_rel_shift(x):
    """ESPnet's RelPositionMultiHeadedAttention.rel_shift: (.., T, 2T-1) -> (.., T, T), pad-reshape-slice."""
    zero = torch.zeros((*x.shape[:-1], 1), dtype=x.dtype)
    padded = torch.cat([zero, x], -1).view(*x.shape[:-2], x.shape[-1] + 1, x.shape[-2])
    return padded[..., 1:, :].reshape(x.shape)[..., : x.shape[-1] // 2 + 1]


@pytest.mark.parametrize("grid,extra", [((9,), 0), ((3, 4), 1)])
def test_relative_xl_matches_espnet_formula(grid, extra):
    """Conformer's relative-position MHSA: ((q + u) k^T + rel_shift((q + v) P^T)) / sqrt(d)."""
    c, heads = 16, 2
    x_shape = Shape(c, grid, "tokens", extra)
    mod, _ = build(Attention(heads=heads, position=RelativeXL()), x_shape)
    t = x_shape.tokens
    pos = torch.arange(t - 1, -t, -1, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, c, 2, dtype=torch.float64) * -(math.log(10000.0) / c))
    pe = torch.stack([torch.sin(pos * div), torch.cos(pos * div)], -1).reshape(2 * t - 1, c)  # sin even, cos odd
    P = pe @ p(mod, "linear_pos.weight").T  # (2T-1, C), no bias
    u, vb = p(mod, "pos_bias_u"), p(mod, "pos_bias_v")
    x = torch.randn(2, t, c, dtype=torch.float64)
    q, k, v = linear(x, mod, "qkv").split(c, -1)
    d = c // heads
    out = []
    for b in range(2):
        ys = []
        for h, (qh, kh, vh, ph) in enumerate(zip(*(heads_of(z, heads) for z in (q[b], k[b], v[b], P)))):
            ac = (qh + u[h]) @ kh.T
            bd = espnet_rel_shift(((qh + vb[h]) @ ph.T)[None])[0]
            ys.append(torch.softmax((ac + bd) / math.sqrt(d), -1) @ vh)
        out.append(torch.cat(ys, -1))
    assert (run(mod, x) - linear(torch.stack(out), mod, "proj")).abs().max() < TOL


@pytest.mark.parametrize("grid,ratio,count", [((8, 8), 2, 4), ((6, 6), 1, 9), ((12,), 2, 3)])
def test_agents_match_reference(grid, ratio, count):
    """Agent attention (Agent-PVT): pooled queries as agents, agent aggregation then agent broadcast, each with
    a resized (t x t) table plus per-axis tables, and a depthwise conv over V."""
    c, heads, nd = 16, 2, len(grid)
    op = Attention(heads=heads, kv=Reduce(ratio=ratio, norm=LayerNorm()), agents=Agents(count=count))
    mod, _ = build(op, Shape(c, grid, "tokens"))
    kvg = tuple(g // ratio for g in grid)
    mode = "bilinear" if nd == 2 else "linear"
    side = round(count ** (1 / nd))
    x = torch.randn(2, math.prod(grid), c, dtype=torch.float64)
    q = linear(x, mod, "q")
    pr = dict(mod.named_parameters())
    bias1 = F.interpolate(pr["an_bias"].detach(), size=kvg, mode=mode).reshape(heads, count, -1)
    bias2 = F.interpolate(pr["na_bias"].detach(), size=grid, mode=mode).reshape(heads, count, -1).transpose(1, 2)
    if nd == 2:
        bias1 = bias1 + (pr["ah_bias"] + pr["aw_bias"]).detach().reshape(heads, count, -1)
        bias2 = bias2 + (pr["ha_bias"] + pr["wa_bias"]).detach().reshape(heads, -1, count)
    else:
        bias1 = bias1 + pr["ah_bias"].detach().reshape(heads, count, -1)
        bias2 = bias2 + pr["ha_bias"].detach().reshape(heads, -1, count)
    d = c // heads
    out = []
    for b in range(2):
        m = x[b].T.reshape(1, c, *grid)
        src = m if ratio == 1 else (F.conv2d if nd == 2 else F.conv1d)(m, p(mod, "sr.weight"), p(mod, "sr.bias"), ratio)
        src = layernorm(src.reshape(c, -1).T, mod, "norm")
        k, v = linear(src, mod, "kv").split(c, -1)
        pool = F.adaptive_avg_pool2d if nd == 2 else F.adaptive_avg_pool1d
        agents = pool(q[b].T.reshape(1, c, *grid), side).reshape(c, -1).T  # (count, C)
        ys = []
        for h, (qh, kh, vh, ah) in enumerate(zip(*(heads_of(z, heads) for z in (q[b], k, v, agents)))):
            agent_v = torch.softmax(ah @ kh.T * d ** -0.5 + bias1[h], -1) @ vh
            ys.append(torch.softmax(qh @ ah.T * d ** -0.5 + bias2[h], -1) @ agent_v)
        vm = v.T.reshape(1, c, *kvg)
        if ratio > 1:
            vm = F.interpolate(vm, size=grid, mode=mode)
        conv = dwconv(vm[0], p(mod, "dwc.weight"), p(mod, "dwc.bias"), 1, 1)
        out.append(torch.cat(ys, -1) + conv.reshape(c, -1).T)
    assert (run(mod, x) - linear(torch.stack(out), mod, "proj")).abs().max() < TOL


@pytest.mark.parametrize("keys", ["all", "rest"])
def test_first_queries_match_reference(keys):
    """`query = first(n)`: the first n tokens ask; keys/values from all tokens or from the rest (two streams
    concatenated by `parallel tokens`: cross-attention)."""
    x_shape = Shape(16, (3, 3), "tokens", extra=1)
    op = Attention(heads=2, query=First(count=2, keys=keys))
    mod, y = build(op, x_shape)
    assert y == Shape(16, (2,), "tokens")
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    src = x if keys == "all" else x[:, 2:]
    ref = torch.stack([sdpa(linear(x[b, :2], mod, "q"), linear(src[b], mod, "k"), linear(src[b], mod, "v"), 2)
                       for b in range(2)])
    assert (run(mod, x) - linear(ref, mod, "proj")).abs().max() < TOL


def test_key_source_protocol_accepts_a_new_source():
    """A KeySource subclass defined elsewhere plugs into `kv` (a stride-2 subsampling source)."""
    from composer.ops.registry import prod

    class EverySecond(KeySource):
        module_name = "picker"

        def grid(self, x):
            return tuple(-(-g // 2) for g in x.spatial)

        def build(self, x, y=None):
            class Pick(torch.nn.Module):
                def forward(self, m):
                    return m[(slice(None), slice(None), *[slice(None, None, 2)] * (m.dim() - 2))].flatten(2).transpose(1, 2)
            return Pick()

    x_shape = Shape(8, (5, 4), "tokens")
    op = Attention(heads=2, kv=EverySecond())
    mod, y = build(op, x_shape)
    assert op.params(x_shape, y) == sum(t.numel() for t in mod.parameters())
    assert op.sizes(x_shape).keys == prod((3, 2))
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    src = x.view(2, 5, 4, 8)[:, ::2, ::2].reshape(2, 6, 8)
    ref = torch.stack([sdpa(linear(x[b], mod, "q"), *linear(src[b], mod, "kv").split(8, -1), 2) for b in range(2)])
    assert (run(mod, x) - linear(ref, mod, "proj")).abs().max() < TOL


def test_new_part_shape_errors():
    with pytest.raises(ShapeError):
        Attention(heads=2, partition=Neighbourhood(size=4)).infer(Shape(16, (8, 8), "tokens"))
    with pytest.raises(ShapeError):
        Attention(heads=2, partition=Routed(regions=3, topk=2)).infer(Shape(16, (8, 8), "tokens"))
    with pytest.raises(ShapeError):
        Attention(heads=2, partition=Routed(regions=2, topk=5)).infer(Shape(16, (8, 8), "tokens"))
    with pytest.raises(ShapeError):
        Attention(heads=2, agents=Agents(count=5)).infer(Shape(16, (8, 8), "tokens"))
    with pytest.raises(ShapeError):
        Attention(heads=2, query=First(count=3), partition=Window(size=2)).infer(Shape(16, (8, 8), "tokens"))
    with pytest.raises(ShapeError):
        Attention(heads=2, position=RelativeXL(), kv=Reduce(ratio=2)).infer(Shape(16, (8, 8), "tokens"))
    with pytest.raises(ShapeError):
        Attention(heads=2, proj=False, out=4).infer(Shape(16, (8, 8), "tokens"))


# --- rules on random configurations of the new parts -------------------------------------------------------------

@st.composite
def new_configs(draw):
    ndim = draw(st.sampled_from([1, 2]))
    heads = draw(st.integers(1, 3))
    c = heads * draw(st.sampled_from([2, 4]))
    kind = draw(st.sampled_from(["neighbourhood", "routed", "cosine", "learned", "xl", "agents", "first", "window"]))
    kw, extra = {}, 0
    grid = tuple(draw(st.integers(2, 7)) for _ in range(ndim))
    if kind == "neighbourhood":
        kw["partition"] = Neighbourhood(size=draw(st.sampled_from([1, 3, 5])), dilation=draw(st.integers(1, 3)),
                                        mask=draw(st.booleans()))
        kw["position"] = draw(st.sampled_from([None, LePE(kernel=3), LearnedBias()]))
    elif kind == "routed":
        regions = draw(st.integers(1, 3))
        grid = tuple(regions * draw(st.integers(1, 3)) for _ in range(ndim))
        kw["partition"] = Routed(regions=regions, topk=draw(st.integers(1, regions ** ndim)))
        kw["position"] = draw(st.sampled_from([None, LePE(kernel=3)]))
    elif kind == "cosine":
        extra = draw(st.integers(0, 1))
    elif kind == "learned":
        kw["kv"] = draw(st.sampled_from([None, Reduce(ratio=2, mode="pool")]))
        grid = tuple(2 * g for g in grid) if kw["kv"] else grid
        kw["position"] = LearnedBias()
    elif kind == "xl":
        extra = draw(st.integers(0, 1))
        kw["position"] = RelativeXL()
    elif kind == "agents":
        side = draw(st.integers(1, 2))
        kw["agents"] = Agents(count=side ** ndim)
        if draw(st.booleans()):
            kw["kv"] = Reduce(ratio=2, norm=LayerNorm())
            grid = tuple(2 * g for g in grid)
    elif kind == "first":
        extra = draw(st.integers(0, 1))
        kw["query"] = First(count=draw(st.integers(1, 2)), keys=draw(st.sampled_from(["all", "rest"])))
        grid = tuple(g + 1 for g in grid)  # more tokens than queries
    else:
        size = draw(st.integers(1, 3))
        grid = tuple(size * draw(st.integers(1, 2)) for _ in range(ndim))
        kw["partition"] = Window(size=size, shift=draw(st.integers(0, size - 1)))
        kw["position"] = draw(st.sampled_from([None, RelativeBias(), LearnedBias()]))
    if kind not in ("xl", "agents") and draw(st.booleans()):
        kw["score"] = Cosine(query_embedding=draw(st.booleans()), length_scale=draw(st.booleans()))
    if kind not in ("xl", "agents") and draw(st.booleans()):
        kw["extra_kv"] = KvTokens(count=draw(st.integers(1, 2)))
    if kind != "first" and not isinstance(kw.get("position"), LePE) and draw(st.booleans()):
        kw["dim"] = heads * draw(st.sampled_from([2, 4]))
        kw["proj"] = draw(st.booleans())
    op = Attention(heads=heads, qkv_bias=draw(st.booleans()), **kw)
    return op, Shape(c, grid, "tokens", extra)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(new_configs())
def test_new_part_rules_match_module(config):
    op, x = config
    y, mod, inp, out, flops = run_explicit(op, x, 1)  # batch 1: relative_xl's linear_pos runs once per batch
    assert out.shape == (1, y.tokens, y.channels) and y.layout == "tokens"
    counted = flops / 2
    assert abs(op.macs(x, y) - counted) <= 0.05 * counted
    with torch.no_grad():
        assert torch.allclose(out, mod(inp), atol=1e-5)


def test_new_parts_in_the_language(tmp_path):
    """The parts as written in blueprints: MSDA as a parallel concat, routed + LePE, cosine + kv tokens, masked
    neighbourhood, learned bias, agents, relative_xl, and a cross-stream `first(n, keys = "rest")` bridge."""
    import composer

    path = tmp_path / "parts.arch"
    path.write_text("""model parts_demo {
    input image(3, 32)
    stem { conv(24, 4, stride = 4) }
    stage {
        block {
            parallel concat {
                attention(1, partition = dilated(3, 1), dim = 8, proj = false)
                attention(1, partition = dilated(3, 2), dim = 8, proj = false)
                attention(1, partition = dilated(3, 3), dim = 8, proj = false)
            }
            linear(24)
            attention(2, partition = routed(2, 2), position = lepe(5), scale = 0.2)
            attention(2, score = cosine, extra_kv = kv_tokens(4))
            attention(2, partition = neighbourhood(3, mask = true), score = cosine(length_scale = false))
            attention(2, kv = reduce(2, "pool"), position = learned_bias(std = 1.0))
            attention(2, kv = reduce(2, norm = layernorm), agents = agents(4))
            attention(2, position = relative_xl)
            parallel tokens { { pool(2); to_tokens } identity }
            attention(2, query = first(16, keys = "rest")) as bridge
        }
    }
}
""")
    plan = composer.load(str(path))
    model = composer.build(str(path)).eval()
    assert plan.params == sum(t.numel() for t in model.parameters())
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 16, 24)


# === FAVOR+ (T2T-ViT), aggregated attention (TransNeXt), messengers (MSG-Transformer) ===========================
from composer.ops.attention import ContinuousBias, Performer  # noqa: E402
from composer.ops.registry import OPS  # noqa: E402
from composer.ops.window_tokens import ShuffleWindowTokens, WindowTokens  # noqa: E402


def ref_performer(x, mod, heads, skip):
    """Performer (FAVOR+), quadratic form: kappa(q_i, k_j) = phi(q_i) . phi(k_j) with
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m); y_i = sum_j kappa_ij v_j / (sum_j kappa_ij + 1e-8);
    T2T's layer adds v: out = v + proj(y)."""
    b, n, _ = x.shape
    w = dict(mod.named_parameters())["w"].detach()
    m = w.shape[0]
    q, k, v = linear(x, mod, "qkv").chunk(3, -1)

    def phi(t):
        return torch.exp(t @ w.T - (t ** 2).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    out = []
    for bi in range(b):
        ys = []
        for qh, kh, vh in zip(heads_of(q[bi], heads), heads_of(k[bi], heads), heads_of(v[bi], heads)):
            kappa = torch.stack([torch.stack([phi(qh[i]) @ phi(kh[j]) for j in range(kh.shape[0])])
                                 for i in range(qh.shape[0])])  # (N, M)
            ys.append((kappa @ vh) / (kappa.sum(-1, keepdim=True) + 1e-8))
        out.append(torch.cat(ys, -1))
    y = linear(torch.stack(out), mod, "proj")
    return y + v if skip else y


@pytest.mark.parametrize("grid,extra,heads,skip", [((4, 4), 0, 1, True), ((6,), 1, 2, False), ((3, 3), 0, 2, True)])
def test_performer_matches_reference(grid, extra, heads, skip):
    op = Attention(heads=heads, dim=8, out=8 if skip else None, score=Performer(features=4), value_skip=skip)
    x_shape = Shape(12, grid, "tokens", extra)
    mod, y = build(op, x_shape)
    x = torch.randn(2, x_shape.tokens, 12, dtype=torch.float64)
    assert (run(mod, x) - ref_performer(x, mod, heads, skip)).abs().max() < TOL
    # the random features are frozen, orthogonal rows scaled by sqrt(m), counted as parameters (T2T's `w`)
    torch.manual_seed(0)
    fresh = op.build(x_shape, y)
    w = fresh.w.detach()
    assert not fresh.w.requires_grad and w.shape == (4, 8 // heads)
    if 8 // heads >= 4:
        assert torch.allclose(w @ w.T, 4 * torch.eye(4), atol=1e-4)


def cpb_reference(mod, grid, keys):
    """TransNeXt's continuous position bias, pair by pair: per axis r = (q - c_k) / (g - 1) * 8 (c_k the
    centre of key k's pooling cell), sign(r) log2(1 + |r|) / 3, then Linear-ReLU-Linear; (heads, N, M)."""
    centres = []
    for g, m in zip(grid, keys):
        centres.append([sum(range(j * g // m, -(-(j + 1) * g // m))) / (-(-(j + 1) * g // m) - j * g // m)
                        for j in range(m)])
    qs, ks = coords(grid), coords(keys)
    rel = torch.tensor([[[(qi[d] - centres[d][kj[d]]) / max(grid[d] - 1, 1) * 8 for d in range(len(grid))]
                         for kj in ks] for qi in qs], dtype=torch.float64)  # (N, M, d)
    rel = torch.sign(rel) * torch.log2(rel.abs() + 1) / 3
    hidden = torch.relu(linear(rel, mod, "cpb_fc1"))
    return linear(hidden, mod, "cpb_fc2").permute(2, 0, 1)


def ref_aggregated(x, mod, grid, heads, ratio, size=3, tokens=True):
    """TransNeXt's aggregated attention, query by query (classification/attention_native.py): a masked size^d
    neighbourhood plus pooled keys LN(avgpool(GELU(conv1x1(x)))) under one softmax; cosine scores with
    query embedding, softplus temperature and log(valid neighbours + pooled keys); a local bias per offset, the
    continuous bias on the pooled keys, and learnable tokens added to the local weights after the softmax."""
    b, n, c = x.shape
    d = c // heads
    ndim = len(grid)
    q = linear(x, mod, "q")
    k, v = linear(x, mod, "kv").split(c, -1)
    t = F.softplus(p(mod, "temperature")).flatten()
    e = p(mod, "query_embedding")
    local_bias = p(mod, "relative_pos_bias_local")
    cpb = cpb_reference(mod, grid, [g // ratio for g in grid])
    cs = coords(grid)
    offsets = coords((size,) * ndim)
    out = torch.zeros(b, n, c, dtype=x.dtype)
    for bi in range(b):
        m = x[bi].T.reshape(c, *grid)
        conv = torch.einsum("oc,c...->o...", p(mod, "sr.weight").flatten(1), m) + p(mod, "sr.bias").view(-1, *[1] * ndim)
        act = F.gelu(conv)
        pooled = [act[(slice(None), *[slice(ci * ratio, (ci + 1) * ratio) for ci in cell])].flatten(1).mean(1)
                  for cell in coords([g // ratio for g in grid])]
        kp, vp = linear(layernorm(torch.stack(pooled), mod, "norm", 1e-5), mod, "kv").split(c, -1)
        for i, ci in enumerate(cs):
            nbrs = []
            for off in offsets:
                pos = [a + o - size // 2 for a, o in zip(ci, off)]
                nbrs.append(flat(pos, grid) if all(0 <= s < g for s, g in zip(pos, grid)) else None)
            valid = sum(j is not None for j in nbrs)
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                qn = q[bi, i, sl] / q[bi, i, sl].norm()
                qs = (qn + e[h, 0]) * t[h] * math.log(valid + kp.shape[0])
                local = torch.stack([qs @ (k[bi, j, sl] / k[bi, j, sl].norm()) + local_bias[h, o] if j is not None
                                     else torch.tensor(float("-inf"), dtype=x.dtype) for o, j in enumerate(nbrs)])
                pool = torch.stack([qs @ (kp[j, sl] / kp[j, sl].norm()) + cpb[h, i, j] for j in range(kp.shape[0])])
                a = torch.softmax(torch.cat([local, pool]), 0)
                a_local, a_pool = a[:len(nbrs)], a[len(nbrs):]
                if tokens:
                    a_local = a_local + qn @ p(mod, "learnable_tokens")[h] + p(mod, "learnable_bias")[h, 0]
                y = sum(a_local[o] * v[bi, j, sl] for o, j in enumerate(nbrs) if j is not None) + a_pool @ vp[:, sl]
                out[bi, i, sl] = y
    return linear(out, mod, "proj")


GELU_OP, LN_OP = OPS["gelu"], OPS["layernorm"]


def aggregated(ratio, tokens=True, size=3):
    return Attention(heads=2, partition=Neighbourhood(size=size, mask=True, bias=True, tokens=tokens),
                     extra_kv=Reduce(ratio=ratio, mode="pool", pointwise=True, act=GELU_OP(), norm=LN_OP()),
                     score=Cosine(), position=ContinuousBias(hidden=16))


@pytest.mark.parametrize("grid,ratio,tokens", [((4, 6), 2, True), ((6, 6), 3, False), ((8,), 2, True)])
def test_aggregated_attention_matches_reference(grid, ratio, tokens):
    mod, _ = build(aggregated(ratio, tokens), Shape(8, grid, "tokens"))
    x = torch.randn(2, math.prod(grid), 8, dtype=torch.float64)
    assert (run(mod, x) - ref_aggregated(x, mod, grid, 2, ratio, tokens=tokens)).abs().max() < TOL
    names = {n for n, _ in mod.named_parameters()}  # TransNeXt's state_dict names
    assert {"q.weight", "kv.weight", "sr.weight", "norm.weight", "cpb_fc1.weight", "cpb_fc2.bias", "temperature",
            "query_embedding", "relative_pos_bias_local"} <= names


@pytest.mark.parametrize("grid", [(4, 5), (7,)])
def test_continuous_bias_full_attention_matches_reference(grid):
    """TransNeXt's stage-4 attention: length-scaled cosine attention plus the continuous bias over N x N."""
    mod, _ = build(Attention(heads=2, score=Cosine(), position=ContinuousBias(hidden=16)), Shape(8, grid, "tokens"))
    x = torch.randn(2, math.prod(grid), 8, dtype=torch.float64)
    q, k, v = linear(x, mod, "qkv").split(8, -1)
    cpb = cpb_reference(mod, grid, grid)
    logits = cosine_logits(mod, math.prod(grid))
    ref = torch.stack([softmax_attend(q[b], k[b], v[b], 2, lambda h, qh, kh: logits(h, qh, kh) + cpb[h])
                       for b in range(2)])
    assert (run(mod, x) - linear(ref, mod, "proj")).abs().max() < TOL


def ref_messengers(x, mod, grid, heads, size):
    """MSG-Transformer's window attention: every window's sequence is [its messenger, its size^d tokens]; the bias
    is Swin's table for token pairs, rel_pos_msg[h, 1] on the messenger's row, rel_pos_msg[h, 0] on the tokens'
    column for the messenger key."""
    b, _, c = x.shape
    ndim = len(grid)
    wins = groups(grid, size, "window")
    nw = len(wins)
    table = dict(mod.named_parameters()).get("relative_position_bias_table")
    out = torch.zeros(b, x.shape[1], c, dtype=x.dtype)
    for bi in range(b):
        for w, members in enumerate(wins):
            seq = torch.cat([x[bi, w:w + 1], x[bi, [nw + i for i in members]]])
            q, k, v = linear(seq, mod, "qkv").split(c, -1)
            bias = torch.zeros(heads, len(seq), len(seq), dtype=x.dtype)
            if table is not None:
                msg = p(mod, "rel_pos_msg")
                bias[:, 1:, 1:] = relative_bias(table.detach(), size, ndim)
                bias[:, 1:, 0] = msg[:, 0, 0]
                bias[:, 0, :] = msg[:, 1, 0]
            y = sdpa(q, k, v, heads, bias=bias)
            out[bi, w] = y[0]
            out[bi, [nw + i for i in members]] = y[1:]
    return linear(out, mod, "proj")


@pytest.mark.parametrize("grid,size,position", [((4, 4), 2, True), ((6, 3), 3, False), ((8,), 4, True)])
def test_messenger_windows_match_reference(grid, size, position):
    op = Attention(heads=2, partition=Window(size=size, messengers=True), position=RelativeBias() if position else None)
    windows = math.prod(g // size for g in grid)
    mod, _ = build(op, Shape(8, grid, "tokens", windows))
    x = torch.randn(2, windows + math.prod(grid), 8, dtype=torch.float64)
    assert (run(mod, x) - ref_messengers(x, mod, grid, 2, size)).abs().max() < TOL


def test_window_tokens_and_their_shuffle_match_msg_transformer():
    """MSG-Transformer: msg_tokens (1, s^2, 1, C) expanded over the regions, and shuffle_msg on the
    (B * regions, s^2, C) layout of window_partition(x, 1, s): view(-1, G, G, C / G).transpose(1, 2)."""
    grid, size, s, c = (16, 8), 2, 2, 8  # 8 x 4 windows, regions of 2 x 2 windows
    x_shape = Shape(c, grid, "tokens")
    op = WindowTokens(size=size, period=s)
    y = op.infer(x_shape)
    assert y.extra == 32 and op.params(x_shape, y) == s * s * c
    torch.manual_seed(0)
    mod = op.build(x_shape, y).double()
    x = torch.randn(2, 128, c, dtype=torch.float64)
    out = run(mod, x)
    tokens = p(mod, "tokens")
    for a, b_ in coords((8, 4)):
        assert torch.equal(out[0, a * 4 + b_], tokens[(a % s) * s + b_ % s])
    assert torch.equal(out[:, 32:], x)
    shuffle = ShuffleWindowTokens(size=size, region=s)
    assert shuffle.infer(y) == y
    smod = shuffle.build(y, y)
    z = torch.randn(2, y.tokens, c, dtype=torch.float64)
    got = run(smod, z)
    m = z[:, :32].reshape(2, 8, 4, c)  # the messenger map (window grid)
    regions = m.view(2, 4, s, 2, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)  # window_partition(.., 1, s)
    g = s * s
    shuffled = regions.view(-1, g, g, c // g).transpose(1, 2).reshape(-1, g, c)
    back = shuffled.view(2, 4, 2, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(2, 32, c)
    assert torch.equal(got[:, :32], back) and torch.equal(got[:, 32:], z[:, 32:])


def test_new_zoo2_part_errors():
    with pytest.raises(ShapeError, match="one prefix token per window"):
        Attention(heads=2, partition=Window(size=2, messengers=True)).infer(Shape(8, (4, 4), "tokens", 3))
    with pytest.raises(ShapeError, match="shifted"):
        Attention(heads=2, partition=Window(size=2, shift=1, messengers=True)).infer(Shape(8, (4, 4), "tokens", 4))
    assert Attention(heads=2, dim=4, out=4, value_skip=True).infer(Shape(8, (4, 4), "tokens")).channels == 4
    with pytest.raises(ShapeError, match="value_skip"):  # V (4 channels) and the output (8) differ
        Attention(heads=2, dim=4, value_skip=True).infer(Shape(8, (4, 4), "tokens"))
    with pytest.raises(ShapeError, match="performer"):
        Attention(heads=2, score=Performer(features=4), partition=Window(size=2)).infer(Shape(8, (4, 4), "tokens"))
    with pytest.raises(ShapeError, match="neighbourhood"):
        Attention(heads=2, partition=Neighbourhood(size=3), position=ContinuousBias()).infer(Shape(8, (4, 4), "tokens"))
    with pytest.raises(ShapeError, match="extra keys"):
        Attention(heads=2, partition=Window(size=2), extra_kv=Reduce(ratio=2)).infer(Shape(8, (4, 4), "tokens"))
    with pytest.raises(ShapeError, match="region"):
        ShuffleWindowTokens(size=2, region=2).infer(Shape(8, (6, 6), "tokens", 9))  # 2 does not divide 3x3 windows
    with pytest.raises(ShapeError, match="prefix"):
        WindowTokens(size=2).infer(Shape(8, (4, 4), "tokens", 1))


@st.composite
def zoo2_configs(draw):
    ndim = draw(st.sampled_from([1, 2]))
    heads = draw(st.integers(1, 2))
    c = heads * draw(st.sampled_from([2, 4]))
    kind = draw(st.sampled_from(["performer", "aggregated", "continuous", "messengers"]))
    extra, kw = 0, {}
    if kind == "performer":
        grid = tuple(draw(st.integers(2, 6)) for _ in range(ndim))
        extra = draw(st.integers(0, 1))
        kw["score"] = Performer(features=draw(st.integers(1, 6)))
        if draw(st.booleans()):
            kw["dim"] = heads * draw(st.sampled_from([2, 4]))
            kw["out"] = kw["dim"]
            kw["value_skip"] = True
        elif draw(st.booleans()):
            kw["kv"] = Reduce(ratio=2)
            grid, extra = tuple(2 * g for g in grid), 0
    elif kind == "aggregated":
        ratio = draw(st.integers(1, 3))
        grid = tuple(ratio * draw(st.integers(1, 3)) for _ in range(ndim))
        kw["partition"] = Neighbourhood(size=draw(st.sampled_from([1, 3])), mask=draw(st.booleans()),
                                        bias=draw(st.booleans()), tokens=draw(st.booleans()))
        kw["extra_kv"] = Reduce(ratio=ratio, mode="pool", pointwise=draw(st.booleans()),
                                act=draw(st.sampled_from([None, GELU_OP()])), norm=draw(st.sampled_from([None, LN_OP()])))
        kw["score"] = draw(st.sampled_from([None, Cosine()]))
        kw["position"] = draw(st.sampled_from([None, ContinuousBias(hidden=8)]))
    elif kind == "continuous":
        grid = tuple(draw(st.integers(2, 6)) for _ in range(ndim))
        kw["position"] = ContinuousBias(hidden=8)
        kw["score"] = draw(st.sampled_from([None, Cosine()]))
        if draw(st.booleans()):
            kw["kv"] = Reduce(ratio=2, mode="pool")
            grid = tuple(2 * g for g in grid)
    else:
        size = draw(st.integers(1, 3))
        grid = tuple(size * draw(st.integers(1, 3)) for _ in range(ndim))
        kw["partition"] = Window(size=size, messengers=True)
        kw["position"] = draw(st.sampled_from([None, RelativeBias()]))
        extra = math.prod(g // size for g in grid)
    op = Attention(heads=heads, qkv_bias=draw(st.booleans()), **kw)
    return op, Shape(c, grid, "tokens", extra)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(zoo2_configs())
def test_zoo2_part_rules_match_module(config):
    op, x = config
    y, mod, inp, out, flops = run_explicit(op, x, 2)
    assert out.shape == (2, y.tokens, y.channels) and y.layout == "tokens" and y.extra == x.extra
    counted = flops / 2 / 2  # per sample; the bias MLP runs once per batch: counted once, halved
    if isinstance(op.position, ContinuousBias):
        hid, h, d = op.position.hidden, op.geometry(x)[0], x.ndim
        from composer.ops.attention import cpb_counts
        mlp = math.prod(cpb_counts(x.spatial, op.position.key_grid(op, op.sizes(x)))) * (d * hid + hid * h)
        counted += mlp / 2  # the MLP runs once for the batch of 2
    assert abs(op.macs(x, y) - counted) <= 0.05 * counted
    with torch.no_grad():
        assert torch.allclose(out, mod(inp), atol=1e-5)


def test_zoo2_parts_in_the_language(tmp_path):
    """The three primitives as written in blueprints: T2T's performer layer, TransNeXt's aggregated attention and
    its stage-4 attention, MSG-Transformer's messengers with their shuffle."""
    import composer

    path = tmp_path / "zoo2.arch"
    path.write_text("""model zoo2_demo {
    input image(3, 32)
    stem { conv(16, 4, stride = 4) }
    stage {
        block {
            attention(1, dim = 8, out = 8, score = performer(4), value_skip = true) as performer_layer
            linear(16)
            attention(2, partition = neighbourhood(3, mask = true, bias = true, tokens = true),
                      extra_kv = reduce(2, "pool", pointwise = true, act = gelu, norm = layernorm(1e-6)),
                      score = cosine, position = continuous_bias(64)) as aggregated
            attention(2, score = cosine, position = continuous_bias(64)) as full
            window_tokens(4, period = 2) as messengers
            attention(2, partition = window(4, messengers = true), position = relative_bias) as window_attn
            shuffle_window_tokens(4, 2)
        }
    }
}
""")
    plan = composer.load(str(path))
    model = composer.build(str(path)).eval()
    assert plan.params == sum(t.numel() for t in model.parameters())
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 4 + 64, 16)


def test_relative_bias_std_sets_the_initialisation():
    """`relative_bias(std)` initialises the table with that std (DAT's 0.01); it was ignored before."""
    x = Shape(32, (16, 16), "tokens")
    for std in (0.01, 0.05):
        op = Attention(heads=2, partition=Window(size=16), position=RelativeBias(std=std))
        torch.manual_seed(0)
        table = op.build(x, op.infer(x)).relative_position_bias_table
        # trunc-normal(std) cut at +-2 (absolute): for these small stds the sample std is the std
        assert abs(table.std().item() - std) < 0.15 * std, (std, table.std().item())


def test_a_new_part_needs_no_edit_of_the_op_or_the_module():
    """A position part written outside composer (a linear distance penalty per head on 1-D tokens,
    ALiBi's form) plugs into `attention`: its rules, parameters and its piece of the module are its
    own; the output equals the equation written here."""
    from composer.layers.attention import Piece
    from composer.ops.attention import Position

    class DistancePiece(Piece):
        def __init__(self, heads):
            self.heads = heads

        def install(self, m):
            m.slopes = torch.nn.Parameter(torch.linspace(0.1, 0.5, self.heads))

        def bias(self, m, run):
            n = run.x.shape[1]
            i = torch.arange(n, dtype=run.x.dtype)
            return -m.slopes.to(run.x.dtype)[:, None, None] * (i[:, None] - i[None, :]).abs()

    class DistancePenalty(Position):
        def add_params(self, att, g):
            return g.heads

        def layer(self, att, g):
            return DistancePiece(g.heads)

    op = Attention(heads=2, position=DistancePenalty())
    x = Shape(8, (6,), "tokens")
    y = op.infer(x)
    mod = op.build(x, y).double().eval()
    assert op.params(x, y) == sum(p.numel() for p in mod.parameters())
    t = torch.randn(2, 6, 8, dtype=torch.float64)
    q, k, v = mod.qkv(t).split(8, -1)
    heads = lambda a: a.view(2, 6, 2, 4).transpose(1, 2)  # noqa: E731
    i = torch.arange(6.0, dtype=torch.float64)
    penalty = -mod.slopes[:, None, None] * (i[:, None] - i[None, :]).abs()
    a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0 + penalty, -1) @ heads(v)
    expected = mod.proj(a.transpose(1, 2).reshape(2, 6, 8))
    with torch.no_grad():
        assert (mod(t) - expected).abs().max() < 1e-10
