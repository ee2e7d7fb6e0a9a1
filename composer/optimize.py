"""Inference optimisation of a built model, in place (`optimize_model`, which
`ComposedModel.optimize()`, `composer.build(..., optimize=True)` and `composer build --optimize`
call). The result computes the same function as the eval-mode model, with fewer ops:

1. `fuse.fuse_model`: re-parameterisable ops become one conv, runs of linear steps that hold a
   residual or a parallel merge fold into one conv (composer/fuse.py);
2. every eval-mode batch norm right after a conv (or a channel-first linear: a 1x1 conv on a map)
   folds into that producer: w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta;
   where no producer precedes it, a batch norm right before a conv without padding (a 1x1 conv, a
   patchify downsample) or a channel-first linear folds forward into it: w' = w * s (per input
   channel), b' = b + sum(w * t);
3. every layer scale (`ChannelScale`, or a scalar `Scale`) right after a conv or linear folds into
   it: w' = w * s, b' = b * s;
4. dropout calls, drop-path and identity modules are removed (they do nothing in eval mode);
5. every linear runs on oneDNN's packed weight (`layers.packed.PackedLinear`, same parameters), and
   an activation right after a linear runs inside it (the linear's kernel applies it to each tile
   of the output: one pass over the output less); on the CPU in float32 without autograd, above a
   size where oneDNN's kernel is the faster one; as before anywhere else.

"Right after" is read on the programs of the built `Sequence`s (composer/program.py): the
producer is the previous instruction, or the last instruction of the composite it calls (a
ConvNeXt block's `gamma` folds into the `fc2` at the end of its `mlp`); the consumer the next
instruction or the first one of the composite it calls. Containers that run their children in
order (`nn.Sequential`, `layers.core.Stack`: the conv + BN pairs inside attention pieces) fold the
same way. Nothing that another part of the model also uses is touched: a `reuse` target, a module
with a tied parameter, the classifier (its removal gives `forward_head(pre_logits=True)`).

Attention: chains of scores -> softmax -> weighted_sum already run as one SDPA call (chains.py),
and the `attention` op's module calls SDPA itself where it is the faster kernel.

After it the model is for inference only: `ComposedModel.train()` refuses, and its state_dict has
other keys (folded batch norms and scales are gone, convs gained biases). It reads programs by
their `program` attribute (as fuse.py does), so it never imports the builder.
"""

from __future__ import annotations

import torch
from torch import nn

from .fuse import fuse_model
from .layers.core import ChannelLinear, ChannelScale, Scale, Stack
from .layers.packed import PackedLinear, epilogue_of
from .program import Attend, Call, Forget, Parallel, Residual, Shared, TrainCall, program_of

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def optimize_model(model: nn.Module) -> nn.Module:
    """Switch `model` (a built `ComposedModel`) to its inference form in place; returns it."""
    model.eval()
    fuse_model(model)
    keep = _protected(model)
    _pack(model, keep)  # first: the folds below then fold into the packed linears, and take activations
    _visit(model, keep)
    return model


# ----------------------------------------------------------------------------- what must stay as it is
def _protected(model: nn.Module) -> set:
    """ids of the modules folds must leave alone: `reuse` targets (and what they hold), modules that
    own a tied parameter, and the classifier."""
    keep = set()
    for m in model.modules():
        prog = program_of(m)
        for ins in _walk(prog) if prog is not None else ():
            if ins.__class__ is Shared:
                keep.update(id(sub) for sub in model.get_submodule(ins.name).modules())
    owners: dict[int, list] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(m)
    for mods in owners.values():
        if len(mods) > 1:
            keep.update(id(m) for m in mods)
    get = getattr(model, "get_classifier", None)
    if get is not None and hasattr(model, "head"):
        heads = get()
        keep.update(id(h) for h in (heads if isinstance(heads, tuple) else (heads,)))
    return keep


def _walk(prog):
    for ins in prog:
        yield ins
        cls = ins.__class__
        if cls is Residual:
            yield from _walk(ins.body)
            yield from _walk(ins.shortcut)
        elif cls is Parallel:
            for b in ins.branches:
                yield from _walk(b)


# ----------------------------------------------------------------------------- the pass
def _visit(module: nn.Module, keep: set) -> None:
    """Bottom-up: a composite is optimised before the program that calls it (its last op is then
    the producer a following scale or batch norm folds into)."""
    for child in list(module.children()):
        _visit(child, keep)
    prog = program_of(module)
    if prog is not None:
        module.program = _backward(module, prog, keep)
        module.program = _forward(module, module.program, keep)
        for name, child in list(module._modules.items()):
            if type(child) is nn.Identity:  # compiled away by the builder: only the module is left
                delattr(module, name)
    elif type(module) in (Stack, nn.Sequential):
        _fold_container(module, keep)


def _backward(seq, prog: list, keep: set) -> list:
    """`prog` with its folds into producers made, dropout calls removed (recursing into residuals
    and parallel branches)."""
    out = []
    for ins in prog:
        cls = ins.__class__
        if cls is Residual:
            ins = ins._replace(body=_backward(seq, ins.body, keep), shortcut=_backward(seq, ins.shortcut, keep),
                               drop_path=0.0)
        elif cls is Parallel:
            ins = ins._replace(branches=[_backward(seq, b, keep) for b in ins.branches])
        elif cls is TrainCall:  # a dropout: nothing in eval mode
            if id(seq._modules[ins.name]) not in keep:
                delattr(seq, ins.name)
            continue
        elif cls is Attend and ins.dropout is not None:
            if id(seq._modules[ins.dropout]) not in keep:
                delattr(seq, ins.dropout)
            ins = ins._replace(dropout=None)
        elif cls is Call and out:
            mod = seq._modules[ins.name]
            if id(mod) not in keep and (_foldable(mod) or epilogue_of(mod) is not None):
                producer = _last(seq, out[-1], keep)
                if producer is not None and (fold_after(producer, mod) or _take(producer, mod)):
                    delattr(seq, ins.name)
                    continue
        out.append(ins)
    return out


def _take(producer: nn.Module, act: nn.Module) -> bool:
    """Step 5's second half: activation `act` runs inside the packed linear before it."""
    if type(producer) is PackedLinear and producer.act is None and epilogue_of(act) is not None:
        producer.take(act)
        return True
    return False


def _forward(seq, prog: list, keep: set) -> list:
    """`prog` with every batch norm followed by a pointwise consumer folded into it."""
    out, i = [], 0
    while i < len(prog):
        ins = prog[i]
        cls = ins.__class__
        if cls is Residual:
            ins = ins._replace(body=_forward(seq, ins.body, keep), shortcut=_forward(seq, ins.shortcut, keep))
        elif cls is Parallel:
            ins = ins._replace(branches=[_forward(seq, b, keep) for b in ins.branches])
        elif cls is Call and i + 1 < len(prog):
            mod = seq._modules[ins.name]
            if id(mod) not in keep and _is_bn(mod):
                consumer = _first(seq, prog[i + 1], keep)
                if consumer is not None and fold_before(mod, consumer):
                    delattr(seq, ins.name)
                    i += 1
                    continue
        out.append(ins)
        i += 1
    return out


def _pack(model: nn.Module, keep: set) -> None:
    """Step 5: every linear (exactly nn.Linear or ChannelLinear: a subclass may compute otherwise)
    a PackedLinear with the same parameters; `_backward` then takes each activation called right
    after one (its producer as `_last` finds it) into it (`_take`)."""
    made: dict[int, PackedLinear] = {}  # one per linear, where a module is registered twice
    for m in list(model.modules()):
        for name, child in m._modules.items():
            if type(child) in (nn.Linear, ChannelLinear) and id(child) not in keep:
                if id(child) not in made:
                    made[id(child)] = PackedLinear.of(child)
                m._modules[name] = made[id(child)]
            elif type(child) is PackedLinear:  # optimised before: packed again (a `.data` edit is not seen)
                child.repack()


def _fold_container(box: nn.Module, keep: set) -> None:
    """The same folds between neighbours of a container that runs its children in order; its
    identities and dropouts removed."""
    names = list(box._modules)
    for name in names:
        if type(box._modules[name]) is nn.Identity or isinstance(box._modules[name], nn.Dropout):
            delattr(box, name)
    names = list(box._modules)
    for a, b in zip(names, names[1:]):
        if a not in box._modules or b not in box._modules:
            continue
        first, second = box._modules[a], box._modules[b]
        if id(first) in keep or id(second) in keep:
            continue
        if _foldable(second) and fold_after(first, second):
            delattr(box, b)
        elif _is_bn(first) and fold_before(first, second):
            delattr(box, a)


def _last(seq, ins, keep: set):
    """The module whose output instruction `ins` returns: a called op, or the last op of a called
    composite (followed by nothing but its `Forget`); None otherwise or when it must stay."""
    return _end(seq, ins, keep, last=True)


def _first(seq, ins, keep: set):
    """The module that instruction `ins` runs first on its input: a called op, or the first op of a
    called composite; None otherwise or when it must stay."""
    return _end(seq, ins, keep, last=False)


def _end(seq, ins, keep: set, last: bool):
    if ins.__class__ is not Call:
        return None
    mod = seq._modules[ins.name]
    if id(mod) in keep:
        return None
    prog = program_of(mod)
    if prog is None:
        return mod
    if last and prog and prog[-1].__class__ is Forget:
        prog = prog[:-1]
    return _end(mod, prog[-1 if last else 0], keep, last) if prog else None


# ----------------------------------------------------------------------------- the folds
def _is_bn(m) -> bool:
    return type(m) in _BN and m.track_running_stats and m.running_var is not None and not m.training


def _foldable(m) -> bool:
    return _is_bn(m) or (type(m) is ChannelScale) or (type(m) is Scale)


def _out_axis_first(m) -> bool | None:
    """Whether producer `m` puts its output channels at axis 1 (a conv, a channel-first linear) or
    last (a linear); None when it is no producer a scale folds into."""
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        return True
    if isinstance(m, ChannelLinear):
        return None if getattr(m, "act", None) is not None else m.channel_first  # act(y) * s is no linear
    if type(m) is nn.Linear:
        return False
    return None


def _bn_affine(bn) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with bn(x) = x * s + t per channel, in float64."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t


def _set(m, weight: torch.Tensor, bias: torch.Tensor) -> None:
    w = m.weight
    w.copy_(weight.to(w.dtype))
    if m.bias is None:
        m.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    else:
        m.bias.copy_(bias.to(m.bias.dtype))


def fold_after(producer: nn.Module, m: nn.Module) -> bool:
    """Fold `m` (an eval-mode batch norm, a `ChannelScale` or a `Scale`) into the conv or linear
    `producer` that feeds it: producer then m equals the producer changed. False (nothing changed)
    when that is not exact."""
    first = _out_axis_first(producer)
    if first is None:
        return False
    cout = producer.weight.shape[0]
    if _is_bn(m):
        if not first or m.num_features != cout:
            return False
        s, t = _bn_affine(m)
    elif type(m) is ChannelScale:
        if m.channel_first != first or m.scale.numel() != cout:
            return False
        s = m.scale.double()
        t = torch.zeros_like(s)
    elif type(m) is Scale:
        s = producer.weight.new_full((cout,), float(m.value), dtype=torch.float64)
        t = torch.zeros_like(s)
    else:
        return False
    w = producer.weight.double()
    b = producer.bias.double() if producer.bias is not None else torch.zeros_like(s)
    _set(producer, w * s.view(-1, *([1] * (w.ndim - 1))), b * s + t)
    return True


def fold_before(bn: nn.Module, consumer: nn.Module) -> bool:
    """Fold eval-mode batch norm `bn` into the `consumer` it feeds: a conv without padding (any
    kernel, stride, dilation and groups: every tap then reads a real pixel, so the shift adds
    `sum(w * t)` to each output) or a channel-first linear: consumer(bn(x)) = consumer'(x). False
    (nothing changed) otherwise: a padded kernel would see the shift at the borders where it now
    sees zeros."""
    if isinstance(consumer, nn.modules.conv._ConvNd):
        pointwise = all(k == 1 for k in consumer.kernel_size)
        if consumer.transposed or (type(consumer) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and not pointwise):
            return False  # a subclass may pad in its forward (TF-SAME), except for 1x1 kernels
        if isinstance(consumer.padding, str) and not (consumer.padding == "valid" or pointwise):
            return False
        if not isinstance(consumer.padding, str) and any(p != 0 for p in consumer.padding):
            return False
        groups = consumer.groups
    elif isinstance(consumer, ChannelLinear) and consumer.channel_first:
        groups = 1
    else:
        return False
    w = consumer.weight.double()
    cout, per = w.shape[0], w.shape[1]
    if per * groups != bn.num_features:
        return False
    s, t = _bn_affine(bn)
    w2 = w.reshape(groups, cout // groups, per, -1)  # (groups, out per group, in per group, taps)
    b = consumer.bias.double() if consumer.bias is not None else w.new_zeros(cout)
    bias = b + (w2 * t.view(groups, 1, per, 1)).sum((2, 3)).reshape(cout)
    _set(consumer, (w2 * s.view(groups, 1, per, 1)).reshape(w.shape), bias)
    return True
