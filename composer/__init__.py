"""composer: declarative architecture composer for deep-learning backbones.

    >>> import composer
    >>> bp = composer.load("swin_t")            # parse, resolve and infer shapes: no torch
    >>> bp.params
    28288354
    >>> model = composer.build("swin_t", num_classes=10)   # a plain nn.Module
"""

from __future__ import annotations

from .api import build, build_loss, check, diff, export, load, resolve_target, save
from .diagnostics import ComposerError, ComposerWarning
from .sizes import InputSizeError

__all__ = ["build", "build_loss", "check", "diff", "export", "load", "resolve_target", "save", "ComposerError", "ComposerWarning", "InputSizeError"]
__version__ = "0.1.0"
