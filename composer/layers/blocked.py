"""A run of a built model's instructions on oneDNN's blocked memory layout (`BlockedRun`, made by
composer/optimize_layout.py for `model.optimize(layout="blocked")`).

A CPU convolution called on an ordinary (strided) map copies it into oneDNN's blocked layout,
its weight into the kernel's own layout, and its output back, on every call. A run of convs,
ReLUs, pools and residual sums kept in the blocked layout (`Tensor.to_mkldnn()`) does those
copies once per run, and each weight's once per weight: ResNet-50 on one thread runs at about
0.8-0.9x. The run holds its steps' modules by reference: the model's parameters, state_dict and
`.to()` are as they were. Its callers take it only where the blocked path exists and gives the
same numbers (`on_blocked_path`: a float32 CPU map, autograd off, not traced or compiled), and
run their ordinary code otherwise (a GPU, half precision, autograd, torch.compile, export).
"""

from __future__ import annotations

import torch
from torch import nn

from .packed import on_onednn_path

CONV, MODULE, RESIDUAL, SUM = range(4)


def on_blocked_path(x) -> bool:
    """Whether a run may take map `x`: a 2-d map where oneDNN's kernels may (float32 on the CPU,
    autograd off, not traced or compiled)."""
    return x.dim() == 4 and on_onednn_path(x)


class BlockedRun(nn.Module):
    """`steps`: (CONV, conv), (MODULE, module), (RESIDUAL, body steps, shortcut steps) or
    (SUM, [branch steps, ...]); modules that are kept outside this one's registry. `packed`: the
    packed weights, shared by the runs of one model (id(conv) -> (weight's version and address,
    packed weight)). Called only where `on_blocked_path` holds."""

    def __init__(self, steps: tuple, packed: dict | None = None):
        super().__init__()
        self.__dict__["steps"] = steps  # not submodules: their parameters stay where they are
        self.__dict__["packed"] = {} if packed is None else packed

    def __getstate__(self):  # a copy packs its weights again (blocked tensors do not copy)
        return {**self.__dict__, "packed": {}}

    def forward(self, x):
        y = self._blocked(self.steps, x.to_mkldnn())
        return y.to_dense() if y.is_mkldnn else y

    def _blocked(self, steps, x):
        for step in steps:
            kind = step[0]
            if kind == CONV:
                conv = step[1]
                if not x.is_mkldnn:
                    x = x.to_mkldnn()
                x = torch.mkldnn_convolution(x, self._weight(conv), conv.bias, conv.padding, conv.stride,
                                             conv.dilation, conv.groups)
            elif kind == MODULE:
                x = step[1](x)
            elif kind == RESIDUAL:
                short = self._blocked(step[2], x) if step[2] else x
                x = _add(short, self._blocked(step[1], x))
            else:
                outs = [self._blocked(b, x) for b in step[1]]
                x = outs[0]
                for o in outs[1:]:
                    x = _add(x, o)
        return x

    def _weight(self, conv):
        """`conv`'s weight in the kernel's layout, made again when the weight changed (a
        load_state_dict, a move) since it was made."""
        w = conv.weight
        key = (w._version, w.data_ptr())
        kept = self.packed.get(id(conv))
        if kept is None or kept[0] != key:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.detach().to_mkldnn(), conv.padding, conv.stride,
                                                               conv.dilation, conv.groups)
            kept = self.packed[id(conv)] = (key, packed)
        return kept[1]

    def extra_repr(self) -> str:
        return f"{len(self.steps)} steps on the blocked layout"


def _add(a, b):
    """a + b; on the blocked layout where both are blocked maps of one shape (oneDNN's sum does
    not broadcast), else on ordinary maps."""
    if a.is_mkldnn and b.is_mkldnn and a.shape == b.shape:
        return a + b
    return (a.to_dense() if a.is_mkldnn else a) + (b.to_dense() if b.is_mkldnn else b)

