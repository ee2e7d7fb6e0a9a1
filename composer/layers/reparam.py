"""Re-parameterizable convolution: parallel conv+BN branches (and an identity BN) while training,
one conv with bias after `fuse()`; composer/fuse.py (`fuse_model`) fuses every such module of a
built model in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core import Stack, bn_class, conv_class  # noqa: F401  (conv_class: callers import it from here)


def fold_bn(weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode `bn` into a bias-free conv `weight`: (weight * gamma / std, beta - mean * gamma / std)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale.view(-1, *([1] * (weight.ndim - 1))), bn.bias - bn.running_mean * scale


class RepConv(nn.Module):
    """`conv_kxk` (one `Stack(conv, bn)`, or a list of `branches` of them, or none) + optional
    `conv_1x1` + optional `conv_small` (each `Stack(conv, bn)`, conv without bias) + optional
    `identity` (a BN of the input). Odd kernels, padding `kernel // 2`."""

    fusable = True

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, ndim: int = 2, *,
                 identity: bool = True, scale_branch: bool = False, small_kernel: int | None = None,
                 branches: int = 1):
        super().__init__()
        self.cin, self.cout, self.kernel, self.stride, self.groups, self.ndim = cin, cout, kernel, stride, groups, ndim
        conv, bn = conv_class(ndim), bn_class(ndim)

        def branch(k):
            return Stack(conv=conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn=bn(cout))

        self.conv_kxk = branch(kernel) if branches == 1 else \
            nn.ModuleList(branch(kernel) for _ in range(branches)) if branches > 1 else None
        self.conv_1x1 = branch(1) if scale_branch else None
        self.conv_small = branch(small_kernel) if small_kernel else None
        self.identity = bn(cout) if identity and cin == cout and stride == 1 else None

    def _branches(self) -> list[nn.Module]:
        main = [] if self.conv_kxk is None else \
            list(self.conv_kxk) if isinstance(self.conv_kxk, nn.ModuleList) else [self.conv_kxk]
        return main + [b for b in (self.conv_1x1, self.conv_small) if b is not None]

    def forward(self, x):
        y = self.identity(x) if self.identity is not None else None
        for b in self._branches():
            y = b(x) if y is None else y + b(x)
        return y

    def _padded(self, w: torch.Tensor) -> torch.Tensor:
        p = (self.kernel - w.shape[-1]) // 2
        return F.pad(w, [p, p] * self.ndim) if p else w

    @torch.no_grad()
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (weight, bias) of the single conv equal to this module in eval mode."""
        ref = next(self.parameters())
        weight = ref.new_zeros(self.cout, self.cin // self.groups, *([self.kernel] * self.ndim))
        bias = ref.new_zeros(self.cout)
        for extra in self._branches():
            w, b = fold_bn(extra.conv.weight, extra.bn)
            weight, bias = weight + self._padded(w), bias + b
        if self.identity is not None:
            per_group = self.cin // self.groups
            eye = torch.zeros_like(weight)
            centre = (self.kernel // 2,) * self.ndim
            for i in range(self.cout):
                eye[(i, i % per_group, *centre)] = 1.0
            w, b = fold_bn(eye, self.identity)
            weight, bias = weight + w, bias + b
        return weight, bias

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The inference form: one conv with bias, equal to this module's eval-mode output."""
        weight, bias = self.fused_weights()
        conv = conv_class(self.ndim)(self.cin, self.cout, self.kernel, self.stride, self.kernel // 2,
                                    groups=self.groups, bias=True)
        conv = conv.to(device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv


class NormLinearHeads(nn.Module):
    """`heads` x (BatchNorm1d -> Linear) on a vector (B, C), outputs averaged; `fuse()` gives one
    `nn.Linear` equal to it in eval mode."""

    fusable = True

    def __init__(self, cin: int, cout: int, heads: int = 1, bias: bool = True, init_std: float = 0.02):
        super().__init__()
        from .core import Stack, trunc_normal_

        def head():
            linear = nn.Linear(cin, cout, bias=bias)
            trunc_normal_(linear.weight, init_std)
            if bias:
                nn.init.zeros_(linear.bias)
            return Stack(norm=nn.BatchNorm1d(cin), linear=linear)

        self.heads = nn.ModuleList(head() for _ in range(heads))

    def forward(self, x):
        y = self.heads[0](x)
        for h in self.heads[1:]:
            y = y + h(x)
        return y / len(self.heads) if len(self.heads) > 1 else y

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        ref = self.heads[0].linear.weight
        weight = torch.zeros_like(ref)
        bias = ref.new_zeros(ref.shape[0])
        for h in self.heads:
            scale = h.norm.weight / torch.sqrt(h.norm.running_var + h.norm.eps)
            shift = h.norm.bias - h.norm.running_mean * scale
            weight += h.linear.weight * scale[None, :]
            bias += h.linear.weight @ shift + (h.linear.bias if h.linear.bias is not None else 0)
        linear = nn.Linear(weight.shape[1], weight.shape[0]).to(device=ref.device, dtype=ref.dtype)
        linear.weight.copy_(weight / len(self.heads))
        linear.bias.copy_(bias / len(self.heads))
        return linear
