"""CoaT-Lite and MobileViTv2 from generic primitives (lib/factorized_mixers, lib/mobile):
`weighted_pool` against its equation, the factorized and separable attentions against timm's
modules with copied weights and against the equations written out here, `reuse` paths with
`{NAME}` parts, and both families against timm (parameter counts, ported logits at the default
size and at another size, each with the grid seen at run time)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import composer
from composer.diagnostics import ComposerError
from composer.ops import OPS
from composer.port import from_timm
from composer.shapes import Shape, ShapeError, TensorRef
from tests.helpers import count_of_timm, n_params, one_block_mixer, perturb, split_heads, write

timm = pytest.importorskip("timm")

GEN = torch.Generator().manual_seed(0)
DIM, HEADS = 32, 4


def _merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _module(tmp_path, call: str, grid, cls: bool):
    """The module of `call` (a composite of lib/factorized_mixers) in a one-block model."""
    return one_block_mixer(tmp_path, call, ["lib/factorized_mixers"], DIM, grid, cls)


def _run(module, x, grid):
    with torch.no_grad():
        return module(x, {" grid": torch.Size(grid)})


# ----------------------------------------------------------------------------- weighted_pool

@pytest.mark.parametrize("layouts", [("tokens", "tokens"), ("map", "map"), ("map", "tokens"), ("tokens", "map")])
def test_weighted_pool_equation(layouts):
    """Σ_n w_n x_n over the positions of a 3x5 grid, as a (B, C, 1, 1) map, whichever layout x and
    the weights come in."""
    x_map = torch.randn(2, 6, 3, 5, generator=GEN)
    w_map = torch.randn(2, 1, 3, 5, generator=GEN)
    expected = torch.zeros(2, 6, 1, 1)
    for i in range(3):
        for j in range(5):
            expected[:, :, 0, 0] += w_map[:, :, i, j] * x_map[:, :, i, j]
    as_tokens = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731
    x = x_map if layouts[0] == "map" else as_tokens(x_map)
    w = w_map if layouts[1] == "map" else as_tokens(w_map)
    op = OPS["weighted_pool"](weights=TensorRef("w", "w", None, Shape(1, (3, 5), layouts[1])))
    y = op.infer(Shape(6, (3, 5), layouts[0]))
    assert y == Shape(6, (1, 1), "map")
    assert op.macs(Shape(6, (3, 5), layouts[0]), y) == 6 * 15
    with torch.no_grad():
        out = op.build(Shape(6, (3, 5), layouts[0]), y)(x, w)
    assert (out - expected).abs().max() < 1e-5


@pytest.mark.parametrize("x, w, words", [
    (Shape(6, (3, 5), "tokens"), Shape(2, (3, 5), "tokens"), "not one"),
    (Shape(6, (3, 5), "tokens"), Shape(1, (5, 3), "tokens"), "do not lie on"),
    (Shape(6, (3, 5), "tokens", 1), Shape(1, (3, 5), "tokens"), "do not lie on"),
    (Shape(6, (3,), "heads", heads=2), Shape(1, (3,), "tokens"), "map or tokens"),
])
def test_weighted_pool_shape_errors(x, w, words):
    with pytest.raises(ShapeError) as info:
        OPS["weighted_pool"](weights=TensorRef("w", "w", None, w)).infer(x)
    assert words in info.value.message


# ----------------------------------------------------------------------------- factorized attention

def _factorized_equation(ours, x, grid, heads, kernels=(3, 5, 7), kernel_heads=(2, 3, 3)):
    """scale · q (softmax_tokens(k)ᵀ v) + [0; q ⊙ dwconv(v)] per head, the class token (first)
    without the position term, then proj; each kernel's conv on its own group of heads."""
    b, n, c = x.shape
    d = c // heads
    q, k, v = (split_heads(t, heads) for t in ours.qkv(x).chunk(3, -1))
    factor = q @ (k.softmax(dim=2).transpose(-2, -1) @ v) * d ** -0.5
    vg = v[:, :, 1:].transpose(-2, -1).reshape(b, c, *grid)  # heads side by side on the grid
    convs = [getattr(ours.crpe, f"conv{i + 1}") for i in range(len(kernels))]
    parts, start = [], 0
    for conv, kernel, h in zip(convs, kernels, kernel_heads):
        part = vg[:, start:start + h * d]
        parts.append(F.conv2d(part, conv.weight, conv.bias, padding=kernel // 2, groups=h * d))
        start += h * d
    conv_v = torch.cat(parts, 1).reshape(b, heads, d, -1).transpose(-2, -1)
    relative = F.pad(q[:, :, 1:] * conv_v, (0, 0, 1, 0))
    return ours.proj(_merge(factor + relative))


@pytest.mark.parametrize("grid", [(4, 6), (3, 5)])
def test_factorized_attention_equation(tmp_path, grid):
    ours, _ = _module(tmp_path, f"factorized_attention({DIM}, 8)", (4, 6), cls=True)
    x = torch.randn(2, 1 + grid[0] * grid[1], DIM, generator=GEN)  # (3, 5): another grid at run time
    with torch.no_grad():
        expected = _factorized_equation(ours, x, grid, 8)
    assert (_run(ours, x, grid) - expected).abs().max() < 1e-5


def test_factorized_attention_equals_timm_coat(tmp_path):
    from timm.models.coat import ConvRelPosEnc, FactorAttnConvRelPosEnc

    ours, _ = _module(tmp_path, f"factorized_attention({DIM}, 8)", (4, 6), cls=True)
    crpe = ConvRelPosEnc(head_chs=DIM // 8, num_heads=8, window={3: 2, 5: 3, 7: 3})
    ref = FactorAttnConvRelPosEnc(DIM, num_heads=8, qkv_bias=True, shared_crpe=crpe).eval()
    with torch.no_grad():
        ref.qkv.load_state_dict(ours.qkv.state_dict())
        ref.proj.load_state_dict(ours.proj.state_dict())
        for i in range(3):
            crpe.conv_list[i].load_state_dict(getattr(ours.crpe, f"conv{i + 1}").state_dict())
        x = torch.randn(2, 1 + 24, DIM, generator=GEN)
        expected = ref(x, (4, 6))
    assert (_run(ours, x, (4, 6)) - expected).abs().max() < 1e-5


def test_factorized_attention_position_term_is_replaceable(tmp_path):
    """`position` replaces the grouped convolutions (here: one depthwise 3x3 over every head)."""
    ours, _ = _module(tmp_path, f"factorized_attention({DIM}, 8, position = conv({DIM}, 3, groups = {DIM}))",
                      (4, 6), cls=True)
    assert [n for n, _ in ours.crpe.named_parameters()] == ["weight", "bias"]
    assert ours.crpe.weight.shape == (DIM, 1, 3, 3)


# ----------------------------------------------------------------------------- separable attention

def test_separable_attention_equation_and_timm(tmp_path):
    """relu(v) ⊙ Σ_n softmax_n(q)_n k_n, projected: against the equation and timm's
    LinearSelfAttention (on (B, C, 1, N): one patch offset of N patches)."""
    from timm.models.mobilevit import LinearSelfAttention

    ours, _ = _module(tmp_path, f"separable_attention({DIM})", (4, 6), cls=False)
    x = torch.randn(2, 24, DIM, generator=GEN)
    with torch.no_grad():
        qkv = ours.qkv_proj(x.transpose(1, 2).reshape(2, DIM, 4, 6)).flatten(2)  # (B, 1 + 2C, N)
        q, k, v = qkv[:, :1], qkv[:, 1:1 + DIM], qkv[:, 1 + DIM:]
        context = (k * q.softmax(-1)).sum(-1, keepdim=True)  # (B, C, 1)
        out = F.conv1d(F.relu(v) * context, ours.out_proj.weight[..., 0], ours.out_proj.bias)
        expected = out.reshape(2, DIM, 4, 6)
        ref = LinearSelfAttention(DIM).eval()
        ref.qkv_proj.load_state_dict(ours.qkv_proj.state_dict())
        ref.out_proj.load_state_dict(ours.out_proj.state_dict())
        timm_out = ref(x.transpose(1, 2).unsqueeze(2)).squeeze(2).reshape(2, DIM, 4, 6)
        got = _run(ours, x, (4, 6))
    got = got if got.ndim == 4 else got.transpose(1, 2).reshape(2, DIM, 4, 6)
    assert (got - expected).abs().max() < 1e-5
    assert (got - timm_out).abs().max() < 1e-5


# ----------------------------------------------------------------------------- reuse paths

REUSED = """
mixer again(stage) {{ reuse stages.{{stage}}.blocks.0.c }}
model m {{
    input image(3, 16)
    stem conv(8, 3)
    stages for i in 0..2 {{
        block {{ conv(8, 3) as c }}
        block {{ again({arg}) }}
    }}
    head {{ global_pool("avg"); classifier(10) }}
}}
"""


def test_reuse_path_with_a_variable(tmp_path):
    model = composer.build(write(tmp_path, REUSED.format(arg="i"))).eval()
    conv = 8 * 8 * 9 + 8
    assert n_params(model) == (3 * 8 * 9 + 8) + 2 * conv + (8 * 10 + 10)  # the reused convs counted once
    x = torch.randn(1, 3, 16, 16, generator=GEN)
    s0, s1 = model.stages[0].blocks[0].c, model.stages[1].blocks[0].c
    with torch.no_grad():
        h = model.stem.conv(x)
        h = s1(s1(s0(s0(h))))
        expected = model.head.classifier(h.mean((2, 3)))
        assert (model(x) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("arg, words", [("-1", "not an index"), ("1.5", "not an index")])
def test_reuse_path_variable_errors(tmp_path, arg, words):
    with pytest.raises(ComposerError) as info:
        composer.check(write(tmp_path, REUSED.format(arg=arg)))
    assert words in str(info.value)


def test_reuse_path_unknown_variable_is_located(tmp_path):
    text = REUSED.format(arg="i").replace("stages.{stage}", "stages.{nothing}")
    with pytest.raises(ComposerError) as info:
        composer.check(write(tmp_path, text))
    assert "no variable 'nothing'" in str(info.value) and "m.arch:2:" in str(info.value)


# ----------------------------------------------------------------------------- the families

@pytest.mark.parametrize("ours, name, count", [
    ("coat_lite_mini", "coat_lite_mini", 11_011_560),
    ("mobilevitv2_050", "mobilevitv2_050", 1_370_593),
])
def test_parameter_count_equals_timm(ours, name, count):
    assert count_of_timm(ours, name) == count


def _ported(name: str, **kwargs):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    perturb(ref)
    with torch.no_grad():
        ref.get_classifier().weight.normal_(std=0.1)
    ours = composer.build(name, num_classes=10).eval()
    report = from_timm(ours, ref.state_dict())
    assert report.ok, report.render()
    return ours, ref


@pytest.mark.parametrize("size", [224, 160, 256])
def test_coat_lite_ported_gives_timm_logits(size):
    """At 224 (the default), 160 and 256 (timm built for that size, the same weights; ours built
    for 224 and given the smaller or larger grids at run time: the shared position encodings are
    reused there, and the class token is dropped from however many tokens there are)."""
    ours, ref = _ported("coat_lite_mini", img_size=size)
    x = torch.randn(1, 3, size, size, generator=GEN)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (1, 10)
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("size", [256, 192])
def test_mobilevitv2_ported_gives_timm_logits(size):
    """At 256 (the default) and 192: every stage's grid is even there, so the 2x2 patches tile it
    as in timm (which would resize the map where they do not; ours refuses such sizes)."""
    ours, ref = _ported("mobilevitv2_050")
    x = torch.randn(2, 3, size, size, generator=GEN)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert (a - b).abs().max().item() < 1e-4


def test_mobilevitv2_refuses_sizes_the_patches_do_not_tile():
    model = composer.build("mobilevitv2_050").eval()
    with pytest.raises(composer.InputSizeError) as info, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert "57 to 64 plus multiples of 64" in str(info.value)


def test_factorized_attention_refuses_tokens_without_a_class_token(tmp_path):
    """The composite splits class tokens from the grid by what they are (prefix_tokens/grid_tokens):
    a sequence without one is a located error, not a silently shifted grid."""
    path = tmp_path / "m.arch"
    path.write_text("""import "lib/factorized_mixers"
model m {
    input image(3, 32)
    stem patch_embed(64, 4)
    stage { block { to_tokens; factorized_attention(64) as attn } }
    head { global_pool("avg"); classifier(10) }
}
""")
    with pytest.raises(composer.ComposerError, match="prefix_tokens: the tokens .* have no prefix"):
        composer.check(str(path))


def test_separable_attention_along_rows_equals_timm_on_its_layout(tmp_path):
    """`axis = "last"`: one sequence per row of a (C, P, N) map, as timm's LinearSelfAttention runs
    on (B, C, P, N); checked against it and against the equation per row, at the build grid and at
    another (the gate (C, P x 1) broadcasts over the columns)."""
    from timm.models.mobilevit import LinearSelfAttention

    path = write(tmp_path, f"""
import "lib/factorized_mixers"
model m {{
    input image({DIM}, [4, 6])
    stage {{ block {{ separable_attention({DIM}, axis = "last") as attn }} }}
}}
""")
    plan = composer.load(f"{path}:m")
    assert str(plan.stages[0].y) == f"({DIM}, 4x6)"
    ours = composer.build(f"{path}:m").eval()
    ref = LinearSelfAttention(DIM).eval()
    ref.load_state_dict({k.split("attn.")[-1]: v for k, v in ours.state_dict().items()})
    for p, n in [(4, 6), (4, 9), (1, 5)]:
        x = torch.randn(2, DIM, p, n, generator=GEN)
        with torch.no_grad():
            got = ours(x)
            qkv = ref.qkv_proj(x)
            q, k, v = qkv[:, :1], qkv[:, 1:1 + DIM], qkv[:, 1 + DIM:]
            context = torch.stack([(k[:, :, r] * q[:, :, r].softmax(-1)).sum(-1) for r in range(p)], 2)
            expected = ref.out_proj(F.relu(v) * context[..., None])
            assert (got - expected).abs().max() < 1e-5
            assert (got - ref(x)).abs().max() < 1e-5
