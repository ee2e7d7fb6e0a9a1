"""composer: declarative architecture composer for deep-learning backbones.

    >>> import composer
    >>> bp = composer.load("swin_t")            # parse, resolve and infer shapes: no torch
    >>> bp.params
    28288354
    >>> model = composer.build("swin_t", num_classes=10)   # a plain nn.Module
"""

from __future__ import annotations

import importlib

__all__ = ["build", "build_loss", "check", "diff", "export", "load", "resolve_target", "save", "ComposerError", "ComposerWarning", "InputSizeError"]
__version__ = "0.1.0"

# The names above are imported when first used (PEP 562), so that a command that needs none of them
# (a `composer check` whose results are all cached) starts without the op library; so are the
# submodules (`composer.port` after a bare `import composer`).
_HOMES = {"build": "api", "build_loss": "api", "check": "api", "diff": "api", "export": "api", "load": "api",
          "resolve_target": "api", "save": "api", "ComposerError": "diagnostics", "ComposerWarning": "diagnostics",
          "InputSizeError": "sizes"}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
