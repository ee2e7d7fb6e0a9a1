"""The torch side of the op library: one module per topic (`core` for linears, norms, tokens and
scales; attention, resampling, gating, position encodings, re-parameterizable convs, ...).
Importing this package imports torch: only `build` (and user code) should. `RepConv` is imported
from `composer.layers.reparam` itself: it builds on `core`, and a submodule that imports a sibling
and is imported by this package would make an import cycle (tests/test_imports.py)."""

from .embed import ConvPos, SinusoidalPos
from .gating import GLU, GRN, SqueezeExcite
from .resample import ChannelShuffle, PixelShuffle, PixelUnshuffle

__all__ = ["ChannelShuffle", "ConvPos", "GLU", "GRN", "PixelShuffle", "PixelUnshuffle", "SinusoidalPos",
           "SqueezeExcite"]
