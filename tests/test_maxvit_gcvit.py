"""MaxViT (TF variant) and GC-ViT: parameter counts, logits after the weight port, features, and
the pieces they need (TF-SAME padding, the per-head relative-bias map, tiling, given queries)."""

import warnings

import pytest
import torch

import composer
import composer.port
from composer import ComposerWarning
from composer.layers.attention import Run
from helpers import REPO, n_params

timm = pytest.importorskip("timm")

MAXVIT = str(REPO / "blueprints" / "maxvit.arch")
GCVIT = str(REPO / "blueprints" / "gcvit.arch")

PAIRS = [
    (f"{MAXVIT}:maxvit_t", "maxvit_tiny_tf_224", 30_916_528),
    (f"{MAXVIT}:maxvit_s", "maxvit_small_tf_224", None),
    (f"{GCVIT}:gcvit_xxt", "gcvit_xxtiny", 11_995_428),
    (f"{GCVIT}:gcvit_xt", "gcvit_xtiny", None),
    (f"{GCVIT}:gcvit_t", "gcvit_tiny", None),
]


@pytest.mark.parametrize("target,ref,expected", PAIRS)
def test_param_count_equals_timm(target, ref, expected):
    with torch.device("meta"):
        reference = n_params(timm.create_model(ref))
        built = n_params(composer.build(target))
    if expected is not None:
        assert reference == expected
    assert built == reference == composer.load(target).params


def _randomise(model):
    """Non-trivial batch-norm statistics, biases and bias tables, so the port is really exercised."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif key.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif key.endswith("relative_position_bias_table"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif key.endswith(".bias") and t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@pytest.mark.parametrize("target,ref", [(f"{MAXVIT}:maxvit_t", "maxvit_tiny_tf_224"),
                                        (f"{GCVIT}:gcvit_xxt", "gcvit_xxtiny")])
def test_logits_match_timm_after_port(target, ref):
    torch.manual_seed(0)
    reference = timm.create_model(ref).eval()
    _randomise(reference)
    model = composer.build(target).eval()
    report = composer.port.from_timm(model, reference.state_dict())
    assert not report.missing and not report.unexpected
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        diff = (model(x) - reference(x)).abs().max().item()
    assert diff < 1e-4


def test_maxvit_features_match_timm():
    with torch.device("meta"):
        reference = timm.create_model("maxvit_tiny_tf_224", features_only=True, out_indices=(1, 2, 3, 4))
        model = composer.build(f"{MAXVIT}:maxvit_t", features_only=True)
    assert [f["num_chs"] for f in model.feature_info] == reference.feature_info.channels() == [64, 128, 256, 512]
    assert [f["reduction"] for f in model.feature_info] == reference.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("size,stride,kernel", [(224, 2, 3), (7, 2, 3), (9, 2, 3), (10, 3, 5), (8, 1, 4)])
def test_conv_same_padding_matches_tf_same(size, stride, kernel, tmp_path):
    from timm.layers import create_conv2d

    ref = create_conv2d(4, 6, kernel, stride=stride, padding="same", bias=True)
    path = tmp_path / "same.arch"
    path.write_text(f'model same {{ input image(4, {size}); stem conv(6, {kernel}, stride = {stride}, '
                    f'padding = "same") }}')
    plan = composer.load(str(path))
    out = -(-size // stride)  # TF SAME: ceil(size / stride)
    assert plan.stem.y.spatial == (out, out)
    model = composer.build(str(path)).eval()
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][0]
    with torch.no_grad():
        conv.weight.copy_(ref.weight)
        conv.bias.copy_(ref.bias)
        x = torch.randn(2, 4, size, size)
        y = model.forward_features(x)
        assert y.shape == (2, 6, out, out)
        assert torch.allclose(y, ref(x), atol=1e-5)


def test_relative_bias_map_reads_key_minus_query_offsets(tmp_path):
    # window 2: bias[h, q, k] = table[h, k_y - q_y + 1, k_x - q_x + 1], written out by hand
    path = tmp_path / "rb.arch"
    path.write_text("model rb { input image(4, 2); stem attention(2, partition = window(2), "
                    "position = relative_bias_map) }")
    model = composer.build(str(path))
    attn = [m for m in model.modules() if hasattr(m, "relative_position_bias_table")][0]
    assert tuple(attn.relative_position_bias_table.shape) == (2, 3, 3)
    with torch.no_grad():
        attn.relative_position_bias_table.copy_(torch.arange(18.0).view(2, 3, 3))
    bias = attn.score_bias(Run(attn.grid, torch.zeros(1, 4, 4)))
    coords = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for h in range(2):
        for qi, (qy, qx) in enumerate(coords):
            for ki, (ky, kx) in enumerate(coords):
                assert bias[h, qi, ki].item() == h * 9 + (ky - qy + 1) * 3 + (kx - qx + 1)


GIVEN = {
    # the queries named (`q = NAME`), and the deprecated spelling: packed after the tokens' channels
    "named": " stage { block { q = { from query; tile(2) }\n   attention(2, partition = window(2), q = q) as attn } }\n",
    # one window's queries, shared by every window (no tile)
    "shared": " stage { block {\n   attention(2, partition = window(2), q = query) as attn } }\n",
    "packed": (" stage { block { parallel concat { identity; { from query; tile(2) } }\n"
               "   attention(2, partition = window(2), query = given) as attn } }\n"),
}


@pytest.mark.parametrize("spelling", ["named", "shared", "packed"])
def test_tile_and_input_query(tmp_path, spelling):
    path = tmp_path / "gq.arch"
    path.write_text("model gq {\n input image(8, 4)\n stem { pool(2); save query; from input }\n"
                    + GIVEN[spelling] + "}\n")
    if spelling == "packed":
        with pytest.warns(ComposerWarning, match="query = given"):
            plan = composer.load(str(path))
    else:
        plan = composer.load(str(path))
    assert plan.stages[0].y.channels == 8 and plan.params == 8 * 16 + 16 + 8 * 8 + 8  # kv and proj only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ComposerWarning)
        model = composer.build(str(path)).eval()
    attn = [m for m in model.modules() if hasattr(m, "qkv")][0]
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        y = model.forward_features(x)
        # by hand: every 2x2 window attends with the pooled map's 4 tokens as queries
        q = torch.nn.functional.avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (1, 4, 8)
        kv = attn.qkv(x.flatten(2).transpose(1, 2))  # (1, 16, 16), tokens row-major
        kv = kv.view(1, 2, 2, 2, 2, 16).permute(0, 1, 3, 2, 4, 5).reshape(4, 4, 16)  # windows
        k, v = kv[..., :8], kv[..., 8:]
        heads = lambda t: t.reshape(t.shape[0], 4, 2, 4).transpose(1, 2)
        a = torch.softmax(heads(q.expand(4, 4, 8)) @ heads(k).transpose(-1, -2) / 2.0, -1) @ heads(v)
        a = attn.proj(a.transpose(1, 2).reshape(4, 4, 8))
        a = a.view(1, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    if y.ndim == 3:  # tokens (B, N, C) -> map
        y = y.transpose(1, 2).reshape(a.shape)
    assert torch.allclose(y, a, atol=1e-5)


@pytest.mark.parametrize("body, message", [
    ("q = { from query; tile(2); linear(4) }\n attention(2, partition = window(2), q = q)",
     "the queries `q` must lie like the tokens"),
    ("q = { from query; tile(2) }\n attention(2, query = first(1), q = q)", "`q` gives the queries"),
    ("attention(2, partition = window(2), q = nothing)", "nothing"),
    ("attention(2, partition = window(2, shift = 1), q = query)", "cannot be shifted"),
])
def test_named_queries_errors_are_located(tmp_path, capsys, body, message):
    path = tmp_path / "gq.arch"
    path.write_text("model gq {\n input image(8, 4)\n stem { pool(2); save query; from input }\n"
                    f" stage {{ block {{ {body} }} }}\n}}\n")
    from composer.cli import main

    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and message in err, err
