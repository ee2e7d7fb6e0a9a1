"""Loss modules built from the `loss` registrations (composer/ops/loss.py)."""

from __future__ import annotations


import torch.nn.functional as F
from torch import nn


class CrossEntropy(nn.Module):
    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing)


class BinaryCrossEntropy(nn.Module):
    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits, target):
        weight = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=weight)


class Focal(nn.Module):
    def __init__(self, alpha: float | None, gamma: float, multi_label: bool):
        super().__init__()
        self.alpha, self.gamma, self.multi_label = alpha, gamma, multi_label

    def forward(self, logits, target):
        if self.multi_label:
            target = target.to(logits.dtype)
            p = logits.sigmoid()
            ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            p_t = p * target + (1 - p) * (1 - target)
            loss = ce * (1 - p_t) ** self.gamma
            if self.alpha is not None:
                loss = loss * (self.alpha * target + (1 - self.alpha) * (1 - target))
            return loss.mean()
        log_p = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
        loss = -(1 - log_p.exp()) ** self.gamma * log_p
        return (loss * self.alpha if self.alpha is not None else loss).mean()


class HardDistillation(nn.Module):
    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.alpha = alpha

    def forward(self, outputs, target, teacher_logits):
        cls_logits, dist_logits = outputs
        base = F.cross_entropy(cls_logits, target)
        distil = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
        return (1 - self.alpha) * base + self.alpha * distil


class CoarseToFine(nn.Module):
    def __init__(self, weight: float = 1.0, smoothing: float = 0.0):
        super().__init__()
        self.weight, self.smoothing = weight, smoothing

    def forward(self, outputs, target):
        coarse, fine = outputs
        ce = F.cross_entropy(fine, target, label_smoothing=self.smoothing)
        kl = F.kl_div(F.log_softmax(coarse, dim=-1), F.softmax(fine, dim=-1).detach(), reduction="batchmean")
        return ce + self.weight * kl



