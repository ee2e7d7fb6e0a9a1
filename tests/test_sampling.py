"""Deformable sampling ops: `deform_conv`, the `deformable` key source of `attention`, and `unfold`.

Hypothesis checks each op's shape, parameter and MAC rules against its built module (1-D, 2-D and,
for deform_conv, 3-D). The numerics are compared with references that do not come from composer:
torchvision's `deform_conv2d` (a test-only dependency), plain convolutions (zero offsets), an
explicit per-tap linear interpolation written here for 1-D, `nn.Unfold`, and DAT's deformable
attention written here from the paper's formula (offset network, tanh-bounded offsets around the
cell centres, grid_sample of the input, softmax(q k^T / sqrt(d) + bias) v per head), its relative-
position bias read per offset group with F.grid_sample as DAT's `DAttentionBaseline` does, and, on a
2x2 map with zero offsets, that bias written out by hand as bilinear interpolation of the table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from composer.ops import OPS
from composer.shapes import Shape, ShapeError
from helpers import explicit_sdpa

BATCH = 2


def concrete(s: Shape) -> tuple[int, ...]:
    if s.layout == "map":
        return (BATCH, s.channels, *s.spatial)
    return (BATCH, s.tokens, s.channels)


def run(op, x: Shape):
    y = op.infer(x)
    torch.manual_seed(0)
    module = op.build(x, y).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "conv_offset" in name:  # non-zero offsets, so the sampling path is exercised
                p.normal_(0, 0.3)
    # FlopCounterMode counts 0 for the fused CPU SDPA kernel: count the attention as explicit matmuls
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(F, "scaled_dot_product_attention", explicit_sdpa)
        with FlopCounterMode(display=False) as counter:
            out = module(torch.randn(concrete(x)))
    return y, module, out, counter.get_total_flops() / 2 / BATCH


def check_rules(op, x):
    y, module, out, seen = run(op, x)
    assert tuple(out.shape) == concrete(y), f"{op.describe()} on {x}: shape rule says {y}"
    assert op.params(x, y) == sum(p.numel() for p in module.parameters()), f"{op.describe()} on {x}"
    if seen > 0:
        assert op.macs(x, y) == pytest.approx(seen, rel=0.05), f"{op.describe()} on {x}: counter {seen}"
    else:
        assert op.macs(x, y) == 0
    return y, module, out


SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.filter_too_much])


# ----------------------------------------------------------------------------- rules vs modules

@st.composite
def deform_case(draw):
    d = draw(st.sampled_from([1, 2, 3]))
    g = draw(st.sampled_from([1, 2]))
    og = draw(st.sampled_from([1, 2]))
    cin = g * og * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    padding = draw(st.none() | st.integers(0, 1))
    grid = tuple(draw(st.integers(3, 7 if d < 3 else 4)) for _ in range(d))
    op = OPS["deform_conv"](out=g * draw(st.integers(1, 3)), kernel=kernel, stride=stride, padding=padding,
                            dilation=draw(st.integers(1, 2)), groups=g, offset_groups=og, bias=draw(st.booleans()))
    return op, Shape(cin, grid)


@SETTINGS
@given(deform_case())
def test_deform_conv_rules(case):
    op, x = case
    try:
        op.infer(x)
    except ShapeError:
        return
    check_rules(op, x)


@st.composite
def deformable_case(draw):
    d = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    heads = groups * draw(st.sampled_from([1, 2]))
    c = heads * draw(st.sampled_from([2, 4]))
    grid = tuple(draw(st.integers(2, 7)) for _ in range(d))
    kv = OPS["deformable"](groups=groups, offset_range_factor=draw(st.sampled_from([0.0, 1.0, 2.0])),
                           kernel=draw(st.sampled_from([1, 3, 5])), stride=draw(st.integers(1, 2)),
                           bias=draw(st.booleans()))
    return OPS["attention"](heads=heads, kv=kv), Shape(c, grid, "tokens")


@SETTINGS
@given(deformable_case())
def test_deformable_attention_rules(case):
    op, x = case
    check_rules(op, x)


@SETTINGS
@given(st.sampled_from([1, 2, 3]), st.integers(1, 4), st.none() | st.integers(1, 3), st.integers(0, 2),
       st.integers(1, 4), st.data())
def test_unfold_rules(d, kernel, stride, padding, channels, data):
    grid = tuple(data.draw(st.integers(kernel, 8 if d < 3 else 5)) for _ in range(d))
    op, x = OPS["unfold"](kernel=kernel, stride=stride, padding=padding), Shape(channels, grid)
    y, _, _ = check_rules(op, x)
    assert y.channels == channels * kernel ** d and y.layout == "tokens"


def test_shape_errors():
    with pytest.raises(ShapeError, match="offset_groups"):
        OPS["deform_conv"](out=4, kernel=3, offset_groups=3).infer(Shape(4, (5, 5)))
    with pytest.raises(ShapeError, match="groups"):
        OPS["deform_conv"](out=3, kernel=3, groups=2).infer(Shape(4, (5, 5)))
    with pytest.raises(ShapeError, match="offset groups"):
        OPS["attention"](heads=2, kv=OPS["deformable"](groups=3)).infer(Shape(8, (4, 4), "tokens"))
    with pytest.raises(ShapeError, match="do not divide the 3 heads"):  # the bias table is per head
        OPS["attention"](heads=3, kv=OPS["deformable"](groups=2, bias=True)).infer(Shape(12, (4, 4), "tokens"))
    with pytest.raises(ShapeError, match="score bias"):
        OPS["attention"](heads=2, kv=OPS["deformable"](bias=True), extra_kv=OPS["kv_tokens"](count=2)).infer(
            Shape(8, (4, 4), "tokens"))
    with pytest.raises(ShapeError, match="does not fit"):
        OPS["unfold"](kernel=5).infer(Shape(3, (4, 4)))


# ----------------------------------------------------------------------------- numerics

def _deform_module(op, x, offset_std=0.5):
    y = op.infer(x)
    torch.manual_seed(1)
    m = op.build(x, y).double()
    with torch.no_grad():
        m.conv_offset.weight.normal_(0, offset_std)
        m.conv_offset.bias.normal_(0, 1.0)
    return m


@pytest.mark.parametrize("kw, grid", [
    (dict(out=6, kernel=3), (7, 8)),
    (dict(out=6, kernel=3, stride=2, groups=2, offset_groups=2), (9, 7)),
    (dict(out=4, kernel=2, stride=2, padding=0), (6, 6)),                          # LITv2's token merging
    (dict(out=8, kernel=[1, 3], dilation=2, offset_groups=4, bias=False), (5, 9)),
])
def test_deform_conv_matches_torchvision(kw, grid):
    from torchvision.ops import deform_conv2d

    op, x = OPS["deform_conv"](**kw), Shape(4, grid)
    m = _deform_module(op, x)
    t = torch.randn(2, 4, *grid, dtype=torch.float64)
    offset = m.conv_offset(t)
    assert offset.abs().max() > 0.5  # offsets of around a pixel: off-grid and out-of-map reads happen
    conv = op._conv()
    ref = deform_conv2d(t, offset, m.weight, m.bias, stride=conv.stride, padding=conv.pad(2),
                        dilation=conv.dilation)
    torch.testing.assert_close(m(t), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_fresh_deform_conv_is_the_plain_conv(d):
    grid = (9, 7, 5)[:d]
    op = OPS["deform_conv"](out=6, kernel=3, stride=2, groups=2)
    x = Shape(4, grid)
    m = op.build(x, op.infer(x)).double()
    assert all(float(p.detach().abs().max()) == 0 for p in m.conv_offset.parameters())  # zero-initialised
    t = torch.randn(2, 4, *grid, dtype=torch.float64)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    torch.testing.assert_close(m(t), conv(t, m.weight, m.bias, stride=2, padding=1, groups=2))


def _lerp_1d(row: torch.Tensor, p: float) -> torch.Tensor:
    """row (C, L) read at fractional position p, zero outside [0, L-1], linear between pixels."""
    lo = math.floor(p)
    w = p - lo
    out = torch.zeros(row.shape[0], dtype=row.dtype)
    for i, wi in ((lo, 1 - w), (lo + 1, w)):
        if 0 <= i < row.shape[1]:
            out = out + wi * row[:, i]
    return out


def test_deform_conv_1d_matches_explicit_interpolation():
    op, x = OPS["deform_conv"](out=3, kernel=3, stride=2, offset_groups=2), Shape(4, (11,))
    m = _deform_module(op, x, offset_std=0.8)
    t = torch.randn(2, 4, 11, dtype=torch.float64)
    off = m.conv_offset(t).detach()  # (B, og * 3, L)
    w, b = m.weight.detach(), m.bias.detach()
    lo = off.shape[-1]
    ref = torch.zeros(2, 3, lo, dtype=torch.float64)
    for n in range(2):
        for o in range(lo):
            taps = []
            for k in range(3):
                cols = []
                for g in range(2):
                    p = o * 2 - 1 + k + float(off[n, g * 3 + k, o])
                    cols.append(_lerp_1d(t[n, 2 * g:2 * g + 2], p))
                taps.append(torch.cat(cols))  # (C,)
            ref[n, :, o] = torch.einsum("ock,kc->o", w, torch.stack(taps)) + b
    torch.testing.assert_close(m(t), ref)


def test_unfold_matches_nn_unfold_and_1d():
    t = torch.randn(2, 3, 9, 10)
    x = Shape(3, (9, 10))
    op = OPS["unfold"](kernel=3, stride=2, padding=1)
    y = op.infer(x)
    out = op.build(x, y)(t)
    assert y.spatial == (5, 5)
    torch.testing.assert_close(out, torch.nn.Unfold(3, padding=1, stride=2)(t).transpose(1, 2))
    s = torch.randn(2, 3, 10)
    op1 = OPS["unfold"](kernel=4, stride=3, padding=1)
    out1 = op1.build(Shape(3, (10,)), None)(s)
    padded = F.pad(s, [1, 1])
    ref = torch.stack([padded[:, :, i * 3:i * 3 + 4].reshape(2, -1) for i in range(3)], 1)
    torch.testing.assert_close(out1, ref)


def _dat_reference(x, mod, heads, groups, factor, bias=None):
    """DAT's deformable attention on x (B, C, H, W), from the paper's formula, with the attention
    module's weights; with a table `rpe_table` (heads, 2H-1, 2W-1) its relative-position bias is read
    as DAT reads it (per offset group, F.grid_sample with align_corners=True at half the normalised
    query-minus-sample displacement), or `bias` (B, heads, N, M) is used as given."""
    P = dict(mod.named_parameters())
    b, c, h, w = x.shape
    cg, d = c // groups, c // heads
    tok = x.flatten(2).transpose(1, 2)
    q = tok @ P["q.weight"].T + P["q.bias"]                                 # (B, N, C)
    qm = q.transpose(1, 2).reshape(b * groups, cg, h, w)
    o = F.conv2d(qm, P["conv_offset.0.weight"], P["conv_offset.0.bias"], padding=P["conv_offset.0.weight"].shape[-1] // 2,
                 groups=cg)
    o = F.layer_norm(o.permute(0, 2, 3, 1), (cg,), P["conv_offset.1.weight"], P["conv_offset.1.bias"]).permute(0, 3, 1, 2)
    o = F.conv2d(F.gelu(o), P["conv_offset.3.weight"])                      # (B*g, 2, H, W): (dy, dx)
    o = torch.tanh(o) * factor / torch.tensor([h, w], dtype=x.dtype).view(1, 2, 1, 1)
    ys = (torch.arange(h, dtype=x.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=x.dtype) + 0.5) / w * 2 - 1
    py = ys.view(1, h, 1) + o[:, 0]
    px = xs.view(1, 1, w) + o[:, 1]
    grid = torch.stack([px, py], -1)                                        # grid_sample wants (x, y)
    xs_ = F.grid_sample(x.reshape(b * groups, cg, h, w), grid, mode="bilinear", align_corners=True)
    src = xs_.reshape(b, c, h * w).transpose(1, 2)                          # (B, M, C)
    if bias is None and "rpe_table" in P:
        hg, table = heads // groups, P["rpe_table"]
        qy, qx = torch.meshgrid(ys, xs, indexing="ij")                      # query centres (y, x)
        bias = torch.zeros(b, heads, h * w, h * w, dtype=x.dtype)
        for bi in range(b):
            for gi in range(groups):
                dy = (qy.reshape(-1, 1) - py[bi * groups + gi].reshape(1, -1)) * 0.5  # (N, M)
                dx = (qx.reshape(-1, 1) - px[bi * groups + gi].reshape(1, -1)) * 0.5
                t = table[gi * hg:(gi + 1) * hg][None]                      # heads of offset group gi
                r = F.grid_sample(t, torch.stack([dx, dy], -1)[None], mode="bilinear", align_corners=True)
                bias[bi, gi * hg:(gi + 1) * hg] = r[0]
    kv = src @ P["kv.weight"].T + P["kv.bias"]
    k, v = kv[..., :c], kv[..., c:]
    out = torch.zeros_like(q)
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        a = q[..., sl] @ k[..., sl].transpose(1, 2) * d ** -0.5
        a = (a if bias is None else a + bias[:, i]).softmax(-1)
        out[..., sl] = a @ v[..., sl]
    return out @ P["proj.weight"].T + P["proj.bias"]


@pytest.mark.parametrize("heads, groups, grid, bias", [
    (4, 2, (5, 6), False), (3, 3, (7, 7), False), (2, 1, (4, 4), False),
    (4, 2, (5, 6), True), (6, 3, (4, 4), True), (2, 1, (3, 5), True),
])
def test_deformable_attention_matches_dat_formula(heads, groups, grid, bias):
    c = 4 * heads
    op = OPS["attention"](heads=heads, kv=OPS["deformable"](groups=groups, offset_range_factor=2, kernel=3,
                                                            bias=bias))
    x = Shape(c, grid, "tokens")
    torch.manual_seed(0)
    mod = op.build(x, op.infer(x)).double()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)
    assert {n.split(".")[0] for n, _ in mod.named_parameters()} == {"q", "kv", "proj", "conv_offset"} | \
        ({"rpe_table"} if bias else set())
    if bias:
        assert mod.rpe_table.shape == (heads, 2 * grid[0] - 1, 2 * grid[1] - 1)
    t = torch.randn(2, c, *grid, dtype=torch.float64)
    out = mod(t.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out, _dat_reference(t, mod, heads, groups, 2.0))


def test_deformable_bias_by_hand_on_a_2x2_map():
    """Zero offsets on a 2x2 map: sample j sits on the centre of cell j, so the bias of query i and key
    j reads the 3x3 table at index 1 + (i - j) / 2 per axis (the normalised displacement (i - j) / 2
    mapped by align_corners=True onto 0..2): an entry, or the mean of two or four neighbours."""
    heads, c = 2, 8
    op = OPS["attention"](heads=heads, kv=OPS["deformable"](groups=1, kernel=1, bias=True))
    x = Shape(c, (2, 2), "tokens")
    torch.manual_seed(0)
    mod = op.build(x, op.infer(x)).double()
    assert 0.005 < float(mod.rpe_table.detach().std()) < 0.02  # DAT's trunc_normal(std=0.01)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)
        mod.conv_offset[3].weight.zero_()                                   # zero offsets
    table = mod.rpe_table.detach()

    def lerp(h, y, x):                                                      # bilinear at half-integers
        y0, x0 = int(y), int(x)
        ys, xs = ([y0] if y == y0 else [y0, y0 + 1]), ([x0] if x == x0 else [x0, x0 + 1])
        return sum(float(table[h, a, b_]) for a in ys for b_ in xs) / (len(ys) * len(xs))

    cells = [(0, 0), (0, 1), (1, 0), (1, 1)]
    hand = torch.tensor([[[lerp(h, 1 + (qi - ki) / 2, 1 + (qj - kj) / 2) for ki, kj in cells] for qi, qj in cells]
                         for h in range(heads)], dtype=torch.float64)
    assert float(hand[0, 0, 3]) == pytest.approx(float(table[0, :2, :2].mean()))  # (-1, -1): four neighbours
    t = torch.randn(2, c, 2, 2, dtype=torch.float64)
    out = mod(t.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out, _dat_reference(t, mod, heads, 1, 2.0, bias=hand.expand(2, -1, -1, -1)))
    ref_no_bias = _dat_reference(t, mod, heads, 1, 2.0, bias=torch.zeros(2, heads, 4, 4, dtype=torch.float64))
    assert not torch.allclose(out, ref_no_bias)  # the bias matters


def test_deformable_1d_runs_and_backpropagates():
    op = OPS["attention"](heads=2, kv=OPS["deformable"](groups=2, kernel=3, stride=2))
    x = Shape(8, (9,), "tokens")
    mod = op.build(x, op.infer(x))
    t = torch.randn(2, 9, 8, requires_grad=True)
    mod(t).sum().backward()
    assert mod.conv_offset[3].weight.grad is not None and t.grad is not None
