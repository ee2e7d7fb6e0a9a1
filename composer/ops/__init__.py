"""The generic op library: importing this package registers every op (pure Python, no torch)."""

from . import act, attention, conv, embed, gating, linear, loss, norm, reparam, resample, patches, tile, tokens, tokens_extra  # noqa: F401  (registration)
from .registry import OPS, Op, op

__all__ = ["OPS", "Op", "op"]
