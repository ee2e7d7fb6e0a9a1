"""Fusion: a built model switched to its inference form, in place (`fuse_model`, which
`ComposedModel.fuse()` calls). Re-parameterizable modules fuse themselves (`fuse()`); then runs of
linear instructions of each `Sequence` program that hold a residual or a parallel merge fold into
one conv, by the affine algebra below.

It sits between the layers and the builder: it reads `Sequence` programs (composer/program.py) and
finds a Sequence by its program, so the builder imports it and `fuse()` needs no hook, and
`layers/` never imports the builder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers.core import ChannelScale
from .layers.gating import GRN
from .layers.reparam import conv_class, fold_bn
from .program import Call, Parallel, Residual, program_of


class _Affine:
    """A linear map written as one conv: weight (cout, cin / groups, *kernel), bias, stride (one int
    per spatial dim), groups. Kernels are dense and centred: padding kernel // 2 in every dim."""

    def __init__(self, weight, bias, stride, groups):
        nd = weight.ndim - 2
        self.weight, self.bias, self.groups = weight, bias, groups
        self.stride = tuple(stride) if isinstance(stride, (tuple, list)) else (int(stride),) * nd

    @property
    def cin(self):
        return self.weight.shape[1] * self.groups

    @property
    def cout(self):
        return self.weight.shape[0]

    @property
    def depthwise(self) -> bool:
        return self.groups == self.cin == self.cout

    @property
    def per_channel(self) -> bool:
        return self.depthwise and all(s == 1 for s in self.stride) and all(k == 1 for k in self.weight.shape[2:])

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


def _dilate(w: torch.Tensor, dilation) -> torch.Tensor:
    """A dilated kernel as the dense kernel with `dilation - 1` zeros between its taps, per dim."""
    if all(d == 1 for d in dilation):
        return w
    size = [d * (k - 1) + 1 for k, d in zip(w.shape[2:], dilation)]
    out = w.new_zeros(*w.shape[:2], *size)
    out[(slice(None), slice(None), *(slice(None, None, d) for d in dilation))] = w
    return out


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
    """`b` after `a` as one conv, or None. Exact cases: `b` is per-channel (a scale and shift of each
    channel); or both are depthwise over the same channels, `a` has no bias and in every dim at most
    one of them spans more than one tap (a 1 x k conv then a k x 1 conv: their outer product, the
    serial branches of separable large kernels). Zero padding then agrees at the borders."""
    if b.cin != a.cout:
        return None
    if b.per_channel:
        scale = b.weight.reshape(-1)
        return _Affine(a.weight * scale.view(-1, *([1] * (a.weight.ndim - 1))), a.bias * scale + b.bias,
                       a.stride, a.groups)
    ka, kb = a.weight.shape[2:], b.weight.shape[2:]
    if not (a.depthwise and b.depthwise) or len(ka) != len(kb) or bool(a.bias.abs().max() > 0):
        return None
    if any(x > 1 and y > 1 for x, y in zip(ka, kb)):
        return None
    # b's taps are a's outputs, `a.stride` input pixels apart: dilate b by a's stride
    wb = _dilate(b.weight, a.stride)
    weight = a.weight * wb  # each factor has size 1 along the dims where the other spans
    stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride))
    return _Affine(weight, b.bias, stride, a.groups)


def _as_affine(module: nn.Module):
    """The module as an `_Affine` when it is a plain linear map on a map layout, else None."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        weight = _dilate(module.weight.detach(), module.dilation)  # dense: taps d apart
        ks = weight.shape[2:]
        if any(k % 2 == 0 for k in ks) or tuple(module.padding) != tuple(k // 2 for k in ks):
            return None
        bias = module.bias if module.bias is not None else module.weight.new_zeros(module.out_channels)
        return _Affine(weight, bias.detach(), module.stride, module.groups)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats and \
            module.running_var is not None and module.affine and not module.training:
        ndim = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(module))
        if ndim is None:
            return None
        n = module.num_features
        w, b = fold_bn(module.weight.new_ones(n, 1, *([1] * ndim)), module)
        return _Affine(w.detach(), b.detach(), 1, n)
    if isinstance(module, ChannelScale) and module.channel_first:
        return None  # needs the spatial rank: handled by the caller with a neighbour
    prog = program_of(module)
    if prog is not None and len(prog) == 1 and prog[0].__class__ is Call:
        return _as_affine(module._modules[prog[0].name])
    return None


def _scale_affine(module: nn.Module, like: _Affine):
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
        cls = ins.__class__
        if cls is Call:
            mod = seq._modules[ins.name]
            step = _as_affine(mod)
            if step is None and acc is not None:
                step = _scale_affine(mod, acc)
        elif cls is Residual:
            body = _fold_program(seq, ins.body)
            if body is None:
                return None
            short = _fold_program(seq, ins.shortcut) if ins.shortcut else (_identity_like(body[0]), False)
            if short is None:
                return None
            short = short[0]
            step = _combine([short, body[0]], [1.0, 1.0])
            structural = True
        elif cls is Parallel and ins.merge in ("add", "sub", "mean") and not ins.split:
            folded = [_fold_program(seq, b) for b in ins.branches]
            if any(f is None for f in folded):
                return None
            n = len(folded)
            signs = [1.0] + [(-1.0 if ins.merge == "sub" else 1.0)] * (n - 1)
            step = _combine([f[0] for f in folded], signs)
            if step is not None and ins.merge == "mean":
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
    conv = conv_class(len(kernel))(a.cin, a.cout, kernel, a.stride, tuple(k // 2 for k in kernel),
                                  groups=a.groups, bias=True)
    conv = conv.to(device=a.weight.device, dtype=a.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(a.weight)
        conv.bias.copy_(a.bias)
    return conv


def _fold_sequence(seq) -> None:
    """Replace, in `seq`'s program, every maximal run of linear instructions that holds a residual or
    a parallel merge (after re-parameterization: RepMixer's `x + ls(mixer(x) - norm(x))`, a conv
    position encoding `x + conv(x)`, parallel dilated or asymmetric depthwise convs), or that holds a
    conv fused in the first pass next to another linear step (a fused conv + BN + layer scale), by
    one conv named `reparam_conv`."""
    prog, out, run = seq.program, [], []

    def flush():
        nonlocal run
        if run:
            got = _fold_program(seq, run)
            used = {n for ins in run for n in _names(ins)}
            after_fuse = len(run) > 1 and any(_was_fused(seq._modules[n]) for n in used)
            if got is not None and (got[1] or after_fuse):
                for n in used:
                    delattr(seq, n)
                name, k = "reparam_conv", 1
                while name in seq._modules:
                    name, k = f"reparam_conv{k}", k + 1
                seq.add_module(name, _conv_from(got[0]))
                seq._modules[name]._reparam_fused = True
                out.append(Call(name))
            else:
                out.extend(run)
        run = []

    for ins in prog:
        if ins.__class__ in (Call, Residual, Parallel):
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


def _fold_shifts(seq) -> None:
    """Move the additive shift of a GRN (its `beta`) into the bias of a pointwise conv right after it:
    conv(y + beta) = conv(y) + W @ beta, exact for 1x1 kernels. `beta` becomes a zero buffer."""
    prog = seq.program
    for a, b in zip(prog, prog[1:]):
        if a.__class__ is not Call or b.__class__ is not Call:
            continue
        grn, conv = seq._modules[a.name], seq._modules[b.name]
        if not (isinstance(grn, GRN) and grn.channel_first and isinstance(grn.beta, nn.Parameter)):
            continue
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or conv.groups != 1 or \
                any(k != 1 for k in conv.kernel_size) or conv.in_channels != grn.beta.numel():
            continue
        shift = conv.weight.reshape(conv.out_channels, -1) @ grn.beta.detach()
        if conv.bias is None:
            conv.bias = nn.Parameter(shift)
        else:
            conv.bias.add_(shift)
        del grn.beta
        grn.register_buffer("beta", torch.zeros_like(shift[:0]).new_zeros(conv.in_channels), persistent=False)


def _was_fused(module: nn.Module) -> bool:
    """Made by fusion: a fused re-parameterizable module, a folded run, or a composite of one such."""
    if getattr(module, "_reparam_fused", False):
        return True
    prog = program_of(module)
    return prog is not None and len(prog) == 1 and prog[0].__class__ is Call and _was_fused(module._modules[prog[0].name])


def _names(ins) -> list[str]:
    """The submodules an instruction runs."""
    cls = ins.__class__
    if cls is Call:
        return [ins.name]
    if cls is Residual:
        return [n for sub in ins.body + ins.shortcut for n in _names(sub)]
    if cls is Parallel:
        return [n for b in ins.branches for sub in b for n in _names(sub)]
    return []


@torch.no_grad()
def fuse_model(model: nn.Module) -> nn.Module:
    """Fuse a model for inference, in place; returns it (the fused module itself when the model is
    fusable). Two passes, bottom-up: every fusable submodule (a true `fusable` class attribute and
    a `fuse()` method, such as `RepConv`) becomes its fused conv; then, in every composed `Sequence`,
    each maximal run of linear steps (convs with centred odd kernels, eval-mode batch norms,
    channel-first `layer_scale`s) that contains a `residual` or an add / sub / mean `parallel`
    becomes one conv (`reparam_conv`): RepMixer's `x + ls(mixer(x) - norm(x))` and a conv position
    encoding `x + conv(x)` fuse this way, and so do parallel branches of dilated convs (a dilated
    kernel becomes the dense kernel with zeros between its taps), of asymmetric kernels (1 x k, k x 1)
    and of serial depthwise 1 x k -> k x 1 pairs without bias (their outer product). A run that holds
    a conv fused in the first pass folds with its linear neighbours too (a fused `rep_conv` followed
    by a channel-first layer scale). A GRN's `beta` right before a 1x1 conv moves into that conv's
    bias (UniRepLKNet's deploy form). Other runs without a residual or parallel (a plain conv + BN)
    are kept. Fused forms equal the eval-mode originals: call `model.eval()` first."""
    if getattr(type(model), "fusable", False):
        return model.fuse()
    for name, child in list(model.named_children()):
        fused = fuse_model(child)
        if fused is not child:
            fused._reparam_fused = True  # a run holding it may fold further (see `_fold_sequence`)
            setattr(model, name, fused)
    if program_of(model) is not None and not model.training:
        _fold_sequence(model)
        _fold_shifts(model)
    return model
