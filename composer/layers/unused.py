"""The module behind the `unused` op."""

from __future__ import annotations

from torch import nn


class Unused(nn.Module):
    """Holds `op` (its parameters count and load) and returns the input unchanged. The parameters
    are frozen (`requires_grad=False`): no loss ever reaches them, and a parameter that wants a
    gradient and never gets one stops plain DistributedDataParallel ("parameters that were not used
    in producing loss"). They stay parameters, so the count and the state_dict keys are unchanged."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op.requires_grad_(False)

    def forward(self, x):
        return x
