"""Training objectives a blueprint can name: `loss = focal(alpha = 0.25, gamma = 2)`.

A loss is a registration like any op (parameters, docs, a lazy builder) of kind "loss": it is not
applied to a tensor of the model but built by `composer.build_loss(target)`. Every loss module is
called as `loss(logits, target, ...)` and returns the mean over the batch (a scalar)."""


from typing import Optional

from ..shapes import ShapeError
from .registry import NonNegFloat, Op, PosFloat, Probability, op


class Loss(Op):
    def check(self) -> None:
        """Reject impossible values (pure Python, at resolve time)."""

    def build_loss(self):
        raise NotImplementedError


@op("cross_entropy", kind="loss", category="loss")
class CrossEntropy(Loss):
    """Softmax cross-entropy against class indices (or class probabilities), with label smoothing
    `smoothing` in [0, 1): the target becomes (1 - s) one-hot + s / classes, as
    `F.cross_entropy(label_smoothing=s)`. The default objective of a model that names none."""

    smoothing: Probability = 0.0

    def check(self) -> None:
        if not 0.0 <= self.smoothing < 1.0:
            raise ShapeError(f"label smoothing must be in [0, 1), got {self.smoothing}")

    def build_loss(self):
        from ..layers.loss import CrossEntropy as Module

        return Module(self.smoothing)


@op("binary_cross_entropy", kind="loss", category="loss")
class BinaryCrossEntropy(Loss):
    """Multi-label objective: an independent sigmoid per class against a {0, 1} (or soft) target of
    the logits' shape, -[y log p + (1 - y) log(1 - p)] averaged over every element, computed from
    logits (`F.binary_cross_entropy_with_logits`). `pos_weight` scales the positive term."""

    pos_weight: Optional[PosFloat] = None

    def check(self) -> None:
        if self.pos_weight is not None and self.pos_weight <= 0:
            raise ShapeError(f"pos_weight must be positive, got {self.pos_weight}")

    def build_loss(self):
        from ..layers.loss import BinaryCrossEntropy as Module

        return Module(self.pos_weight)


@op("focal", kind="loss", category="loss")
class Focal(Loss):
    """Focal loss (Lin et al., 2017): -alpha_t (1 - p_t)^gamma log p_t, which down-weights easy
    examples. Single-label (`multi_label=false`): p_t is the softmax probability of the true class
    and alpha_t = `alpha` (none: 1). Multi-label (`multi_label=true`, targets of the logits' shape):
    per class a sigmoid, p_t = p where y = 1 and 1 - p where y = 0, alpha_t = alpha for positives and
    1 - alpha for negatives (none: 1 for both), as torchvision's `sigmoid_focal_loss`. Mean over
    the batch (single-label) or over every element (multi-label). gamma = 0 and alpha = none give
    cross-entropy."""

    alpha: Optional[Probability] = 0.25
    gamma: NonNegFloat = 2.0
    multi_label: bool = False

    def check(self) -> None:
        if self.gamma < 0:
            raise ShapeError(f"focal gamma must be >= 0, got {self.gamma}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ShapeError(f"focal alpha must be in [0, 1], got {self.alpha}")

    def build_loss(self):
        from ..layers.loss import Focal as Module

        return Module(self.alpha, self.gamma, self.multi_label)


@op("hard_distillation", kind="loss", category="loss")
class HardDistillation(Loss):
    """DeiT's hard-label distillation, for a model with a distillation token whose training forward
    returns (class logits, distillation logits): (1 - `alpha`) CE(class logits, labels) + `alpha`
    CE(distillation logits, argmax of the teacher's logits). Called as
    `loss((cls_logits, dist_logits), labels, teacher_logits)`; DeiT uses alpha = 0.5."""

    alpha: Probability = 0.5

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ShapeError(f"distillation alpha must be in [0, 1], got {self.alpha}")

    def build_loss(self):
        from ..layers.loss import HardDistillation as Module

        return Module(self.alpha)


@op("coarse_to_fine", kind="loss", category="loss")
class CoarseToFine(Loss):
    """CF-ViT's objective for a model trained on two passes, coarse and fine: CE(fine logits,
    labels) + `weight` KL(softmax(fine) || softmax(coarse)), the fine pass detached as the teacher
    of the coarse one (`F.kl_div(log_softmax(coarse), softmax(fine).detach(), "batchmean")`).
    Called as `loss((coarse_logits, fine_logits), labels)`; `smoothing` is the label smoothing of
    the CE term."""

    weight: NonNegFloat = 1.0
    smoothing: Probability = 0.0

    def check(self) -> None:
        if self.weight < 0 or not 0.0 <= self.smoothing < 1.0:
            raise ShapeError("coarse_to_fine needs weight >= 0 and smoothing in [0, 1)")

    def build_loss(self):
        from ..layers.loss import CoarseToFine as Module

        return Module(self.weight, self.smoothing)
