"""Routing: a sparsely gated mixture of experts over branches (Shazeer et al. 2017, "Outrageously
Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer"; Pathformer's adaptive
pathways). The experts and the router are ordinary branches of a `parallel concat`; this op reads
the router's logits and the experts' outputs from the concatenated channels and mixes them."""


from typing import Literal

from ..shapes import Shape, ShapeError
from .registry import NonNegFloat, Op, Pos, op


@op("top_k_mixture", category="gating")
class TopKMixture(Op):
    """Noisy top-k gating over `experts` branches, per sample (a sparse mixture of experts).

    The input's channels are, in order: `experts` router logits, then (with `noisy`) `experts` raw
    noise scales, then the `experts` outputs of C channels each (E * C): what
    `parallel concat { router; expert_1; ...; expert_E }` gives. The router's channels are averaged
    over every position (grid and class tokens), so a router that ends in a per-sample vector
    broadcast over the grid (`resize(..., mode = "nearest")` of a 1x1 map) gives its logits back
    exactly. Per sample: logits = clean (eval) or clean + N(0, 1) * (softplus(raw) + `noise_eps`)
    (training with `noisy`); the `k` largest logits get softmax weights, the other experts weight 0.
    `combine = "sum"`: y = sum_e g_e y_e; `combine = "log_exp"`: y = log(sum_e g_e exp(y_e)), exact
    zeros replaced by the float64 machine epsilon before the log (the combine of the original
    MoE dispatcher, which Pathformer keeps). The output has C channels and the input's layout/grid.

    Static: the shapes, and that every expert is computed for every sample (dense; an expert whose
    gate is 0 contributes nothing, so the output equals the sparse dispatch). Data-dependent: which
    `k` experts weight each sample, and their weights. After a training forward, the module's
    `balance_loss` holds `loss_coef * (cv^2(importance) + cv^2(load))` (importance = the gates
    summed over the batch; load = the count of samples routed to each expert, or with noisy
    training and k < experts the smooth estimate P(expert in the top k) under the noise), for the
    training loop to add. No parameters (the router's and experts' are their branches')."""

    experts: Pos
    k: Pos = 1
    noisy: bool = True
    combine: Literal["sum", "log_exp"] = "sum"
    noise_eps: NonNegFloat = 1e-2
    loss_coef: NonNegFloat = 1e-2

    def gate_channels(self) -> int:
        return self.experts * (2 if self.noisy else 1)

    def infer(self, x: Shape) -> Shape:
        if self.experts < 1:
            raise ShapeError(f"top_k_mixture needs at least 1 expert, got {self.experts}")
        if not 1 <= self.k <= self.experts:
            raise ShapeError(f"top_k_mixture k must be in [1, {self.experts}], got {self.k}")
        g = self.gate_channels()
        rest = x.channels - g
        if rest < self.experts or rest % self.experts:
            raise ShapeError(
                f"top_k_mixture over {self.experts} experts needs {g} router channels "
                f"({'logits and noise scales' if self.noisy else 'logits'}) plus {self.experts} equal expert "
                f"outputs, but the input has {x.channels} channels",
                "concatenate the router and the experts: parallel concat { router; expert; ... }")
        return x.with_(channels=rest // self.experts)

    def build(self, x, y):
        from ..layers.routing import TopKMixture as Module

        return Module(self.experts, self.k, self.noisy, self.combine, self.noise_eps, self.loss_coef,
                      channels_last=x.layout == "tokens")
