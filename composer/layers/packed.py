"""Linears on oneDNN's packed weights, with the activation that follows them taken into the same
kernel (`PackedLinear`, which composer/optimize.py puts in an optimised model).

`F.linear` on the CPU multiplies with MKL on the weight as stored, then an activation reads and
writes the whole output again (for a large output, into freshly mapped memory). oneDNN's linear
(`torch.ops.mkldnn._linear_pointwise`) on a weight reordered once into its kernel's layout runs
the same GEMM 5-15% faster and applies the activation to each tile while it is in cache: a ViT's
MLP, one thread, 0.8x at 197 tokens and 0.5-0.7x at 8x197 (docs/benchmarks.md). Its fixed cost
(about 13 us a call) loses on small products, so it is taken only above `MIN_MACS`.

It is taken only where it exists and gives the same numbers (float32 on the CPU, autograd off, not
traced or compiled: `on_onednn_path`); anywhere else the module runs the ordinary linear and then
the activation, as the model did before. The parameters are the linear's own (same names: the
state_dict is unchanged); the packed copy is made again when the weight changed since
(`load_state_dict`, `.to()`).
"""

from __future__ import annotations

import torch
from torch import nn

from .core import ChannelLinear

# products (rows x in x out multiply-adds) below which oneDNN's fixed cost loses to F.linear (one
# thread, measured over ViT-, Swin- and MLP-sized shapes: benchmarks/vs_timm.py --optimize)
MIN_MACS = 8_000_000  # a plain linear: oneDNN's GEMM is only 5-15% faster
MIN_MACS_FUSED = 3_000_000  # with an activation: one pass over the output saved too


def epilogue_of(m: nn.Module) -> tuple | None:
    """(oneDNN's name, its scalars, its algorithm) of the activation module `m` (the exact torch
    classes, whose functions oneDNN computes the same), or None."""
    cls = type(m)
    if cls is nn.GELU:
        return ("gelu", [], m.approximate)  # "none" (erf) or "tanh"
    if cls is nn.ReLU6:
        return ("hardtanh", [0.0, 6.0], "")
    if cls is nn.Hardtanh:
        return ("hardtanh", [float(m.min_val), float(m.max_val)], "")
    if cls is nn.LeakyReLU:
        return ("leaky_relu", [float(m.negative_slope)], "")
    name = _PLAIN.get(cls)
    return (name, [], "") if name else None


_PLAIN = {nn.ReLU: "relu", nn.SiLU: "swish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
          nn.Hardsigmoid: "hardsigmoid"}


def on_onednn_path(x) -> bool:
    """Whether oneDNN's kernels may take `x` (here and in blocked.py): float32 on the CPU, autograd
    off, not traced or compiled."""
    return x.dtype is torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled() \
        and not torch.jit.is_tracing() and not torch.compiler.is_compiling()


class PackedLinear(ChannelLinear):
    """A linear (channels last, or first: see ChannelLinear) then its activation `act` (None: no
    activation), on oneDNN's packed weight where `on_onednn_path` holds and the product is large
    enough; the linear then `act` otherwise."""

    @classmethod
    def of(cls, linear: nn.Linear) -> "PackedLinear":
        """A PackedLinear holding `linear`'s own parameters (no copy), without an activation."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.channel_first = getattr(linear, "channel_first", False)
        m.init_std = getattr(linear, "init_std", 0.02)
        m.weight, m.bias = linear.weight, linear.bias
        m.act, m.epilogue = None, ("none", [], "")
        m.training = linear.training
        m.__dict__["packed"] = None
        return m

    def take(self, act: nn.Module) -> None:
        """Run activation `act` (one `epilogue_of` knows) after the linear, in the same kernel."""
        self.act, self.epilogue = act, epilogue_of(act)

    def __getstate__(self):  # a copy packs its weight again (oneDNN's tensors do not copy)
        return {**self.__dict__, "packed": None}

    def forward(self, x):
        # channels first: oneDNN where ChannelLinear itself would run F.linear on the moved axes
        # (one map, or a channels-last one); a batch of contiguous maps stays a 1x1 conv there
        if on_onednn_path(x) and not (self.channel_first and x.shape[0] > 1 and x.is_contiguous()) \
                and x.numel() * self.out_features >= (MIN_MACS if self.act is None else MIN_MACS_FUSED):
            attr, scalars, algorithm = self.epilogue
            if self.channel_first:
                return torch.ops.mkldnn._linear_pointwise(x.movedim(1, -1), self._packed(), self.bias, attr, scalars,
                                                          algorithm).movedim(-1, 1)
            return torch.ops.mkldnn._linear_pointwise(x, self._packed(), self.bias, attr, scalars, algorithm)
        y = super().forward(x)
        return y if self.act is None else self.act(y)

    def repack(self) -> None:
        """Pack the weight again at the next call (after an edit torch does not record: `.data`)."""
        self.__dict__["packed"] = None

    def _packed(self):
        """The weight in oneDNN's layout, made again when the weight changed (a load_state_dict, a
        move) since it was made."""
        w = self.weight
        key = (w._version, w.data_ptr())
        kept = self.packed
        if kept is None or kept[0] != key:
            kept = self.__dict__["packed"] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        return kept[1]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed"
