"""Linear and convolution layers for the inference form on the CPU: oneDNN's kernels with the
weight packed once into oneDNN's own layout, and the activation that follows computed inside the
same kernel (composer/optimize_kernels.py puts them in `model.optimize()`).

PyTorch's eager `F.linear` and `F.conv2d` lay a weight out again at every call and run the
activation as a second pass over the output; torch.compile's CPU backend avoids both with the
`torch.ops.mkldnn` kernels used here (`_linear_pointwise`, `_convolution_pointwise`). These are
internal PyTorch operators: where they are missing (a build without oneDNN, another PyTorch) or
where the call is not plain float32 inference on the CPU (a GPU, another dtype, autograd, tracing
for export or compile) the layers compute the same function with the plain functional ops. The
parameters keep their names (`weight`, `bias`), so the state_dict is the plain layer's; the packed
weight is a cache, made again when the weight changes (`weight._version`) or moves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MKL = getattr(torch.ops, "mkldnn", None)
AVAILABLE = bool(torch.backends.mkldnn.is_available() and _MKL is not None
                 and hasattr(_MKL, "_linear_pointwise") and hasattr(_MKL, "_convolution_pointwise")
                 and hasattr(_MKL, "_reorder_linear_weight")
                 and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))

# an activation module -> (oneDNN's post-op name, its scalars, its algorithm) and the same in torch
ACTS = {
    nn.ReLU: lambda m: (("relu", [], ""), F.relu),
    nn.GELU: lambda m: (("gelu", [], "tanh" if m.approximate == "tanh" else "none"),
                        lambda x: F.gelu(x, approximate=m.approximate)),
    nn.SiLU: lambda m: (("swish", [], ""), F.silu),
    nn.Hardswish: lambda m: (("hardswish", [], ""), F.hardswish),
    nn.ReLU6: lambda m: (("hardtanh", [0.0, 6.0], ""), F.relu6),
    nn.Sigmoid: lambda m: (("sigmoid", [], ""), torch.sigmoid),
    nn.Tanh: lambda m: (("tanh", [], ""), torch.tanh),
    nn.LeakyReLU: lambda m: (("leaky_relu", [float(m.negative_slope)], ""),
                             lambda x: F.leaky_relu(x, m.negative_slope)),
}
NONE = (("none", [], ""), None)


def activation(module: nn.Module):
    """(post-op, torch function) for an activation module oneDNN can compute in a kernel; None
    for any other module."""
    make = ACTS.get(type(module))
    return make(module) if make is not None else None


def _fast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


class _Packed(nn.Module):
    """The parameters of the layer it replaces, its post-op, and the packed weight as a cache."""

    def __init__(self, layer: nn.Module, act):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        (self.post, self.scalars, self.algorithm), self.act = act
        self._packed = None  # (weight version, device, the packed weight)

    def _weight(self, pack):
        w = self.weight
        key = (w._version, w.data_ptr())
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                self._packed = (key, pack(w.detach()))
        return self._packed[1]

    def _plain(self, y):
        return y if self.act is None else self.act(y)

    def __getstate__(self):  # the cache is not part of a copy or a pickle
        state = super().__getstate__()
        state["_packed"] = None
        return state


class PackedLinear(_Packed):
    """`act(linear(x))` for tokens (B, ..., C): one oneDNN kernel on a packed weight."""

    def __init__(self, linear: nn.Module, act):
        super().__init__(linear, act)
        self.out_features, self.in_features = linear.weight.shape

    def forward(self, x):
        if not _fast(x, self.weight):
            return self._plain(F.linear(x, self.weight, self.bias))
        w = self._weight(lambda w: _MKL._reorder_linear_weight(w, None))
        return _MKL._linear_pointwise(x, w, self.bias, self.post, self.scalars, self.algorithm)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, post={self.post}"


class PackedConv(_Packed):
    """`act(conv(x))` for a 1-D or 2-D map, zero padding: one oneDNN kernel on a packed weight. The
    output keeps the input's memory format (oneDNN writes channels-last)."""

    def __init__(self, conv: nn.Module, act):
        super().__init__(conv, act)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.plain = F.conv1d if conv.weight.dim() == 3 else F.conv2d

    def forward(self, x):
        if not _fast(x, self.weight):
            return self._plain(self.plain(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                          self.groups))
        pad, stride, dil = list(self.padding), list(self.stride), list(self.dilation)
        w = self.weight if self.weight.dim() == 3 else self._weight(
            lambda w: torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), pad, stride, dil, self.groups))
        y = _MKL._convolution_pointwise(x, w, self.bias, pad, stride, dil, self.groups, self.post, self.scalars,
                                        self.algorithm)
        if x.dim() == 4 and x.is_contiguous() and not y.is_contiguous():
            y = y.contiguous()  # a channels-first model stays channels-first
        return y

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel={tuple(self.weight.shape[2:])}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, groups={self.groups}, post={self.post}")


class PackedChannelLinear(_Packed):
    """`act(linear over the channels of a map (B, C, *grid))` (a channel-first `ChannelLinear`): on a
    2-D map one oneDNN 1x1 convolution on a packed weight, keeping the input's memory format."""

    def __init__(self, linear: nn.Module, act):
        super().__init__(linear, act)
        self.out_features, self.in_features = linear.weight.shape

    def forward(self, x):
        if x.dim() != 4 or not _fast(x, self.weight):
            return self._plain(F.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1))
        w = self._weight(lambda w: torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.view(*w.shape, 1, 1).to_mkldnn(), [0, 0], [1, 1], [1, 1], 1))
        y = _MKL._convolution_pointwise(x, w, self.bias, [0, 0], [1, 1], [1, 1], 1, self.post, self.scalars,
                                        self.algorithm)
        if x.is_contiguous() and not y.is_contiguous():
            y = y.contiguous()
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, channels first, post={self.post}"
