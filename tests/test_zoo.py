"""Every zoo model: checks torch-free, has its reference's exact parameter count, builds and runs."""

import pytest
import torch

import composer
from composer.api import zoo_index
from helpers import n_params

timm = pytest.importorskip("timm")

ZOO = zoo_index()
TIMM_NAMES = set(timm.list_models())


def _reference(name):
    ref = composer.load(name).model.reference
    return ref.split(":", 1) if ref else (None, None)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_param_count_equals_reference(name):
    source, ref = _reference(name)
    if source != "timm" or ref not in TIMM_NAMES:
        pytest.skip(f"{name}: reference {source}:{ref} is checked elsewhere")
    with torch.device("meta"):
        expected = n_params(timm.create_model(ref, pretrained=False))
    assert composer.load(name).params == expected


def _small_size(name):
    """64 pixels where the model allows it; fixed-grid models (windows, position tables) keep theirs."""
    try:
        composer.load(name, img_size=64)
        return 64
    except composer.ComposerError:
        return None


@pytest.mark.parametrize("name", sorted(ZOO))
def test_builds_and_runs_forward(name):
    torch.set_num_threads(1)
    size = _small_size(name)
    kwargs = {"img_size": size} if size else {}
    model = composer.build(name, num_classes=5, **kwargs).eval()
    plan = model.plan
    assert n_params(model) == plan.params  # the torch-free rule agrees with the built module
    with torch.no_grad():
        y = model(torch.randn(1, plan.input.channels, *plan.input.spatial))
    assert y.shape == (1, 5) and torch.isfinite(y).all()
