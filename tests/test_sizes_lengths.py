"""1-D models at any length their strides allow (issue 13): the speech Conformer built for 1000
frames runs at other lengths. Its relative-position attention (Transformer-XL, `relative_xl`) makes
its sinusoidal table for the length it sees, as its references do (ESPnet's RelPositionalEncoding
`extend_pe`, sooftware/conformer's PositionalEncoding sliced to the length), and the front-end's
`rearrange`s solve their sizes for the input they get. ESPnet's formulas are written out here:
the table of offsets T-1 .. -(T-1) and the pad-reshape-slice `rel_shift`."""

from __future__ import annotations

import math

import pytest
import torch

import composer
from composer.layers.attention.positions import RelativeXL
from composer.ops import OPS
from composer.shapes import Shape
from composer.sizes import admits, replan, rule_text
from helpers import attention_piece

NAME = "conformer_speech_s"


def _espnet_pe(length: int, dim: int) -> torch.Tensor:
    """ESPnet's RelPositionalEncoding.extend_pe for `length` frames, the centre 2T-1 rows."""
    pe_positive, pe_negative = torch.zeros(length, dim), torch.zeros(length, dim)
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe_positive[:, 0::2] = torch.sin(position * div_term)
    pe_positive[:, 1::2] = torch.cos(position * div_term)
    pe_negative[:, 0::2] = torch.sin(-1 * position * div_term)
    pe_negative[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([torch.flip(pe_positive, [0]), pe_negative[1:]], 0)  # (2T-1, dim)


def _rel_shift(x: torch.Tensor) -> torch.Tensor:
    """ESPnet's RelPositionMultiHeadedAttention.rel_shift: (B, h, T, 2T-1) -> (B, h, T, T)."""
    zero_pad = torch.zeros((*x.size()[:3], 1), dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=-1).view(*x.size()[:2], x.size(3) + 1, x.size(2))
    return x_padded[:, :, 1:].view_as(x)[:, :, :, : x.size(-1) // 2 + 1]


def _espnet_attention(m, x: torch.Tensor) -> torch.Tensor:
    """Relative-position MHSA of ESPnet over (B, T, C), with the module's weights."""
    b, t, c = x.shape
    h, d = m.heads, m.head_dim
    q, k, v = (z.view(b, t, h, d) for z in m.qkv(x).split(c, dim=-1))
    p = m.linear_pos(_espnet_pe(t, c)).view(1, -1, h, d).transpose(1, 2)  # (1, h, 2T-1, d)
    ac = (q + m.pos_bias_u).transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)
    bd = _rel_shift((q + m.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1))
    attn = ((ac + bd) / math.sqrt(d)).softmax(-1)
    return m.proj((attn @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, c))


def test_conformer_runs_at_any_length_its_strides_allow():
    # `composer info`: "length: any size from 7" (two 3-wide stride-2 convs without padding)
    plan = composer.load(NAME)
    for frames in (7, 8, 513, 1000, 1237, 3000):
        assert admits(plan, (frames,)) is None
    assert "does not fit" in admits(plan, (6,))
    small = composer.load(NAME, img_size=64)
    assert rule_text(small) == "length: any size from 7"


@pytest.mark.parametrize("frames", [800, 1237])
def test_conformer_at_another_length_equals_espnet(frames):
    torch.manual_seed(0)
    model = composer.build(NAME, depth=2).eval()  # built for 1000 frames (249 steps after the front-end)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_bias" in name:  # away from their init, so that both terms count
                p.normal_()
    attn = model.get_submodule("stages.0.blocks.1.attn")
    seen = {}
    attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    x = torch.randn(2, 80, frames)
    with torch.no_grad():
        feats = model.forward_features(x)
        y = model(x)
    other = replan(composer.load(NAME, depth=2), (frames,))
    steps = other.stages[-1].y.spatial[0]
    assert steps == ((frames - 3) // 2 + 1 - 3) // 2 + 1
    assert tuple(feats.shape) == (2, 144, steps) and tuple(y.shape) == (2, 144)
    assert seen["x"].shape == (2, steps, 144)
    with torch.no_grad():
        torch.testing.assert_close(seen["out"], _espnet_attention(attn, seen["x"]), atol=1e-5, rtol=1e-4)


def test_relative_xl_table_follows_the_length_and_keeps_the_build_one():
    op = OPS["attention"](heads=2, position=OPS["relative_xl"]())
    x = Shape(8, (5,), "tokens")
    m = op.build(x, op.infer(x)).eval()
    xl = attention_piece(m, RelativeXL)
    table, index = xl.tables_for(m, 5)
    assert table is m.pos_table and index is m.pos_index
    for t in (3, 9):
        table, index = xl.tables_for(m, t)
        torch.testing.assert_close(table, _espnet_pe(t, 8), atol=1e-6, rtol=0)
        # query i, key j reads the row of offset i - j (row T-1-(i-j)), as rel_shift does
        rows = torch.arange(2 * t - 1, dtype=torch.float32).expand(1, 1, t, -1)
        assert torch.equal(index.float()[None, None], _rel_shift(rows))
        tokens = torch.randn(2, t, 8)
        with torch.no_grad():
            torch.testing.assert_close(m(tokens, (t,)), _espnet_attention(m, tokens), atol=1e-5, rtol=1e-4)


def test_rearrange_solves_its_sizes_at_run_time():
    op = OPS["rearrange"](pattern="c (n p) v -> (c p) n v", sizes=[["p", 4]])
    x = Shape(3, (8, 5), "map")
    m = op.build(x, op.infer(x))
    for spatial in ((8, 5), (12, 7)):
        t = torch.randn(2, 3, *spatial)
        n, v = spatial[0] // 4, spatial[1]
        expected = t.reshape(2, 3, n, 4, v).permute(0, 1, 3, 2, 4).reshape(2, 12, n, v)
        assert torch.equal(m(t), expected)
        assert tuple(m(t).shape[1:]) == (op.infer(Shape(3, spatial, "map")).channels, n, v)
