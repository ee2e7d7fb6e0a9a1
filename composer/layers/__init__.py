"""The torch side of the op library: one module per topic (`core` for linears, norms, tokens and
scales; attention, resampling, gating, position encodings, re-parameterizable convs, ...).
Importing this package imports torch: only `build` (and user code) should."""

from .embed import ConvPos, SinusoidalPos
from .gating import GLU, GRN, SqueezeExcite
from .reparam import RepConv, fuse_model
from .resample import ChannelShuffle, PixelShuffle, PixelUnshuffle

__all__ = ["ChannelShuffle", "ConvPos", "GLU", "GRN", "PixelShuffle", "PixelUnshuffle", "RepConv", "SinusoidalPos",
           "SqueezeExcite", "fuse_model"]
