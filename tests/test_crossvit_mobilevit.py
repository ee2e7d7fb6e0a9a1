"""MobileViT and CrossViT against timm (parameter counts, logits after the weight port), and the
ops and language feature they brought: patches_to_batch / batch_to_patches, select_tokens,
attention(query = first(1)), resize and the `parallel tokens` merge. Expected values come from timm, torch
or computations written out here."""

import pytest
import torch
import torch.nn.functional as F

import composer
from helpers import n_params, write

timm = pytest.importorskip("timm")
from composer.port import from_timm  # noqa: E402

MODELS = {
    "mobilevit_xxs": ("mobilevit_xxs", 256),
    "mobilevit_xs": ("mobilevit_xs", 256),
    "mobilevit_s": ("mobilevit_s", 256),
    "crossvit_tiny": ("crossvit_tiny_240", 240),
    "crossvit_small": ("crossvit_small_240", 240),
}


@pytest.mark.parametrize("name", MODELS)
def test_param_count_equals_timm(name):
    ref, _ = MODELS[name]
    with torch.device("meta"):
        expected = n_params(timm.create_model(ref, pretrained=False))
    plan = composer.load(name)
    assert plan.params == expected
    assert n_params(composer.build(name, device="meta")) == expected
    assert plan.reference == f"timm:{ref}"


def test_reference_counts_of_the_zoo_table():
    assert composer.load("mobilevit_xxs").params == 1_272_024
    assert composer.load("mobilevit_s").params == 5_578_632
    assert composer.load("crossvit_tiny").params == 7_014_800


@pytest.mark.parametrize("name", ["mobilevit_xxs", "crossvit_tiny"])
def test_logits_match_timm_after_port(name):
    ref_name, res = MODELS[name]
    torch.manual_seed(0)
    ref = timm.create_model(ref_name, pretrained=False).eval()
    for mod in ref.modules():  # non-trivial batch-norm statistics, so that they are ported too
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    model = composer.build(name).eval()
    report = from_timm(model, ref.state_dict())
    assert not report.missing and not report.unexpected
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() < 1e-4


# ---- patches_to_batch / batch_to_patches


def _unfold(x, p):
    """(B, C, H, W) -> (B * p * p, H/p * W/p, C) written out with loops: sequence (b, i, j) holds
    pixel (a * p + i, c * p + j) of every patch (a, c), patches row-major."""
    b, ch, h, w = x.shape
    out = torch.empty(b * p * p, (h // p) * (w // p), ch)
    for n in range(b):
        for i in range(p):
            for j in range(p):
                for a in range(h // p):
                    for c in range(w // p):
                        out[n * p * p + i * p + j, a * (w // p) + c] = x[n, :, a * p + i, c * p + j]
    return out


def test_patches_to_batch_order_and_round_trip():
    from composer.ops import OPS
    from composer.shapes import Shape

    x = torch.randn(2, 5, 6, 4)
    shape = Shape(5, (6, 4), "map")
    unfold = OPS["patches_to_batch"](size=2)
    y_shape = unfold.infer(shape)
    assert y_shape == Shape(5, (3, 2), "tokens")
    y = unfold.build(shape, y_shape)(x)
    assert torch.equal(y, _unfold(x, 2))
    fold = OPS["batch_to_patches"](size=2)
    assert fold.infer(y_shape) == shape
    assert torch.equal(fold.build(y_shape, shape)(y), x)


def test_unfolded_block_shapes_and_macs(tmp_path):
    text = """
model m {
    input image(3, 16)
    stem conv(8, 1)
    stage { block { patches_to_batch(2); linear(8) as fc; batch_to_patches(2) } }
    head { global_pool("avg"); classifier(2) }
}
"""
    plan = composer.load(write(tmp_path, text))
    block = plan.stages[0].blocks[0]
    assert str(block.steps[0].y) == "(8x8 tokens, 8)"
    assert block.y.spatial == (16, 16) and block.y.layout == "map"
    # the linear runs on 4 sequences of 64 tokens per image: 4 * 64 * 8 * 8 MACs
    assert block.macs == 4 * 64 * 8 * 8
    model = composer.build(write(tmp_path, text))
    assert model(torch.randn(3, 3, 16, 16)).shape == (3, 2)


@pytest.mark.parametrize("body, message", [
    ("patches_to_batch(2); linear(8)", "is not closed"),
    ("linear(8); batch_to_patches(2)", "no matching patches_to_batch"),
    ("patches_to_batch(2); batch_to_patches(4)", "no matching patches_to_batch"),
    # a tensor named inside the unfolded part (its batch multiplied) is used only there
    ("patches_to_batch(2); save t; batch_to_patches(2); from t", "used across patches_to_batch"),
    ("save t; patches_to_batch(2); from t; batch_to_patches(2)", "used across patches_to_batch"),
    ("patches_to_batch(3); batch_to_patches(3)", "does not divide"),
])
def test_unfold_errors(tmp_path, body, message):
    text = f"""
model m {{
    input image(3, 16)
    stem conv(8, 1)
    stage {{ block {{ {body} }} }}
    head {{ global_pool("avg"); classifier(2) }}
}}
"""
    with pytest.raises(composer.ComposerError) as exc:
        composer.load(write(tmp_path, text))
    assert message in exc.value.render()


# ---- parallel tokens, select_tokens, attention(query = first(n)), resize


TOKENS_MODEL = """
model m {
    input image(3, 16)
    stem { patch_embed(8, 4); class_token(); save a }
    stage {
        block {
            parallel tokens {
                { select_tokens(0, 1); linear(16) }
                { from a; select_tokens(1); conv(16, 1) }
            }
            save joined
        }
    }
    head { global_pool("token"); classifier(2) }
}
"""


def test_parallel_tokens_concatenates_along_tokens(tmp_path):
    path = write(tmp_path, TOKENS_MODEL)
    y = composer.load(path).saved["joined"]
    assert (y.extra, y.spatial, y.channels, y.layout) == (1, (4, 4), 16, "tokens")  # class token + 4x4 grid
    model = composer.build(path).eval()
    x = torch.randn(2, 3, 16, 16)
    env = {"input": x}
    with torch.no_grad():
        model.stages[0](model.stem(x, env), env)
        blk = model.stages[0].blocks[0]
        a = env["a"]  # (2, 1 + 16, 8)
        grid = blk.conv(a[:, 1:].transpose(1, 2).reshape(2, 8, 4, 4)).flatten(2).transpose(1, 2)
        expected = torch.cat([blk.linear(a[:, :1]), grid], dim=1)
    assert env["joined"].shape == (2, 17, 16)
    assert torch.allclose(env["joined"], expected, atol=1e-6)


def test_parallel_tokens_rejects_different_channels(tmp_path):
    text = TOKENS_MODEL.replace("conv(16, 1) }", "}")
    with pytest.raises(composer.ComposerError) as exc:
        composer.load(write(tmp_path, text))
    assert "parallel tokens" in exc.value.render() and "same channels" in exc.value.render()


def test_select_tokens_shapes():
    from composer.ops import OPS
    from composer.shapes import Shape, ShapeError

    x = Shape(8, (4, 4), "tokens", extra=2)
    sel = OPS["select_tokens"]
    assert sel(start=0, count=1).infer(x) == Shape(8, (1,), "tokens")
    assert sel(start=1).infer(x) == Shape(8, (4, 4), "tokens", extra=1)
    assert sel(start=2).infer(x) == Shape(8, (4, 4), "tokens")
    assert sel(start=3).infer(x) == Shape(8, (15,), "tokens")
    assert sel(start=2, count=4).infer(x) == Shape(8, (4,), "tokens")
    with pytest.raises(ShapeError):
        sel(start=10, count=9).infer(x)


def test_first_token_query_attention_matches_a_written_out_computation():
    from composer.ops import OPS
    from composer.shapes import Shape

    torch.manual_seed(0)
    x_shape = Shape(8, (3, 3), "tokens", extra=1)
    op = OPS["attention"](heads=2, query=OPS["first"](count=1))
    y_shape = op.infer(x_shape)
    assert y_shape == Shape(8, (1,), "tokens")
    mod = op.build(x_shape, y_shape)
    assert n_params(mod) == op.params(x_shape, y_shape) == 4 * (8 * 8 + 8)
    x = torch.randn(2, 10, 8)
    q = mod.q(x[:, :1]).reshape(2, 1, 2, 4).permute(0, 2, 1, 3)
    k = mod.k(x).reshape(2, 10, 2, 4).permute(0, 2, 1, 3)
    v = mod.v(x).reshape(2, 10, 2, 4).permute(0, 2, 1, 3)
    attn = ((q @ k.transpose(-2, -1)) * 4 ** -0.5).softmax(-1)
    expected = mod.proj((attn @ v).transpose(1, 2).reshape(2, 1, 8))
    assert torch.allclose(mod(x), expected, atol=1e-6)


def test_resize_is_bicubic_interpolation():
    from composer.ops import OPS
    from composer.shapes import Shape

    x_shape = Shape(3, (30, 30), "map")
    op = OPS["resize"](size=28)
    y_shape = op.infer(x_shape)
    assert y_shape.spatial == (28, 28)
    x = torch.randn(1, 3, 30, 30)
    expected = F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False)
    assert torch.equal(op.build(x_shape, y_shape)(x), expected)
    assert OPS["resize"](size=[8, 12], mode="linear").infer(x_shape).spatial == (8, 12)


def test_crossvit_streams_and_head():
    plan = composer.load("crossvit_tiny")
    s0, s1 = plan.saved["s0"], plan.saved["s1"]
    assert (s0.extra, s0.spatial, s0.channels) == (1, (20, 20), 96)
    assert (s1.extra, s1.spatial, s1.channels) == (1, (14, 14), 192)
    model = composer.build("crossvit_tiny", num_classes=3, device="meta")
    assert model.num_classes == 3 and len(model.get_classifier()) == 2
