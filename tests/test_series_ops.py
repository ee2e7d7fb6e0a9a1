"""The time-series ops of composer/ops/series.py against formulas written out here: the multi-scale
moving-average trend (`series_decomposition`), the top-k Fourier season (`fourier_season`), and the
reversible instance normalisation (`instancenorm` + `moments` + `destandardize`, RevIN)."""

from __future__ import annotations

import math

import pytest
import torch

import composer
from composer.ops import OPS
from composer.shapes import Shape, ShapeError


def _module(name, x: Shape, **kw):
    op = OPS[name](**kw)
    return op, op.build(x, op.infer(x)).eval()


def _edge_average(s, k):
    """A 1-D series s (T,): the first value k - 1 - (k - 1) // 2 times in front, the last (k - 1) // 2
    times at the end, the mean of every window of k."""
    p = [s[0].item()] * (k - 1 - (k - 1) // 2) + s.tolist() + [s[-1].item()] * ((k - 1) // 2)
    return torch.tensor([sum(p[t:t + k]) / k for t in range(len(s))])


def test_series_decomposition_single_kernel_is_the_edge_padded_average():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9)
    for k in (1, 2, 4, 5):
        op, m = _module("series_decomposition", Shape(3, (9,)), kernels=[k])
        assert op.params(Shape(3, (9,)), Shape(3, (9,))) == 0 and not list(m.parameters())
        want = torch.stack([torch.stack([_edge_average(x[b, c], k) for c in range(3)]) for b in range(2)])
        torch.testing.assert_close(m(x), want)
    _, m = _module("series_decomposition", Shape(3, (9,)), kernels=[5], output="residual")
    torch.testing.assert_close(m(x), x - want)  # the seasonal part, x minus the trend


def test_series_decomposition_mixes_kernels_by_a_softmax_of_each_value():
    torch.manual_seed(1)
    x = torch.randn(2, 2, 5, 10)                                      # axis 1: the 10-step axis
    op, m = _module("series_decomposition", Shape(2, (5, 10)), kernels=[4, 8, 12], axis=1)
    assert op.params(Shape(2, (5, 10)), Shape(2, (5, 10))) == 6 == sum(p.numel() for p in m.parameters())
    w, b = m.layer.weight[:, 0], m.layer.bias
    want = torch.empty_like(x)
    for i in range(2):
        for c in range(2):
            for r in range(5):
                s = x[i, c, r]
                avgs = torch.stack([_edge_average(s, k) for k in (4, 8, 12)], -1)     # (T, 3)
                z = s[:, None] * w + b                                             # Linear(1, 3) of each value
                g = z.exp() / z.exp().sum(-1, keepdim=True)
                want[i, c, r] = (avgs * g).sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(m(x), want)


def _season(s, k, low=1):
    """By hand: the DFT of a 1-D series s (T,) as sums of cosines and sines, bins low..(T-1)//2 (the
    Nyquist bin of an even T left out), the k of largest magnitude, each giving
    2 |X_f| / T cos(2 pi f t / T + angle X_f)."""
    t = len(s)
    steps = torch.arange(t, dtype=torch.float64)
    bins = {}
    for f in range(low, (t - 1) // 2 + 1):
        re = (s * torch.cos(2 * math.pi * f * steps / t)).sum().item()
        im = -(s * torch.sin(2 * math.pi * f * steps / t)).sum().item()
        bins[f] = complex(re, im)
    top = sorted(bins, key=lambda f: -abs(bins[f]))[:k]
    out = torch.zeros(t, dtype=torch.float64)
    for f in top:
        out += 2 * abs(bins[f]) / t * torch.cos(2 * math.pi * f * steps / t + math.atan2(bins[f].imag, bins[f].real))
    return out


@pytest.mark.parametrize("t", [16, 15])
def test_fourier_season_keeps_the_k_strongest_frequencies(t):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, t, dtype=torch.float64).float()
    _, m = _module("fourier_season", Shape(3, (4, t)), k=3, axis=1)
    got = m(x)
    want = torch.stack([torch.stack([torch.stack([_season(x[b, c, r].double(), 3) for r in range(4)])
                                     for c in range(3)]) for b in range(2)]).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fourier_season_recovers_a_sinusoid_without_the_mean_or_the_nyquist_bin():
    t = 32
    steps = torch.arange(t, dtype=torch.float)
    wave = 3 * torch.cos(2 * math.pi * 5 * steps / t + 0.3)
    x = (wave + 7 + 0.5 * torch.cos(math.pi * steps))[None, None]   # + a mean and a Nyquist-bin component
    _, m = _module("fourier_season", Shape(1, (t,)), k=1)
    torch.testing.assert_close(m(x)[0, 0], wave, atol=1e-5, rtol=1e-5)


def test_fourier_season_rejects_too_many_frequencies():
    with pytest.raises(ShapeError, match="frequency bins"):
        OPS["fourier_season"](k=4).infer(Shape(2, (8,)))           # bins 1, 2, 3 only
    OPS["fourier_season"](k=3).infer(Shape(2, (8,)))
    OPS["fourier_season"](k=4).infer(Shape(2, (9,)))               # odd: bins 1..4


def test_moments_and_destandardize_undo_instancenorm():
    torch.manual_seed(3)
    x = 4 * torch.randn(2, 5, 12) + 3                                  # (B, N variables, T steps)
    mean = x.sum(-1, keepdim=True) / 12
    std = (((x - mean) ** 2).sum(-1, keepdim=True) / 12 + 1e-5).sqrt()   # biased variance + eps
    op, m = _module("moments", Shape(5, (12,)), axis=0)
    assert op.infer(Shape(5, (12,))) == Shape(10, (1,))
    torch.testing.assert_close(m(x), torch.cat([mean, std], 1))
    norm = OPS["instancenorm"]().build(Shape(5, (12,)), Shape(5, (12,)))(x)
    torch.testing.assert_close(norm, (x - mean) / std)
    _, undo = _module("destandardize", Shape(3, (5, 12)))
    # per variable, stats as two channels over the (variables, steps) grid, broadcast over 1 channel
    stacked = torch.stack([norm, mean.expand_as(x), std.expand_as(x)], 1)   # (B, 3, N, T)
    torch.testing.assert_close(undo(stacked)[:, 0], x, atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError, match="C \\+ 2"):
        OPS["destandardize"]().infer(Shape(2, (4,)))


def test_revin_in_a_blueprint(tmp_path):
    """A forecaster wrapped in RevIN: its output is back at each variable's level and scale."""
    (tmp_path / "revin.arch").write_text('''
model revin_toy(nodes = 3, seq = 16, pred = 4) {
    input signal(nodes, seq)
    stem instancenorm as revin
    stage { block { scale(0.0) } }
    head {
        rearrange("v l -> l v")
        linear(pred) as projection
        parallel concat {
            identity
            { from input; moments(0) as stats; rearrange("(s v) 1 -> s v", sizes = [["s", 2]]) }
        }
        destandardize
    }
}
''')
    model = composer.build(str(tmp_path / "revin.arch") + ":revin_toy").eval()
    x = torch.randn(2, 3, 16) * torch.tensor([1.0, 10.0, 0.1])[:, None] + torch.tensor([0.0, 50.0, -5.0])[:, None]
    with torch.no_grad():
        y = model(x)                                                 # the normalised series is zeroed:
    mean = x.mean(-1)                                                # the forecast is the bias, de-normalised
    std = (x.var(-1, unbiased=False) + 1e-5).sqrt()
    bias = model.head.projection.bias
    torch.testing.assert_close(y, bias[None, :, None] * std[:, None, :] + mean[:, None, :], atol=1e-4, rtol=1e-5)
