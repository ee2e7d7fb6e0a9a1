"""The model-level settings that say how inputs are prepared for the model (timm's data config):

    input_mean = [0.5, 0.5, 0.5]     # per channel, after scaling to [0, 1]
    input_std = [0.5, 0.5, 0.5]
    crop_pct = 0.9                    # the center crop's share of the resized image at evaluation
    interpolation = "bicubic"         # how images are resized

Each is optional, inherited by variants and overridable like a parameter (`--set crop_pct=1.0`,
`build(..., input_mean=[0.5] * 3)`). The plan carries the ones given (`Plan.preprocess`); the
built model's `pretrained_cfg` uses them instead of timm's defaults."""

from __future__ import annotations

import math

from .diagnostics import error
from .expr import evaluate, type_name

SETTINGS = ("input_mean", "input_std", "crop_pct", "interpolation")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # timm's (PIL's) names
KEYS = {"input_mean": "mean", "input_std": "std", "crop_pct": "crop_pct", "interpolation": "interpolation"}


def preprocess_settings(settings: dict, scope, channels: int) -> dict:
    """The preprocessing settings of a model (`settings`: name -> ast.Assign), checked, as timm's
    data-config keys (mean, std, crop_pct, interpolation); only those the blueprint gives."""
    out = {}
    for name in SETTINGS:
        if name not in settings:
            continue
        span = settings[name].value.span
        value = evaluate(settings[name].value, scope)
        if name in ("input_mean", "input_std"):
            numbers = value if isinstance(value, list) else None
            if numbers is None or not numbers or not all(_number(v) for v in numbers):
                raise error("type", f"{name} must be a list of numbers, one per input channel, got "
                            f"{type_name(value)}", span, f"e.g. {name} = [0.5, 0.5, 0.5]")
            if len(numbers) != channels:
                raise error("value", f"{name} has {len(numbers)} values, but the input has {channels} channels",
                            span, "give one value per input channel")
            if name == "input_std" and not all(v > 0 for v in numbers):
                raise error("value", f"input_std must be positive, got {numbers}", span)
            value = tuple(float(v) for v in numbers)
        elif name == "crop_pct":
            if not _number(value) or not 0 < value <= 1:
                raise error("value", f"crop_pct must be a number above 0 and at most 1, got {value!r}", span,
                            "the share of the resized image kept by the center crop, e.g. 0.875")
            value = float(value)
        elif value not in INTERPOLATIONS:
            raise error("value", f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {value!r}", span)
        out[KEYS[name]] = value
    return out


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
