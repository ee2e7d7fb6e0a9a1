"""Re-parameterizable convolution: parallel conv+BN branches (and an identity BN) while training,
one conv with bias after `fuse()`; `fuse_model` fuses every such module of a model in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import Stack


def _conv_cls(ndim: int):
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]


def _bn_cls(ndim: int):
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1]


def _fold_bn(weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode `bn` into a bias-free conv `weight`: (weight * gamma / std, beta - mean * gamma / std)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale.view(-1, *([1] * (weight.ndim - 1))), bn.bias - bn.running_mean * scale


class RepConv(nn.Module):
    """`conv_kxk` + optional `conv_1x1` + optional `conv_small` (each `Stack(conv, bn)`, conv without
    bias) + optional `identity` (a BN of the input). Odd kernels, padding `kernel // 2`."""

    fusable = True

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, ndim: int = 2, *,
                 identity: bool = True, scale_branch: bool = False, small_kernel: int | None = None):
        super().__init__()
        self.cin, self.cout, self.kernel, self.stride, self.groups, self.ndim = cin, cout, kernel, stride, groups, ndim
        conv, bn = _conv_cls(ndim), _bn_cls(ndim)

        def branch(k):
            return Stack(conv=conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn=bn(cout))

        self.conv_kxk = branch(kernel)
        self.conv_1x1 = branch(1) if scale_branch else None
        self.conv_small = branch(small_kernel) if small_kernel else None
        self.identity = bn(cout) if identity and cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.conv_kxk(x)
        for extra in (self.conv_1x1, self.conv_small):
            if extra is not None:
                y = y + extra(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return y

    def _padded(self, w: torch.Tensor) -> torch.Tensor:
        p = (self.kernel - w.shape[-1]) // 2
        return F.pad(w, [p, p] * self.ndim) if p else w

    @torch.no_grad()
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (weight, bias) of the single conv equal to this module in eval mode."""
        weight, bias = _fold_bn(self.conv_kxk.conv.weight, self.conv_kxk.bn)
        for extra in (self.conv_1x1, self.conv_small):
            if extra is not None:
                w, b = _fold_bn(extra.conv.weight, extra.bn)
                weight, bias = weight + self._padded(w), bias + b
        if self.identity is not None:
            per_group = self.cin // self.groups
            eye = torch.zeros_like(weight)
            centre = (self.kernel // 2,) * self.ndim
            for i in range(self.cout):
                eye[(i, i % per_group, *centre)] = 1.0
            w, b = _fold_bn(eye, self.identity)
            weight, bias = weight + w, bias + b
        return weight, bias

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The inference form: one conv with bias, equal to this module's eval-mode output."""
        weight, bias = self.fused_weights()
        conv = _conv_cls(self.ndim)(self.cin, self.cout, self.kernel, self.stride, self.kernel // 2,
                                    groups=self.groups, bias=True)
        conv = conv.to(device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv


def fuse_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every fusable submodule (one with a true `fusable` class attribute and a
    `fuse()` method, such as `RepConv`) by its fused form. Returns the model (the fused module itself
    when the model is fusable). Fused forms equal the eval-mode originals: call `model.eval()`."""
    if getattr(type(model), "fusable", False):
        return model.fuse()
    for name, child in list(model.named_children()):
        fused = fuse_model(child)
        if fused is not child:
            setattr(model, name, fused)
    return model
