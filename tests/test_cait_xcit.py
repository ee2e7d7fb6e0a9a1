"""CaiT and XCiT from generic primitives: `class_attention` (lib/token_mixers) against timm's
ClassAttn with copied weights and against its equation with two prefix tokens, at the build grid
and at another; both families against timm (parameter counts, ported logits with perturbed weights
and random layer scales, XCiT also at other input sizes, built once and given the grid at run time)."""

from __future__ import annotations

import pytest
import torch

import composer
from composer.port import from_timm
from tests.helpers import count_of_timm, perturb, split_heads, write

timm = pytest.importorskip("timm")

GEN = torch.Generator().manual_seed(0)
DIM, HEADS = 32, 4


def _class_attention(tmp_path, grid, prefix: int = 1):
    """The `class_attention` module of a one-block model built for tokens on `grid` behind `prefix`
    class tokens."""
    text = f"""import "lib/token_mixers"
model m {{
    input image(3, [{8 * grid[0]}, {8 * grid[1]}])
    stem {{ patch_embed({DIM}, 8); to_tokens; class_token({prefix}) }}
    stage {{ block {{ class_attention({DIM}, {HEADS}, qkv_bias = true) as attn }} }}
    head {{ global_pool("avg"); classifier(10) }}
}}
"""
    model = composer.build(write(tmp_path, text)).eval()
    module = dict(model.named_modules())["stages.0.blocks.0.attn"]
    with torch.no_grad():  # weights large enough that the attention is far from uniform
        for p in module.parameters():
            p.normal_(std=0.3, generator=GEN)
    return module


def _run(module, x, grid):
    with torch.no_grad():
        return module(x, {" grid": torch.Size(grid)})


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_class_attention_equals_timm_class_attn(tmp_path, grid):
    """timm's ClassAttn (CaiT's, and XCiT's ClassAttentionBlock's) with the same q, k, v and proj:
    built for a 4x4 grid, also run on a 3x5 one (the keys are whatever tokens there are)."""
    from timm.models.cait import ClassAttn

    ours = _class_attention(tmp_path, (4, 4))
    ref = ClassAttn(DIM, num_heads=HEADS, qkv_bias=True).eval()
    with torch.no_grad():
        for name in ("q", "k", "v", "proj"):
            getattr(ref, name).load_state_dict(getattr(ours, name).state_dict())
        x = torch.randn(2, 1 + grid[0] * grid[1], DIM, generator=GEN)
        expected = ref(x)
    out = _run(ours, x, grid)
    assert out.shape == expected.shape == (2, 1, DIM)
    assert (out - expected).abs().max() < 1e-5


def test_class_attention_equation_with_two_prefix_tokens(tmp_path):
    """softmax(q(x_p) k(x)ᵀ / sqrt(d)) v(x) per head: every prefix token is a query, every token
    (prefix and grid) a key; the output is the prefix tokens."""
    ours = _class_attention(tmp_path, (3, 3), prefix=2)
    x = torch.randn(2, 2 + 9, DIM, generator=GEN)
    with torch.no_grad():
        q = split_heads(ours.q(x[:, :2]), HEADS)
        k, v = split_heads(ours.k(x), HEADS), split_heads(ours.v(x), HEADS)
        a = (q @ k.transpose(-2, -1) * (DIM // HEADS) ** -0.5).softmax(-1)  # (2, heads, 2, 11)
        expected = ours.proj((a @ v).transpose(1, 2).reshape(2, 2, DIM))
    assert (_run(ours, x, (3, 3)) - expected).abs().max() < 1e-5


def test_class_attention_refuses_tokens_without_a_class_token(tmp_path):
    path = write(tmp_path, """import "lib/token_mixers"
model m {
    input image(3, 32)
    stem patch_embed(64, 4)
    stage { block { to_tokens; class_attention(64) as attn } }
    head { global_pool("avg"); classifier(10) }
}
""")
    with pytest.raises(composer.ComposerError, match="prefix_tokens: the tokens .* have no prefix"):
        composer.check(path)


# ----------------------------------------------------------------------------- the families

@pytest.mark.parametrize("ours, name, count", [
    ("cait_xxs24", "cait_xxs24_224", 11_956_264),
    ("xcit_nano_12_p16", "xcit_nano_12_p16_224", 3_053_224),
])
def test_parameter_count_equals_timm(ours, name, count):
    assert count_of_timm(ours, name) == count


def _ported(ours: str, name: str):
    """timm's model with perturbed norms, biases and BN statistics, layer scales drawn from [0.5,
    1.5) (at their 1e-5 / 1.0 inits a misplaced block barely shows) and attention weights of std
    fan_in^-0.5 (so the class token's attention is far from uniform), ported to ours."""
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=10).eval()
    perturb(ref)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if "gamma" in key:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif p.ndim == 2 and ".attn." in key:
                p.normal_(std=p.shape[1] ** -0.5, generator=gen)
        ref.get_classifier().weight.normal_(std=0.1)
    model = composer.build(ours, num_classes=10).eval()
    report = from_timm(model, ref.state_dict())
    assert report.ok, report.render()
    return model, ref


def test_cait_ported_gives_timm_logits():
    """The full cait_xxs24 (24 + 2 blocks) at 224; its learned position table ties it to that size."""
    ours, ref = _ported("cait_xxs24", "cait_xxs24_224")
    x = torch.randn(2, 3, 224, 224, generator=GEN)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (2, 10)
    assert (a - b).abs().max().item() < 1e-4


def test_cait_refuses_other_sizes_for_its_position_table():
    model = composer.build("cait_xxs24", depth=1)
    with pytest.raises(composer.InputSizeError), torch.no_grad():
        model(torch.randn(1, 3, 160, 160))


@pytest.mark.parametrize("size", [(224, 224), (160, 160), (192, 256)])
def test_xcit_ported_gives_timm_logits(size):
    """The full xcit_nano_12_p16, built for 224, at 224 and at other multiples of 16 (timm's XCiT
    makes its Fourier position encoding for the grid it gets, ours too; the class attention's keys
    are however many tokens there are)."""
    ours, ref = _ported("xcit_nano_12_p16", "xcit_nano_12_p16_224")
    x = torch.randn(2, 3, *size, generator=GEN)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (2, 10)
    assert (a - b).abs().max().item() < 1e-4
