"""Re-parameterizable convolution: parallel conv+BN branches (and an identity BN) while training,
one conv with bias after `fuse()`; `fuse_model` fuses every such module of a model in place."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .core import Stack


def _conv_cls(ndim: int):
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]


def _bn_cls(ndim: int):
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1]


def _fold_bn(weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
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
        conv, bn = _conv_cls(ndim), _bn_cls(ndim)

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


class _Affine:
    """A linear map written as one conv: weight (cout, cin / groups, *kernel), bias, stride, groups."""

    def __init__(self, weight, bias, stride, groups):
        self.weight, self.bias, self.stride, self.groups = weight, bias, stride, groups

    @property
    def cin(self):
        return self.weight.shape[1] * self.groups

    @property
    def cout(self):
        return self.weight.shape[0]

    @property
    def per_channel(self) -> bool:
        return self.groups == self.cin == self.cout and self.stride == 1 and all(k == 1 for k in self.weight.shape[2:])

    def regroup(self, groups: int) -> torch.Tensor:
        """The weight as a conv with `groups` groups (a divisor of ours): block-diagonal within each."""
        if groups == self.groups:
            return self.weight
        old_in, old_out, new_in = self.cin // self.groups, self.cout // self.groups, self.cin // groups
        w = self.weight.new_zeros(self.cout, new_in, *self.weight.shape[2:])
        for j in range(self.groups):
            rows = slice(j * old_out, (j + 1) * old_out)
            start = j * old_in - ((j * old_out) // (self.cout // groups)) * new_in
            w[rows, start:start + old_in] = self.weight[rows]
        return w

    def padded(self, w: torch.Tensor, kernel: list[int]) -> torch.Tensor:
        pads = []
        for have, want in zip(reversed(w.shape[2:]), reversed(kernel)):
            pads += [(want - have) // 2] * 2
        return F.pad(w, pads) if any(pads) else w


def _combine(parts: list[_Affine], signs: list[float]):
    """The sum of parallel linear maps of the same input (signs +1 / -1), or None."""
    first = parts[0]
    if any(p.stride != first.stride or p.cin != first.cin or p.cout != first.cout or
           p.weight.ndim != first.weight.ndim for p in parts):
        return None
    groups = math.gcd(*[p.groups for p in parts])
    kernel = [max(p.weight.shape[2 + d] for p in parts) for d in range(first.weight.ndim - 2)]
    if any(k % 2 == 0 for k in kernel) or any(s % 2 == 0 for p in parts for s in p.weight.shape[2:]):
        return None
    weight = sum(sg * p.padded(p.regroup(groups), kernel) for p, sg in zip(parts, signs))
    bias = sum(sg * p.bias for p, sg in zip(parts, signs))
    return _Affine(weight, bias, first.stride, groups)


def _identity_like(a: _Affine) -> _Affine:
    ones = a.weight.new_ones(a.cout, 1, *([1] * (a.weight.ndim - 2)))
    return _Affine(ones, a.weight.new_zeros(a.cout), 1, a.cout)


def _then(a: _Affine, b: _Affine):
    """`b` after `a`, when `b` is per-channel (a scale and shift of each channel), else None."""
    if not b.per_channel or b.cin != a.cout:
        return None
    scale = b.weight.reshape(-1)
    return _Affine(a.weight * scale.view(-1, *([1] * (a.weight.ndim - 1))), a.bias * scale + b.bias, a.stride, a.groups)


def _as_affine(module: nn.Module):
    """The module as an `_Affine` when it is a plain linear map on a map layout, else None."""
    from ..builder import Sequence
    from .core import ChannelScale

    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        ks = module.kernel_size
        if (module.padding_mode != "zeros" or any(d != 1 for d in module.dilation) or
                any(k % 2 == 0 for k in ks) or tuple(module.padding) != tuple(k // 2 for k in ks) or
                len(set(module.stride)) != 1):
            return None
        bias = module.bias if module.bias is not None else module.weight.new_zeros(module.out_channels)
        return _Affine(module.weight.detach(), bias.detach(), module.stride[0], module.groups)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats and \
            module.running_var is not None and module.affine and not module.training:
        ndim = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(module))
        if ndim is None:
            return None
        n = module.num_features
        w, b = _fold_bn(module.weight.new_ones(n, 1, *([1] * ndim)), module)
        return _Affine(w.detach(), b.detach(), 1, n)
    if isinstance(module, ChannelScale) and module.channel_first:
        return None  # needs the spatial rank: handled by the caller with a neighbour
    if isinstance(module, Sequence) and len(module.program) == 1 and module.program[0][0] == "m":
        return _as_affine(module._modules[module.program[0][1]])
    return None


def _scale_affine(module: nn.Module, like: _Affine):
    from .core import ChannelScale

    if isinstance(module, ChannelScale) and module.channel_first and module.scale.numel() == like.cout:
        s = module.scale.detach()
        return _Affine(s.view(-1, 1, *([1] * (like.weight.ndim - 2))), torch.zeros_like(s), 1, s.numel())
    return None


def _fold_program(seq, prog: list):
    """The linear map computed by instructions `prog` of Sequence `seq`, or None. Only maps that
    contain a residual or a parallel merge are worth folding (`structural` is then true)."""
    acc = None
    structural = False
    for ins in prog:
        kind = ins[0]
        if kind == "m":
            mod = seq._modules[ins[1]]
            step = _as_affine(mod)
            if step is None and acc is not None:
                step = _scale_affine(mod, acc)
        elif kind == "r":
            body = _fold_program(seq, ins[1])
            if body is None:
                return None
            short = _fold_program(seq, ins[2]) if ins[2] else (_identity_like(body[0]), False)
            if short is None:
                return None
            short = short[0]
            step = _combine([short, body[0]], [1.0, 1.0])
            structural = True
        elif kind == "p" and ins[1] in ("add", "sub", "mean") and not ins[3]:
            folded = [_fold_program(seq, b) for b in ins[2]]
            if any(f is None for f in folded):
                return None
            n = len(folded)
            signs = [1.0] + [(-1.0 if ins[1] == "sub" else 1.0)] * (n - 1)
            step = _combine([f[0] for f in folded], signs)
            if step is not None and ins[1] == "mean":
                step = _Affine(step.weight / n, step.bias / n, step.stride, step.groups)
            structural = True
        else:
            return None
        if step is None:
            return None
        acc = step if acc is None else _then(acc, step)
        if acc is None:
            return None
    return None if acc is None else (acc, structural)


def _conv_from(a: _Affine) -> nn.Module:
    kernel = tuple(a.weight.shape[2:])
    conv = _conv_cls(len(kernel))(a.cin, a.cout, kernel, a.stride, tuple(k // 2 for k in kernel),
                                  groups=a.groups, bias=True)
    conv = conv.to(device=a.weight.device, dtype=a.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(a.weight)
        conv.bias.copy_(a.bias)
    return conv


def _fold_sequence(seq) -> None:
    """Replace, in `seq`'s program, every maximal run of linear instructions that holds a residual or
    a parallel merge (after re-parameterization: RepMixer's `x + ls(mixer(x) - norm(x))`, a conv
    position encoding `x + conv(x)`) by one conv named `reparam_conv`."""
    prog, out, run = seq.program, [], []

    def flush():
        nonlocal run
        if run:
            got = _fold_program(seq, run)
            if got is not None and got[1]:
                used = {n for ins in run for n in _names(ins)}
                for n in used:
                    delattr(seq, n)
                name, k = "reparam_conv", 1
                while name in seq._modules:
                    name, k = f"reparam_conv{k}", k + 1
                seq.add_module(name, _conv_from(got[0]))
                out.append(("m", name))
            else:
                out.extend(run)
        run = []

    for ins in prog:
        if ins[0] in ("m", "r", "p"):
            if run and _fold_program(seq, run + [ins]) is not None:
                run.append(ins)
                continue
            flush()
            if _fold_program(seq, [ins]) is not None:
                run = [ins]
                continue
        flush()
        out.append(ins)
    flush()
    seq.program = out


def _names(ins) -> list[str]:
    if ins[0] == "m":
        return [ins[1]]
    if ins[0] == "r":
        return [n for sub in ins[1] + ins[2] for n in _names(sub)]
    if ins[0] == "p":
        return [n for b in ins[2] for sub in b for n in _names(sub)]
    return []


@torch.no_grad()
def fuse_model(model: nn.Module) -> nn.Module:
    """Fuse a model for inference, in place; returns it (the fused module itself when the model is
    fusable). Two passes, bottom-up: every fusable submodule (a true `fusable` class attribute and
    a `fuse()` method, such as `RepConv`) becomes its fused conv; then, in every composed `Sequence`,
    each maximal run of linear steps (convs with centred odd kernels, eval-mode batch norms,
    channel-first `layer_scale`s) that contains a `residual` or an add / sub / mean `parallel`
    becomes one conv (`reparam_conv`): RepMixer's `x + ls(mixer(x) - norm(x))` and a conv position
    encoding `x + conv(x)` fuse this way. Runs without a residual or parallel (a plain conv + BN)
    are kept. Fused forms equal the eval-mode originals: call `model.eval()` first."""
    from ..builder import Sequence

    if getattr(type(model), "fusable", False):
        return model.fuse()
    for name, child in list(model.named_children()):
        fused = fuse_model(child)
        if fused is not child:
            setattr(model, name, fused)
    if isinstance(model, Sequence) and not model.training:
        _fold_sequence(model)
    return model
