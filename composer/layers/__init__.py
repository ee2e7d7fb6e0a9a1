"""Torch modules behind the op library's newer ops (resampling, gating, position encodings,
re-parameterizable convs). The core modules live in `composer.modules`. Importing this package
imports torch: only `build` (and user code) should."""

from .embed import ConvPos, SinusoidalPos
from .gating import GLU, GRN, SqueezeExcite
from .reparam import RepConv, fuse_model
from .resample import ChannelShuffle, PixelShuffle, PixelUnshuffle

__all__ = ["ChannelShuffle", "ConvPos", "GLU", "GRN", "PixelShuffle", "PixelUnshuffle", "RepConv", "SinusoidalPos",
           "SqueezeExcite", "fuse_model"]
