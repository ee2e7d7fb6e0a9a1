"""Zoo II 1-D rows: Conformer for speech (MODELS.md row 30) and Pathformer (row 31), and the
`top_k_mixture` routing op that Pathformer's adaptive pathways use.

The expected counts are those of shared/MODELS.md (the reference code run unmodified:
sooftware/conformer's encoder, decisionintelligence/pathformer's ETTh1 script), re-derived here by
hand module by module; where our blueprint is a closest form, the test pins our count as the
official figure minus / plus the hand-counted parameters of each difference.
"""

from __future__ import annotations

import math

import pytest
import torch

import composer
from composer.ops import OPS
from composer.shapes import Shape
from helpers import n_params


def _linear(i, o, bias=True):
    return i * o + (o if bias else 0)


def _conformer_encoder(d, layers, mels=80, kernel=31, ratio=4):
    """sooftware/conformer's ConformerEncoder, counted by hand: Conv2dSubampling (two 3x3 s2 convs
    with bias), input projection Linear(d * F', d); per block two FFN modules (LN, Linear(d, 4d),
    Linear(4d, d)), the rel-pos MHSA module (LN, q/k/v/out linears with bias, pos_proj without,
    u/v biases (h, d/h) = d each), the conv module (LN, pointwise d -> 2d with bias, depthwise
    kernel without bias, BN, pointwise d -> d with bias) and the block's final LN."""
    freq = ((mels - 1) // 2 - 1) // 2
    front = (9 * d + d) + (9 * d * d + d) + _linear(d * freq, d)
    ln = 2 * d
    ffn = ln + _linear(d, ratio * d) + _linear(ratio * d, d)
    mhsa = ln + 4 * _linear(d, d) + _linear(d, d, bias=False) + 2 * d
    conv = ln + _linear(d, 2 * d) + d * kernel + 2 * d + _linear(d, d)
    return front + layers * (2 * ffn + mhsa + conv + ln)


def test_conformer_hand_count_is_the_table():
    assert _conformer_encoder(144, 16) == 8_687_808  # MODELS.md row 30


@pytest.mark.parametrize("name, d, layers", [
    ("conformer_speech_s", 144, 16),   # row 30: 8,687,808, exact
    ("conformer_speech_m", 256, 16),
    ("conformer_speech_l", 512, 17),
])
def test_conformer_params(name, d, layers):
    plan = composer.load(name)
    assert plan.params == _conformer_encoder(d, layers)


def test_conformer_builds_and_runs():
    model = composer.build("conformer_speech_s", img_size=200).eval()
    assert n_params(model) == 8_687_808
    keys = set(model.state_dict())
    assert "stages.0.blocks.0.attn.pos_bias_u" in keys and "stages.0.blocks.0.attn.linear_pos.weight" in keys
    assert model.stem.input_projection.weight.shape == (144, 144 * 19)  # Linear(d * 19, d), (channel, freq) order
    x = torch.randn(2, 80, 200)  # (B, 80 mels, T frames)
    with torch.no_grad():
        y = model.forward_features(x)
        # the front-end by hand: frames as a one-channel image, two convs, (channel, freq) flattened
        stem = model.stem
        g = stem.act2(stem.conv2(stem.act1(stem.conv1(x.transpose(1, 2)[:, None]))))    # (2, 144, 49, 19)
        want = torch.nn.functional.linear(g.permute(0, 2, 1, 3).reshape(2, 49, 144 * 19),
                                          stem.input_projection.weight, stem.input_projection.bias)
        got = stem.eval()(x)                                                               # (2, 144, 49)
    torch.testing.assert_close(got.transpose(1, 2), want)
    frames = ((200 - 1) // 2 - 1) // 2  # conv subsampling x4: 49 frames
    assert y.shape[0] == 2 and y.numel() == 2 * frames * 144
    assert torch.isfinite(y).all()
    assert model(x).shape == (2, 144)  # num_classes = 0: the features pooled over time


# ----------------------------------------------------------------------------- Pathformer

ETTH1_PATCHES = [[16, 12, 8, 32], [12, 8, 6, 4], [8, 6, 4, 2]]
L, N, D, DFF, PRED = 96, 7, 4, 64, 96


def _pathformer_official():
    """decisionintelligence/pathformer, ETTh1 script, counted by hand (sum of numel, as measured)."""
    total = _linear(1, D) + _linear(L * D, PRED)                    # start_fc, projections
    for patches in ETTH1_PATCHES:
        total += _linear(N, 1) + _linear(1, 3)                       # router: start_linear, trend weights
        total += 2 * _linear(L, 4) + (L * L + L)                     # w_gate, w_noise, end_MLP (unused)
        for p in patches:
            pn, dp = L // p, D * p
            total += pn * N * 16 + pn * _linear(16, D)               # intra queries and their embedders
            total += N * 16 + _linear(16, 64) + _linear(64, 64) + _linear(64, 100) \
                + 2 * (D * 10 + 10 * D + 100 * D)                    # distinct WeightGenerator (factorized)
            total += 2 * (D * D + D)                                 # shared WeightGenerator
            total += _linear(pn, pn * p)                             # intra_Linear
            total += _linear(dp, dp) + pn * dp                       # emb_linear, W_pos
            total += 4 * _linear(dp, dp) + 1                         # W_Q, W_K, W_V, to_out, frozen scale
            total += 2 * 2 * D                                       # norm_attn, norm_ffn (unused)
            total += _linear(D, DFF) + _linear(DFF, D)               # ff
    return total


def test_pathformer_hand_count_is_the_table():
    assert _pathformer_official() == 438_482  # MODELS.md row 31


def test_pathformer_params():
    plan = composer.load("pathformer_etth1")
    assert plan.params == _pathformer_official() == 438_482  # exact: RevIN (affine = false) has no parameters


def _official_expert(e, x, patch):
    """decisionintelligence/pathformer's Transformer_Layer.forward (batch_norm = 0, eval), written out
    from layers/Layer.py with our expert's parameters: x (B, L, N, D) -> (B, L, N, D)."""
    b, length, n, d = x.shape
    pn = length // patch
    intra, inter = e.intra, e.inter
    emb = intra.intra_embeddings.tokens.view(pn, n, 16)                 # intra_embeddings (P, 1, 1, N, 16)
    gen = intra.embeddings_generator                                     # P Linear(16, D): weight (P, 16, D)
    w, bias = intra.weights_generator_distinct.weights()                # (N, D, 2D): K then V, per variable
    hs = d // 2                                                          # Intra_Patch_Attention: 2 heads
    outs = []
    for i in range(pn):
        q = (emb[i] @ gen.weight[i] + gen.bias[i]).expand(b, 1, n, d)   # (B, 1, N, D)
        t = torch.cat([q, x[:, i * patch:(i + 1) * patch]], 1)          # (B, p + 1, N, D)
        k = torch.einsum("bjnc,nco->bjno", t, w[..., :d]) + bias[:, :d]
        v = torch.einsum("bjnc,nco->bjno", t, w[..., d:]) + bias[:, d:]
        heads = []
        for h in range(2):
            sl = slice(h * hs, (h + 1) * hs)
            att = torch.softmax(torch.einsum("bnc,bjnc->bnj", q[:, 0, :, sl], k[..., sl]) / hs ** 0.5, -1)
            heads.append(torch.einsum("bnj,bjnc->bnc", att, v[..., sl]))
        o = torch.cat(heads, -1)[:, None]                                # (B, 1, N, D)
        o = torch.relu(o @ intra.shared1.weight.T + intra.shared1.bias) @ intra.shared2.weight.T + intra.shared2.bias
        outs.append(o)
    intra_out = torch.einsum("bpnd,lp->blnd", torch.cat(outs, 1), intra.intra_Linear.weight) \
        + intra.intra_Linear.bias[None, :, None, None]
    u = x.unfold(1, patch, patch).permute(0, 2, 1, 3, 4).reshape(b * n, pn, d * patch)  # (B N, P, D p)
    u = u @ inter.emb_linear.weight.T + inter.emb_linear.bias + inter.W_pos.pos[0]
    qkv = u @ inter.attn.qkv.weight.T + inter.attn.qkv.bias
    q, k, v = (z.view(b * n, pn, d, patch).transpose(1, 2) for z in qkv.split(d * patch, -1))  # D heads of p
    att = torch.softmax(q @ k.transpose(-1, -2) * patch ** -0.5, -1)
    o = (att @ v).transpose(1, 2).reshape(b * n, pn, d * patch) @ inter.attn.proj.weight.T + inter.attn.proj.bias
    inter_out = o.reshape(b, n, pn, patch, d).reshape(b, length, n, d)  # the raw reshape of the reference
    out = x + intra_out + inter_out
    return out + (torch.nn.functional.gelu(out @ e.fc1.weight.T + e.fc1.bias) @ e.fc2.weight.T + e.fc2.bias)


def test_pathformer_expert_matches_the_reference_forward():
    torch.manual_seed(0)
    model = composer.build("pathformer_etth1").eval()
    block = model.stages[0].blocks[0]
    x = torch.randn(2, L, N, D)
    with torch.no_grad():
        for i, patch in enumerate(ETTH1_PATCHES[0]):
            e = getattr(block, f"expert{i}")
            got = e(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)       # our (B, D, L, N) map
            torch.testing.assert_close(got, _official_expert(e, x, patch), atol=1e-4, rtol=1e-4)


def _moving_average(x, k):
    """decisionintelligence/pathformer's moving_avg (utils/Other.py) along dim 1 of (B, L, N): the
    first value repeated k - 1 - (k - 1) // 2 times in front, the last (k - 1) // 2 times at the end,
    then the mean of every window of k steps (written as a loop over the windows)."""
    front, end = k - 1 - (k - 1) // 2, (k - 1) // 2
    p = torch.cat([x[:, :1].expand(-1, front, -1), x, x[:, -1:].expand(-1, end, -1)], 1)
    return torch.stack([p[:, t:t + k].mean(1) for t in range(x.shape[1])], 1)


def _top_k_season(x, k=3):
    """FourierLayer(pred_len = 0, k) along dim 1 of (B, T, N): the rFFT without the DC bin and (T even)
    the Nyquist bin, the k largest |X_f| per series, and sum over them and their conjugates of
    |X_f| / T cos(2 pi f t / T +- angle(X_f)) = 2 |X_f| / T cos(2 pi f t / T + angle(X_f))."""
    t = x.shape[1]
    spectrum = torch.fft.rfft(x, dim=1)
    band = spectrum[:, 1:t // 2] if t % 2 == 0 else spectrum[:, 1:t // 2 + 1]
    f = band.abs().topk(k, dim=1).indices + 1                               # (B, k, N) bin numbers
    xf = spectrum.gather(1, f)[:, None]                                     # (B, 1, k, N)
    steps = torch.arange(t, dtype=torch.float)[None, :, None, None]        # (1, T, 1, 1)
    return (2 * xf.abs() / t * torch.cos(2 * math.pi * f[:, None] / t * steps + xf.angle())).sum(2)


def _official_gate_logits(router, x):
    """AMS.seasonality_and_trend_decompose + noisy_top_k_gating's clean logits (layers/AMS.py), with our
    router's parameters: x (B, L, N, D) -> (B, E)."""
    x0 = x[..., 0]                                                          # (B, L, N)
    layer = router.trend_model.layer                                        # series_decomp_multi's Linear(1, 3)
    w = torch.softmax(x0[..., None] * layer.weight[:, 0] + layer.bias, -1)  # (B, L, N, 3), per element
    trend = sum(w[..., i] * _moving_average(x0, kernel) for i, kernel in enumerate((4, 8, 12)))
    new_x = x0 + _top_k_season(x0) + trend
    s = new_x @ router.start_linear.weight.reshape(N) + router.start_linear.bias   # start_linear: (B, L)
    gate = router.gate.weight.reshape(-1, L)                                # [w_gate; w_noise]
    return s @ gate[:4].T + router.gate.bias[:4]


def test_pathformer_router_trend_and_season_match_the_reference():
    torch.manual_seed(0)
    model = composer.build("pathformer_etth1").eval()
    router = model.stages[0].blocks[0].router
    x = torch.randn(2, L, N, D) + torch.sin(torch.arange(L) / 3.0)[None, :, None, None]
    with torch.no_grad():
        got = router(x.permute(0, 3, 1, 2))                                 # (B, 2E, L, N), broadcast
        torch.testing.assert_close(got[:, :4, 0, 0], _official_gate_logits(router, x), atol=1e-4, rtol=1e-4)
        assert (got == got[:, :, :1, :1]).all()


def _official_forward(model, x):
    """decisionintelligence/pathformer's Model.forward (revin = 1 with affine = false, eval), written out
    from models/PathFormer.py, layers/RevIN.py and layers/AMS.py with our model's parameters:
    x (B, L, N) -> (B, pred, N)."""
    b = x.shape[0]
    mean = x.mean(1, keepdim=True)                                          # RevIN: per variable over time
    std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5)
    fc = model.stem.start_fc
    out = ((x - mean) / std)[..., None] * fc.weight[:, 0] + fc.bias         # start_fc: (B, L, N, D)
    for j, block in enumerate(model.stages[0].blocks):
        logits = _official_gate_logits(block.router, out)
        top = logits.topk(3, dim=1)
        gates = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, 1))
        mixed = sum(gates[:, i, None, None, None] * _official_expert(getattr(block, f"expert{i}"), out, p).exp()
                    for i, p in enumerate(ETTH1_PATCHES[j]))                 # SparseDispatcher.combine
        out = mixed.log() + out                                             # residual_connection = 1
    proj = model.head.projections
    y = (out.permute(0, 2, 1, 3).reshape(b, N, L * D) @ proj.weight.T + proj.bias).transpose(1, 2)
    return y * std + mean                                                   # RevIN denorm


def test_pathformer_forward_matches_the_reference():
    torch.manual_seed(0)
    model = composer.build("pathformer_etth1").eval()
    with torch.no_grad():  # sharper gates, more distinct experts: the routing (trend, season) shows in the forecast
        for block in model.stages[0].blocks:
            block.router.gate.weight.mul_(10)
            for i in range(4):
                getattr(block, f"expert{i}").fc2.weight.mul_(10)
    x = 3 * torch.randn(2, L, N) + 5 + torch.cos(torch.arange(L) / 4.0)[None, :, None]   # official (B, L, N)
    with torch.no_grad():
        got = model(x.transpose(1, 2))                                      # ours: signal (B, N, L)
        want = _official_forward(model, x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert got.mean().item() == pytest.approx(5, abs=1)                   # de-normalised: back at the input's level


def test_pathformer_builds_routes_and_runs():
    model = composer.build("pathformer_etth1")
    assert n_params(model) == 438_482
    keys = set(model.state_dict())
    assert {"stages.0.blocks.0.end_MLP.op.weight", "stages.0.blocks.2.expert3.intra.weights_generator_distinct.P",
            "stages.0.blocks.1.expert0.inter.W_pos.pos", "stages.0.blocks.0.router.start_linear.weight"} <= keys
    x = torch.randn(3, N, L)                                              # signal(7, 96): (B, N, L)
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, PRED, N)                                        # the forecast, (B, pred, N)
    mixtures = [m for m in model.modules() if type(m).__name__ == "TopKMixture"]
    assert len(mixtures) == 3
    for m in mixtures:  # eval: exactly k = 3 of 4 experts per sample, weights summing to 1
        assert ((m.last_gates > 0).sum(1) == 3).all()
        assert torch.allclose(m.last_gates.sum(1), torch.ones(3))
    model.train()
    y = model(torch.randn(4, N, L))
    loss = y.pow(2).mean() + sum(m.balance_loss for m in mixtures)
    loss.backward()
    assert all(torch.isfinite(m.balance_loss) for m in mixtures)


# ----------------------------------------------------------------------------- top_k_mixture

def _mixture(**kw):
    op = OPS["top_k_mixture"](**kw)
    return op


def test_top_k_mixture_eval_matches_the_formula():
    torch.manual_seed(0)
    e, c, k = 4, 3, 2
    logits = torch.randn(5, e)
    experts = torch.randn(5, e, c, 6)
    router = logits[:, :, None].expand(5, e, 6)               # broadcast over a 1-D grid of 6
    noise = torch.randn(5, e, 6)
    x = torch.cat([router, noise, experts.flatten(1, 2)], 1)  # (5, 2E + E*C, 6)
    for combine in ("sum", "log_exp"):
        op = _mixture(experts=e, k=k, noisy=True, combine=combine)
        y_shape = op.infer(Shape(x.shape[1], (6,)))
        assert (y_shape.channels, y_shape.spatial) == (c, (6,))
        module = op.build(Shape(x.shape[1], (6,)), y_shape).eval()
        y = module(x)
        want = torch.empty(5, c, 6)
        for b in range(5):  # by hand: softmax over the k largest logits, the rest 0
            order = sorted(range(e), key=lambda i: -logits[b, i].item())[:k]
            z = [math.exp(logits[b, i].item()) for i in order]
            g = {i: zi / sum(z) for i, zi in zip(order, z)}
            if combine == "sum":
                want[b] = sum(g[i] * experts[b, i] for i in order)
            else:
                want[b] = torch.log(sum(g[i] * experts[b, i].exp() for i in order))
        assert torch.allclose(y, want, atol=1e-5)


def test_top_k_mixture_tokens_and_balance_loss():
    torch.manual_seed(1)
    e, c = 3, 4
    op = _mixture(experts=e, k=1, noisy=False)
    x = Shape(e + e * c, (2, 2), "tokens")
    module = op.build(x, op.infer(x)).train()
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    experts = torch.randn(4, 4, e, c)                               # (B, N, E, C)
    inp = torch.cat([logits[:, None, :].expand(4, 4, e), experts.flatten(2)], -1)
    y = module(inp)
    assert y.shape == (4, 4, c)
    for b, i in enumerate([0, 1, 1, 2]):                           # k = 1: the chosen expert, weight 1
        assert torch.allclose(y[b], experts[b, :, i])
    # importance = load = [1, 2, 1]: cv^2 = var / mean^2 = (1/3) / (4/3)^2 = 3/16, twice, times 0.01
    assert module.balance_loss.item() == pytest.approx(0.01 * 2 * 3 / 16, rel=1e-5)


def test_top_k_mixture_rejects_wrong_channels():
    from composer.shapes import ShapeError

    with pytest.raises(ShapeError, match="router channels"):
        _mixture(experts=4, k=2).infer(Shape(8 + 4 * 3 + 1, (5,)))
    with pytest.raises(ShapeError, match="k must be"):
        _mixture(experts=2, k=3).infer(Shape(2 + 2 * 3, (5,)))
