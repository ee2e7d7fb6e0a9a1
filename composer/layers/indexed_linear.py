"""The module behind the `indexed_linear` op."""

from __future__ import annotations

import math

import torch
from torch import nn


class IndexedLinear(nn.Module):
    """(B, C, *S) -> (B, count * out, *S): at index s of spatial axis `axis`, y = x W[s] + b[s].
    W, b are parameters (`memory = 0`) or generated from a learned memory by an MLP and the
    factors P, Q, B (see the op's docs)."""

    def __init__(self, cin, out, size, axis, count=1, memory=0, hidden=(64, 64), rank=10):
        super().__init__()
        self.cin, self.out, self.size, self.axis, self.count, self.rank = cin, out, size, axis, count, rank
        if memory:
            self.memory = nn.Parameter(torch.randn(size, memory))
            dims = [memory, *hidden, rank * rank]
            layers = []
            for i, (a, b) in enumerate(zip(dims, dims[1:])):
                layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(dims) - 2 else [])
            self.generator = nn.Sequential(*layers)
            self.P = nn.Parameter(torch.empty(count, cin, rank))
            self.Q = nn.Parameter(torch.empty(count, rank, out))
            self.B = nn.Parameter(torch.empty(count, rank * rank, out))
            for p in (self.P, self.Q, self.B):
                for i in range(count):
                    nn.init.kaiming_uniform_(p.data[i], a=math.sqrt(5))
        else:
            self.memory = None
            bound = 1 / math.sqrt(cin)
            self.weight = nn.Parameter(torch.empty(size, cin, count * out).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(size, count * out).uniform_(-bound, bound))

    def weights(self):
        """(W (S, C, count * out), b (S, count * out)) for the current parameters."""
        if self.memory is None:
            return self.weight, self.bias
        g = self.generator(self.memory)                                       # (S, r^2)
        bias = torch.einsum("sr,kro->sko", g, self.B).reshape(self.size, -1)  # (S, count * out)
        m = g.view(self.size, self.rank, self.rank)
        w = torch.matmul(torch.matmul(self.P[:, None], m[None]), self.Q[:, None])  # (count, S, C, out): P G Q
        return w.permute(1, 2, 0, 3).reshape(self.size, self.cin, -1), bias

    def forward(self, x):
        w, b = self.weights()
        t = x.movedim(1, -1).movedim(1 + self.axis, -2)           # (B, ..., S, C)
        y = torch.matmul(t.unsqueeze(-2), w).squeeze(-2) + b      # (B, ..., S, count * out)
        return y.movedim(-2, 1 + self.axis).movedim(-1, 1)

    def extra_repr(self) -> str:
        gen = f", memory={self.memory.shape[1]}, rank={self.rank}" if self.memory is not None else ""
        return f"{self.cin}, {self.out}, size={self.size}, axis={self.axis}, count={self.count}{gen}"
