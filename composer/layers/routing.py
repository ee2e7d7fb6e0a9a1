"""A sparsely gated mixture of experts over concatenated branch outputs (see `top_k_mixture`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_EPS64 = 2.220446049250313e-16  # np.finfo(float).eps: the original dispatcher's floor before the log


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (unbiased variance / mean^2); 0 for a single expert."""
    if x.shape[0] == 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class TopKMixture(nn.Module):
    """Input channels: [logits (E), noise scales (E, if noisy), expert 1 (C), ..., expert E (C)]."""

    def __init__(self, experts: int, k: int, noisy: bool, combine: str, noise_eps: float, loss_coef: float,
                 channels_last: bool = False):
        super().__init__()
        self.experts, self.k, self.noisy, self.combine = experts, k, noisy, combine
        self.noise_eps, self.loss_coef, self.channels_last = noise_eps, loss_coef, channels_last
        self.balance_loss = torch.zeros(())
        self.last_gates = None

    def extra_repr(self) -> str:
        return f"experts={self.experts}, k={self.k}, noisy={self.noisy}, combine={self.combine}"

    def gates(self, router: torch.Tensor) -> torch.Tensor:
        """(B, E) gate weights from the router's per-sample channels (B, E or 2E); sets `balance_loss`."""
        e, k = self.experts, self.k
        clean = router[:, :e]
        noisy = self.noisy and self.training
        if noisy:
            std = F.softplus(router[:, e:2 * e]) + self.noise_eps
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        top, idx = logits.topk(min(k + 1, e), dim=1)
        weights = torch.softmax(top[:, :k], dim=1)
        gates = torch.zeros_like(logits).scatter(1, idx[:, :k], weights)
        if noisy and k < e:  # P(expert in the top k) under the noise: a smooth load estimate
            inside = top[:, k:k + 1]      # the (k+1)-th logit: the bar to clear when the expert is in
            outside = top[:, k - 1:k]     # the k-th logit: the bar to clear when it is out
            is_in = logits > inside
            load = torch.where(is_in, _normal_cdf((clean - inside) / std),
                               _normal_cdf((clean - outside) / std)).sum(0)
        else:
            load = (gates > 0).sum(0)
        self.balance_loss = self.loss_coef * (_cv_squared(gates.sum(0)) + _cv_squared(load))
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # tokens (B, N, C) -> (B, C, N)
            x = x.movedim(-1, 1)
        e = self.experts
        g = 2 * e if self.noisy else e
        router = x[:, :g]
        if router.ndim > 2:
            router = router.flatten(2).mean(-1)
        gates = self.gates(router)
        self.last_gates = gates.detach()
        ys = x[:, g:]
        ys = ys.reshape(ys.shape[0], e, ys.shape[1] // e, *ys.shape[2:])  # (B, E, C, *grid)
        w = gates.reshape(gates.shape[0], e, *([1] * (ys.ndim - 2)))
        if self.combine == "sum":
            y = (w * ys).sum(1)
        else:
            s = (w * ys.exp()).sum(1)
            y = s.masked_fill(s == 0, _EPS64).log()
        return y.movedim(1, -1) if self.channels_last else y
