"""Token mixers written with the attention primitives (issue 14): each composite of
blueprints/lib/token_mixers.arch against timm's module with the same weights, or against the
paper's equation written out here; named tensors (`q = ...`, `q, k, v = split_heads(h)`, tensor
arguments) with their errors; the attention chain run as one SDPA call."""

from __future__ import annotations

import functools

import pytest
import torch
from timm.models.cait import TalkingHeadAttn
from timm.models.vision_transformer import Attention
from timm.models.xcit import XCA

import composer
from composer.diagnostics import ComposerError
from composer.program import Attend, TensorCall
from tests.helpers import split_heads, write

DIM, GRID = 32, (4, 6)


def mixer(tmp_path, call: str, dim: int = DIM, extra: str = ""):
    """The module of `call` (a composite of lib/token_mixers), built in a one-block model whose
    tokens lie on a 4x6 grid, and the model."""
    text = f"""import "lib/token_mixers"
{extra}
model m {{
    input image(3, [{8 * GRID[0]}, {8 * GRID[1]}])
    stem patch_embed({dim}, 8)
    stage {{ block {{ to_tokens; {call} as attn }} }}
    head {{ global_pool("avg"); classifier(10) }}
}}
"""
    model = composer.build(write(tmp_path, text)).eval()
    return dict(model.named_modules())["stages.0.blocks.0.attn"], model


def run(module, x):
    with torch.no_grad():
        return module(x, {" grid": torch.Size(GRID)})


def copy_linear(dst, src):
    with torch.no_grad():
        dst.weight.copy_(src.weight.reshape(dst.weight.shape))
        if src.bias is not None:
            dst.bias.copy_(src.bias)


def tokens(n: int = 2):
    return torch.randn(n, GRID[0] * GRID[1], DIM, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_multi_head_attention_equals_timm(tmp_path, qk_norm):
    call = "multi_head_attention(32, 4, qk_norm = layernorm(1e-6))" if qk_norm else "multi_head_attention(32, 4)"
    ours, _ = mixer(tmp_path, call)
    ref = Attention(DIM, num_heads=4, qkv_bias=True, qk_norm=qk_norm,
                    norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    copy_linear(ref.qkv, ours.qkv)
    copy_linear(ref.proj, ours.proj)
    if qk_norm:
        with torch.no_grad():
            for name in ("q_norm", "k_norm"):
                getattr(ours, name).weight.normal_()
                getattr(ours, name).bias.normal_()
                getattr(ref, name).load_state_dict(getattr(ours, name).state_dict())
    x = tokens()
    with torch.no_grad():
        expected = ref(x)
    assert (run(ours, x) - expected).abs().max() < 1e-5
    # the chain scores -> softmax -> dropout -> weighted_sum runs as one SDPA call
    assert any(ins.__class__ is Attend for ins in ours.program)


def test_chain_runs_as_written_when_not_attention(tmp_path):
    """Talking heads puts a linear across heads between scores and softmax: no SDPA, the chain as
    written; equal to timm's TalkingHeadAttn (CaiT)."""
    ours, _ = mixer(tmp_path, "talking_heads_attention(32, 4)")
    assert not any(ins.__class__ is Attend for ins in ours.program)
    ref = TalkingHeadAttn(DIM, num_heads=4, qkv_bias=False).eval()
    copy_linear(ref.qkv, ours.qkv)
    copy_linear(ref.proj, ours.proj)
    with torch.no_grad():
        for name in ("proj_l", "proj_w"):
            getattr(ref, name).weight.copy_(getattr(ours, name).weight)
            getattr(ref, name).bias.copy_(getattr(ours, name).bias)
    x = tokens()
    with torch.no_grad():
        expected = ref(x)
    assert (run(ours, x) - expected).abs().max() < 1e-5


def test_channel_attention_equals_timm_xca(tmp_path):
    ours, _ = mixer(tmp_path, "channel_attention(32, 4)")
    ref = XCA(DIM, num_heads=4, qkv_bias=True).eval()
    copy_linear(ref.qkv, ours.qkv)
    copy_linear(ref.proj, ours.proj)
    with torch.no_grad():
        ours.temperature.scale.copy_(torch.rand(4, 1, 1) + 0.5)
        ref.temperature.copy_(ours.temperature.scale)
    x = tokens()
    with torch.no_grad():
        expected = ref(x)
    assert (run(ours, x) - expected).abs().max() < 1e-5


def _qkv(module, x, heads):
    qkv = module.qkv(x)
    return [split_heads(t, heads) for t in qkv.chunk(3, dim=-1)]


def _merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def test_kernel_attention_equation(tmp_path):
    """Katharopoulos et al., eq. 4-6 with φ = relu: V'_i = φ(Q_i)ᵀ Σ_j φ(K_j) V_jᵀ / (φ(Q_i)ᵀ Σ_j φ(K_j) + eps)."""
    ours, _ = mixer(tmp_path, "kernel_attention(32, 4, eps = 1e-6)")
    x = tokens()
    with torch.no_grad():
        q, k, v = _qkv(ours, x, 4)
        q, k = q.relu(), k.relu()
        kv = k.transpose(-2, -1) @ v  # the linear-time order of the same sums
        den = q @ k.sum(2, keepdim=True).transpose(-2, -1)
        expected = ours.proj(_merge((q @ kv) / (den + 1e-6)))
    assert (run(ours, x) - expected).abs().max() < 1e-5


def test_grouped_query_attention_equation(tmp_path):
    """Ainslie et al.: query head h uses key/value head h // (heads / kv_heads)."""
    ours, _ = mixer(tmp_path, "grouped_query_attention(32, 4, kv_heads = 2)")
    x = tokens()
    with torch.no_grad():
        q = split_heads(ours.q(x), 4)
        k, v = (split_heads(t, 2) for t in ours.kv(x).chunk(2, dim=-1))
        k, v = k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]]
        a = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
        expected = ours.proj(_merge(a @ v))
    assert ours.kv.weight.shape == (2 * 2 * 8, DIM)
    assert (run(ours, x) - expected).abs().max() < 1e-5


def test_qv_bias_attention_equation(tmp_path):
    """BEiT's projection: qkv = x W + [q_bias, 0, v_bias]."""
    ours, _ = mixer(tmp_path, "qv_bias_attention(32, 4)")
    with torch.no_grad():
        ours.q_bias.bias.normal_()
        ours.v_bias.bias.normal_()
    x = tokens()
    with torch.no_grad():
        bias = torch.cat([ours.q_bias.bias, torch.zeros(DIM), ours.v_bias.bias])
        q, k, v = (split_heads(t, 4) for t in torch.nn.functional.linear(x, ours.qkv.weight, bias).chunk(3, -1))
        a = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
        expected = ours.proj(_merge(a @ v))
    assert (run(ours, x) - expected).abs().max() < 1e-5


def test_head_order_and_unequal_widths(tmp_path):
    """`order = "heads"` with widths [2, 2, 4] per head: the channels are [q k v of head 0 | ...]
    (LeViT's layout); q and k narrower than v."""
    extra = """mixer narrow_qk(dim, heads) {
    linear(heads * 8, bias = false) as qkv
    q, k, v = split_heads(heads, widths = [2, 2, 4], order = "heads")
    scores(q, k, scale = 0.25)
    softmax
    weighted_sum(v)
    merge_heads
}"""
    ours, model = mixer(tmp_path, "narrow_qk(32, 4)", extra=extra)
    x = tokens()
    with torch.no_grad():
        per_head = ours.qkv(x).reshape(2, 24, 4, 8).transpose(1, 2)
        q, k, v = per_head.split([2, 2, 4], dim=-1)
        expected = _merge(((q @ k.transpose(-2, -1)) * 0.25).softmax(-1) @ v)
    assert (run(ours, x) - expected).abs().max() < 1e-6


def test_runs_at_other_sizes(tmp_path):
    _, model = mixer(tmp_path, "multi_head_attention(32, 4)")
    for size in ((32, 48), (64, 40)):
        assert model(torch.randn(1, 3, *size)).shape == (1, 10)


def _error(tmp_path, body: str) -> str:
    text = f"""mixer bad(dim) {{
{body}
}}
model m {{
    input image(3, 32)
    stem patch_embed(32, 8)
    stage {{ block bad(32) }}
    head {{ global_pool("avg"); classifier(10) }}
}}
"""
    with pytest.raises(ComposerError) as info:
        composer.check(write(tmp_path, text))
    return info.value.render()


@pytest.mark.parametrize("body, message, where", [
    ("    linear(96)\n    q, k, v = split_heads(4)\n    scores(q, kk)", "unknown name 'kk'", "3:15"),
    ("    q, k = linear(32)", "2 names are bound, but op 'linear' gives one tensor", "1:12"),
    ("    q, k = { relu }", "a body gives one tensor", "1:5"),
    ("    linear(96)\n    q, k, v = split_heads(4)\n    scores(q, 3)", "'scores' argument 'k' must be a tensor", "3:15"),
    ("    q = linear(64)\n    k = linear(32)\n    q = { from q; split_heads(4) }\n    k = { from k; split_heads(4) }\n"
     "    scores(q, k)", "queries of width 16 and keys of width 8", "5:5"),
    ("    let k = 3\n    k = linear(32)", "'k' is already a value here (int), not a tensor", "2:5"),
    ("    linear(96)\n    q, k, v = split_heads(4)\n    from q\n    conv(8, 3)", "merge the heads first", "4:5"),
])
def test_named_tensor_errors_are_located(tmp_path, body, message, where):
    text = _error(tmp_path, body)
    assert message in text, text
    if where is not None:
        line, col = where.split(":")
        assert f"m.arch:{int(line) + 1}:{col}:" in text, text


def test_dynamic_relu_takes_its_coefficients_by_name():
    """Mobile-Former's DyReLU with the coefficients as a named tensor (issue 14 item 1):
    a1 = (c1 - 0.5) * 2 + 1, a2 = (c2 - 0.5) * 2, y = max(x a1, x a2)."""
    from composer.ops import OPS
    from composer.shapes import Shape, TensorRef

    coeffs = TensorRef("c", "c", None, Shape(6, (2,), "tokens"))
    op = OPS["dynamic_relu"](pieces=2, scale=2.0, coeffs=coeffs)
    x = Shape(6, (3, 4), "tokens")
    assert op.infer(x) == x and op.deprecation() is None
    m = op.build(x, x)
    coef, feat = torch.rand(2, 2, 6), torch.randn(2, 12, 6)
    a1, a2 = (coef[:, :1] - 0.5) * 2 + 1, (coef[:, 1:] - 0.5) * 2
    torch.testing.assert_close(m(feat, coef), torch.maximum(feat * a1, feat * a2))
    bad = OPS["dynamic_relu"](pieces=3, coeffs=coeffs)
    with pytest.raises(Exception, match="3 tokens of 6 channels"):
        bad.infer(x)


def test_old_spellings_warn_and_keep_working(tmp_path):
    """`attend` with keys and values packed as prefix tokens still builds, with a located warning
    that names the new spelling; the same attention written with named tensors, same weights,
    gives the same output."""
    text = """
mixer packed(dim) {
    parallel tokens { linear(dim) as k; linear(dim) as v; identity }
    attend(2, values = "split")
}
mixer named(dim) {
    k = { linear(dim) as k; split_heads(2) }
    v = { linear(dim) as v; split_heads(2) }
    split_heads(2)
    scores(k = k)
    softmax
    weighted_sum(v)
    merge_heads
}
model m(mixer = packed(16)) {
    input image(3, 16)
    stem patch_embed(16, 4)
    stage { block { to_tokens; mixer as mix } }
    head { global_pool("avg"); classifier(4) }
}
model m2 : m { mixer = named(16) }
"""
    path = write(tmp_path, text)
    with pytest.warns(composer.ComposerWarning) as caught:
        old = composer.build(path + ":m").eval()
    message = str(caught[0].message)
    assert "m.arch:4:5: warning: attend, which reads its keys and values from prefix tokens" in message
    assert "scores(q, k), softmax, weighted_sum(v)" in message
    new = composer.build(path + ":m2").eval()
    assert list(new.state_dict()) == list(old.state_dict())
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (new(x) - old(x)).abs().max() < 1e-5


def test_conv_projection_attention_equation(tmp_path):
    """CvT's convolutional projections (Wu et al., eq. 2): q = W_q BN(DWConv(x)), k and v the same
    with stride 2, on the token grid."""
    ours, _ = mixer(tmp_path, "conv_projection_attention(32, 4, kv_stride = 2)")
    with torch.no_grad():
        for name in ("bn_q", "bn_k", "bn_v"):
            bn = getattr(ours, name)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.normal_()
            bn.bias.normal_()
    x = tokens()
    grid = x.transpose(1, 2).reshape(2, DIM, *GRID)
    with torch.no_grad():
        def proj(which, stride):
            conv, bn, lin = (getattr(ours, f"{p}_{which}") for p in ("conv", "bn", "proj"))
            m = bn(torch.nn.functional.conv2d(grid, conv.weight, stride=stride, padding=1, groups=DIM))
            return split_heads(lin(m).flatten(2).transpose(1, 2), 4)  # the linear acts on the map's channels
        q, k, v = proj("q", 1), proj("k", 2), proj("v", 2)
        assert k.shape[2] == 2 * 3  # the keys lie on the 2x3 grid
        a = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1)
        expected = ours.proj(_merge(a @ v))
    assert (run(ours, x) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("window", [None, 2])
def test_distance_bias_equation(tmp_path, window):
    """LeViT's attention bias: B[h, i, j] = t[h, |y_i - y_j| * W + |x_i - x_j|] over the whole grid,
    or inside each window (W the window's width); zero-initialised."""
    call = "distance_bias_attention(32, 4)" if window is None else f"distance_bias_attention(32, 4, window = {window})"
    ours, _ = mixer(tmp_path, call, extra='import "lib/position_mixers"')
    assert not ours.bias.attention_biases.any()
    with torch.no_grad():
        ours.bias.attention_biases.normal_()
    x = tokens()
    gh, gw = GRID if window is None else (window, window)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    index = (ys[:, None] - ys[None, :]).abs() * gw + (xs[:, None] - xs[None, :]).abs()
    bias = ours.bias.attention_biases[:, index]  # (heads, n, n)
    with torch.no_grad():
        t = x if window is None else (  # (B * windows, window^2, C), windows row-major
            x.reshape(2, GRID[0] // 2, 2, GRID[1] // 2, 2, DIM).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, DIM))
        q, k, v = _qkv(ours, t, 4)
        out = ours.proj(_merge((q @ k.transpose(-2, -1) * 8 ** -0.5 + bias).softmax(-1) @ v))
        if window is not None:
            out = out.reshape(2, GRID[0] // 2, GRID[1] // 2, 2, 2, DIM).permute(0, 1, 3, 2, 4, 5).reshape(2, -1, DIM)
    assert (run(ours, x) - out).abs().max() < 1e-5
