"""The modules behind the time-series ops (`composer/ops/series.py`): moving-average trend, top-k
Fourier season, per-channel moments and de-standardisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeriesDecomposition(nn.Module):
    """(B, C, *S) -> (B, C, *S): the moving averages of spatial axis `axis` (edge padding, stride 1)
    for each kernel, mixed per element by softmax(layer(x)) when there are several kernels; with
    `residual` the input minus that trend."""

    def __init__(self, kernels, axis=0, residual=False):
        super().__init__()
        self.kernels, self.axis, self.residual = tuple(kernels), axis, residual
        self.layer = nn.Linear(1, len(self.kernels)) if len(self.kernels) > 1 else None

    def forward(self, x):
        dim = self.axis + 2
        series = x.movedim(dim, -1)                      # (B, C, ..., T)
        flat = series.reshape(-1, 1, series.shape[-1])   # every series on its own
        averages = []
        for k in self.kernels:
            padded = F.pad(flat, (k - 1 - (k - 1) // 2, (k - 1) // 2), mode="replicate")
            averages.append(F.avg_pool1d(padded, k, stride=1).reshape(series.shape))
        if self.layer is None:
            trend = averages[0]
        else:
            weights = torch.softmax(self.layer(series.unsqueeze(-1)), -1)   # (..., T, K)
            trend = (torch.stack(averages, -1) * weights).sum(-1)
        trend = trend.movedim(-1, dim)
        return x - trend if self.residual else trend

    def extra_repr(self) -> str:
        return f"kernels={list(self.kernels)}, axis={self.axis}" + (", residual" if self.residual else "")


class FourierSeason(nn.Module):
    """(B, C, *S) -> (B, C, *S): the inverse rFFT, along spatial axis `axis`, of each series' `k`
    largest-magnitude bins from `low` up to below the Nyquist bin (the others zeroed)."""

    def __init__(self, k=3, axis=0, low=1):
        super().__init__()
        self.k, self.axis, self.low = k, axis, low

    def forward(self, x):
        dim = self.axis + 2
        t = x.shape[dim]
        spectrum = torch.fft.rfft(x.float(), dim=dim)
        count = t // 2 + 1 - (1 if t % 2 == 0 else 0) - self.low
        top = spectrum.narrow(dim, self.low, count).abs().topk(self.k, dim=dim).indices + self.low
        keep = torch.zeros(spectrum.shape, dtype=torch.bool, device=x.device).scatter(dim, top, True)
        kept = spectrum * keep
        return torch.fft.irfft(kept, n=t, dim=dim).to(x.dtype)

    def extra_repr(self) -> str:
        return f"k={self.k}, axis={self.axis}, low={self.low}"


class Moments(nn.Module):
    """(B, C, *S) -> (B, 2C, *S with axis 1): per-channel mean, then sqrt(biased var + eps)."""

    def __init__(self, axis=0, eps=1e-5):
        super().__init__()
        self.axis, self.eps = axis, eps

    def forward(self, x):
        dim = self.axis + 2
        mean = x.mean(dim, keepdim=True)
        std = torch.sqrt(x.var(dim, keepdim=True, unbiased=False) + self.eps)
        return torch.cat([mean, std], 1)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, eps={self.eps}"


class Destandardize(nn.Module):
    """(B, C + 2, *S) -> (B, C, *S): x[:, :C] * x[:, C + 1] + x[:, C] (a mean and a std channel)."""

    def forward(self, x):
        return x[:, :-2] * x[:, -1:] + x[:, -2:-1]
