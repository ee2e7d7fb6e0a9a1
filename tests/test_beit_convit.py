"""Position terms on scores (composer/ops/positions.py, `blend` in composer/ops/heads.py), the
composites of blueprints/lib/position_mixers.arch, and the two families written with them, BEiT
and ConViT: each primitive against its equation written out here, each composite against timm's
module with the same weights, each family's parameter count and logits against timm's model."""

from __future__ import annotations

import pytest
import torch
from timm.models.beit import Attention as BeitAttention
from timm.models.convit import GPSA

import composer
from composer.diagnostics import ComposerError
from composer.ops import OPS
from composer.port import from_timm
from composer.program import Attend
from composer.shapes import Shape, ShapeError, TensorRef
from tests.helpers import one_block_mixer, perturb, split_heads

timm = pytest.importorskip("timm")

DIM, HEADS = 32, 4


def mixer(tmp_path, call: str, grid=(4, 6), cls: bool = True):
    """The module of `call` (a composite of lib/position_mixers) in a one-block model."""
    return one_block_mixer(tmp_path, call, ["lib/token_mixers", "lib/position_mixers"], DIM, grid, cls)


def run(module, x, grid):
    with torch.no_grad():
        return module(x, {" grid": torch.Size(grid)})


def tokens(n: int, count: int, seed: int = 3):
    return torch.randn(n, count, DIM, generator=torch.Generator().manual_seed(seed))


def _merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _positions(grid):
    return [(i, j) for i in range(grid[0]) for j in range(grid[1])]


# ---- relative_position_bias

def _bias_equation(table, grid, prefix):
    """B[h, n, m]: the table row of the offset (query - key) = (dy, dx), row
    (dy + H - 1) * (2W - 1) + (dx + W - 1); prefix tokens: row E-3 for a class query, E-2 for a
    class key (grid query), E-1 for class to class (BEiT, eq. in section 2.6 of the paper)."""
    H, W = grid
    pos = [None] * prefix + _positions(grid)
    e = table.shape[0]
    out = torch.empty(table.shape[1], len(pos), len(pos))
    for n, p in enumerate(pos):
        for m, r in enumerate(pos):
            if p is None and r is None:
                row = e - 1
            elif p is None:
                row = e - 3
            elif r is None:
                row = e - 2
            else:
                row = (p[0] - r[0] + H - 1) * (2 * W - 1) + (p[1] - r[1] + W - 1)
            out[:, n, m] = table[row]
    return out


@pytest.mark.parametrize("grid, cls", [((4, 6), True), ((3, 5), False)])
def test_relative_position_bias_equation(grid, cls):
    x = Shape(7, grid, "scores", int(cls), heads=3, keys=(grid, int(cls)))
    op = OPS["relative_position_bias"](prefix=cls)
    assert op.infer(x) == x
    module = op.build(x, x)
    assert op.params(x, x) == module.table.numel() == ((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3 * cls) * 3
    with torch.no_grad():
        module.table.normal_()
    expected = _bias_equation(module.table.detach(), grid, int(cls))
    assert torch.equal(module.score_bias(None)[0], expected)
    s = torch.randn(2, 3, x.tokens, x.tokens)
    with torch.no_grad():
        assert torch.equal(module(s), s + expected)


def test_relative_position_bias_one_dimensional():
    """On a 1-D grid of 5 the row is the offset + 4."""
    x = Shape(5, (5,), "scores", 0, heads=2, keys=((5,), 0))
    module = OPS["relative_position_bias"]().build(x, x)
    with torch.no_grad():
        module.table.normal_()
    b = module.score_bias()[0]
    for n in range(5):
        for m in range(5):
            assert torch.equal(b[:, n, m], module.table[n - m + 4])


@pytest.mark.parametrize("op, x, words", [
    (OPS["relative_position_bias"](), Shape(5, (5,), "scores", 1, heads=2, keys=((5,), 1)), "prefix tokens"),
    (OPS["relative_position_bias"](prefix=True), Shape(5, (5,), "scores", 0, heads=2, keys=((5,), 0)), "no prefix"),
    (OPS["relative_position_bias"](), Shape(4, (2, 3), "scores", 0, heads=2, keys=((2, 2), 0)), "one grid"),
    (OPS["relative_position_bias"](), Shape(8, (2, 3), "heads", 0, heads=2), "needs scores"),
])
def test_relative_position_bias_errors(op, x, words):
    with pytest.raises(ShapeError) as info:
        op.infer(x)
    assert words in info.value.message


def test_position_bias_attention_equals_timm_beit(tmp_path):
    """The composite with its defaults is BEiT's attention (q and v biases, the relative table with
    class-token entries), run as one SDPA call with the table as its mask."""
    ours, _ = mixer(tmp_path, f"position_bias_attention({DIM}, {HEADS})")
    assert any(ins.__class__ is Attend for ins in ours.program)
    ref = BeitAttention(DIM, num_heads=HEADS, qkv_bias=True, window_size=(4, 6)).eval()
    with torch.no_grad():
        for p in (ours.q_bias.bias, ours.v_bias.bias, ours.relative_position_bias.table):
            p.normal_()
        ref.qkv.weight.copy_(ours.qkv.weight)
        ref.q_bias.copy_(ours.q_bias.bias)
        ref.v_bias.copy_(ours.v_bias.bias)
        ref.relative_position_bias_table.copy_(ours.relative_position_bias.table)
        ref.proj.load_state_dict(ours.proj.state_dict())
    x = tokens(2, 1 + 24)
    with torch.no_grad():
        expected = ref(x)
    assert (run(ours, x, (4, 6)) - expected).abs().max() < 1e-5


def test_position_bias_attention_equation(tmp_path):
    """softmax(q kᵀ / sqrt(d) + B) v with B as written in `_bias_equation`, written out."""
    ours, _ = mixer(tmp_path, f"position_bias_attention({DIM}, {HEADS})", grid=(3, 5))
    with torch.no_grad():
        ours.relative_position_bias.table.normal_()
        ours.q_bias.bias.normal_()
    x = tokens(1, 16)
    with torch.no_grad():
        bias = torch.cat([ours.q_bias.bias, torch.zeros(DIM), ours.v_bias.bias])
        q, k, v = (split_heads(t, HEADS) for t in torch.nn.functional.linear(x, ours.qkv.weight, bias).chunk(3, -1))
        b = _bias_equation(ours.relative_position_bias.table, (3, 5), 1)
        a = (q @ k.transpose(-2, -1) * 8 ** -0.5 + b).softmax(-1)
        expected = ours.proj(_merge(a @ v))
    assert (run(ours, x, (3, 5)) - expected).abs().max() < 1e-5


# ---- position_scores, blend

def _ref(name: str, shape: Shape) -> TensorRef:
    return TensorRef(name, name, None, shape)


@pytest.mark.parametrize("grid", [(3, 5), (4,)])
def test_position_scores_equation(grid):
    """s[h, n, m] = w_h · (Δx, Δy, Δx² + Δy²) + b_h, Δ = key - query position (x the last axis)."""
    q = Shape(8, grid, "heads", 0, heads=3)
    op = OPS["position_scores"](k=_ref("k", q))
    y = op.infer(q)
    assert y == Shape(q.tokens, grid, "scores", 0, heads=3, keys=(grid, 0))
    module = op.build(q, y)
    assert op.params(q, y) == sum(p.numel() for p in module.parameters()) == 3 * (len(grid) + 2)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    pos = [p if len(grid) == 2 else (0, p[1]) for p in _positions(grid if len(grid) == 2 else (1, grid[0]))]
    expected = torch.empty(3, len(pos), len(pos))
    for n, (qy, qx) in enumerate(pos):
        for m, (ky, kx) in enumerate(pos):
            dx, dy = kx - qx, ky - qy
            f = torch.tensor([dx, dy, dx * dx + dy * dy] if len(grid) == 2 else [dx, dx * dx], dtype=torch.float)
            expected[:, n, m] = module.weight.detach() @ f + module.bias.detach()
    qt = torch.randn(2, 3, q.tokens, 8)
    with torch.no_grad():
        out = module(qt, qt, grids=(grid, grid))
    assert out.shape == (2, 3, q.tokens, q.tokens)
    assert (out - expected).abs().max() < 1e-5


def test_position_scores_refuses_prefix_tokens():
    q = Shape(8, (3, 3), "heads", 1, heads=2)
    with pytest.raises(ShapeError) as info:
        OPS["position_scores"](k=_ref("k", q)).infer(q)
    assert "prefix token" in info.value.message


def test_blend_equation():
    """(1 - σ(g_h)) x + σ(g_h) o, one gate per head."""
    s = Shape(6, (2, 3), "scores", 0, heads=3, keys=((2, 3), 0))
    op = OPS["blend"](other=_ref("o", s), init=0.5)
    module = op.build(s, op.infer(s))
    assert op.params(s, s) == 3 and torch.equal(module.gate, torch.full((3,), 0.5))
    with torch.no_grad():
        module.gate.normal_()
    x, o = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    g = 1 / (1 + torch.exp(-module.gate.detach()))
    expected = torch.stack([(1 - g[h]) * x[:, h] + g[h] * o[:, h] for h in range(3)], 1)
    with torch.no_grad():
        assert (module(x, o) - expected).abs().max() < 1e-6
    with pytest.raises(ShapeError):
        OPS["blend"](other=_ref("o", s.with_(heads=2))).infer(s)


def test_gated_position_attention_equals_timm_gpsa(tmp_path):
    ours, _ = mixer(tmp_path, f"gated_position_attention({DIM}, {HEADS})", grid=(4, 4), cls=False)
    assert not any(ins.__class__ is Attend for ins in ours.program)  # softmax, then a blend: as written
    ref = GPSA(DIM, num_heads=HEADS).eval()
    with torch.no_grad():
        ours.gating_param.gate.normal_()
        ours.pos_proj.bias.normal_()
        for name in ("qk", "v", "proj", "pos_proj"):
            getattr(ref, name).load_state_dict(getattr(ours, name).state_dict())
        ref.gating_param.copy_(ours.gating_param.gate)
    x = tokens(2, 16)
    with torch.no_grad():
        expected = ref(x)
    assert (run(ours, x, (4, 4)) - expected).abs().max() < 1e-5


def test_gated_position_attention_runs_on_any_grid(tmp_path):
    """The offsets are taken at run time: a non-square grid, and other input sizes."""
    ours, model = mixer(tmp_path, f"gated_position_attention({DIM}, {HEADS})", grid=(3, 5), cls=False)
    x = tokens(1, 15)
    with torch.no_grad():
        q, k = (split_heads(t, HEADS) for t in ours.qk(x).chunk(2, -1))
        v = split_heads(ours.v(x), HEADS)
        rel = torch.tensor([[(kx - qx, ky - qy, (kx - qx) ** 2 + (ky - qy) ** 2) for ky, kx in _positions((3, 5))]
                            for qy, qx in _positions((3, 5))], dtype=torch.float)
        pos = (rel @ ours.pos_proj.weight.t() + ours.pos_proj.bias).permute(2, 0, 1).softmax(-1)
        content = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
        g = torch.sigmoid(ours.gating_param.gate).view(1, -1, 1, 1)
        a = (1 - g) * content + g * pos
        expected = ours.proj(_merge(a / a.sum(-1, keepdim=True) @ v))
    assert (run(ours, x, (3, 5)) - expected).abs().max() < 1e-5
    assert model(torch.randn(1, 3, 40, 56)).shape == (1, 10)


def test_gated_position_attention_with_class_token_is_located(tmp_path):
    with pytest.raises(ComposerError) as info:
        mixer(tmp_path, f"gated_position_attention({DIM}, {HEADS})", grid=(3, 3), cls=True)
    text = info.value.render()
    assert "prefix token" in text and "position_mixers.arch:" in text and "pos_proj" in text


# ---- the families

def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, ref", [("beit_b", "beit_base_patch16_224"), ("convit_ti", "convit_tiny"),
                                       ("convit_s", "convit_small")])
def test_param_count_equals_timm(name, ref):
    with torch.device("meta"):
        expected = n_params(timm.create_model(ref, pretrained=False))
    plan = composer.load(name)
    assert plan.params == expected
    assert plan.reference == f"timm:{ref}"
    assert n_params(composer.build(name, device="meta")) == expected


def _ported(name, ref_name, **kwargs):
    torch.manual_seed(0)
    ref = timm.create_model(ref_name, pretrained=False, num_classes=10, **kwargs).eval()
    perturb(ref)
    with torch.no_grad():  # 2-D tables the perturbation leaves alone (BEiT's start at zero)
        for key, p in ref.named_parameters():
            if "relative_position_bias_table" in key or "pos_proj.weight" in key:
                p.normal_()
    depth = {"depth": kwargs["depth"]} if "depth" in kwargs else {}
    ours = composer.build(name, num_classes=10, **depth).eval()
    report = from_timm(ours, ref.state_dict())
    assert report.ok and not report.missing and not report.unexpected, report.render()
    return ours, ref


def test_beit_logits_equal_timm_after_port():
    """Two blocks of beit_base_patch16_224 (the full model's count is checked above)."""
    ours, ref = _ported("beit_b", "beit_base_patch16_224", depth=2)
    mixers = [m for n, m in ours.named_modules() if n.endswith(".token_mixer")]
    assert len(mixers) == 2 and all(any(i.__class__ is Attend for i in m.program) for m in mixers)  # one SDPA call
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4


def test_convit_logits_equal_timm_after_port():
    """The whole convit_tiny: ten gated positional blocks, the class token, two plain blocks."""
    ours, ref = _ported("convit_ti", "convit_tiny")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4


def test_beit_refuses_other_sizes():
    """The relative table is sized by the grid: other input sizes are refused, with the op named."""
    plan = composer.load("beit_b", depth=1)
    from composer.sizes import admits

    why = admits(plan, (160, 160))
    assert why is not None and "relative_position_bias" in why
