"""The generic op library: importing this package registers every op (pure Python, no torch)."""

from . import act, attention, conv, embed, gating, linear, loss, norm, reparam, resample, patches, tile, tokens, tokens_extra  # noqa: F401  (registration)
from . import cluster, sampling, unfold_tokens  # noqa: F401, E402  (registration: soft clustering, deformable sampling, unfold)
from .registry import OPS, Op, op

__all__ = ["OPS", "Op", "op"]
