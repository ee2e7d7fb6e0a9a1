"""The ten pilot variants: exact parameter counts against timm, built and run.

The expected numbers come from timm itself (a model built in the test), never from composer."""

import pytest
import torch

import composer
from helpers import n_params

timm = pytest.importorskip("timm")

PILOTS = {
    "vit_ti": "vit_tiny_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "swin_s": "swin_small_patch4_window7_224",
    "convnext_atto": "convnext_atto",
    "convnext_t": "convnext_tiny",
    "pvt_v2_b0": "pvt_v2_b0",
    "pvt_v2_b1": "pvt_v2_b1",
    "poolformer_s12": "poolformer_s12",
    "caformer_s18": "caformer_s18",
}


@pytest.mark.parametrize("name", PILOTS)
def test_param_count_equals_timm(name):
    with torch.device("meta"):
        reference = n_params(timm.create_model(PILOTS[name], pretrained=False))
    plan = composer.load(name)
    assert plan.params == reference  # the torch-free rule
    assert n_params(composer.build(name, device="meta")) == reference  # the built module
    assert plan.reference == f"timm:{PILOTS[name]}"


@pytest.mark.parametrize("name", ["vit_ti", "swin_t", "convnext_atto", "pvt_v2_b0", "poolformer_s12", "caformer_s18"])
def test_builds_and_runs(name):
    model = composer.build(name, num_classes=7).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 224, 224))
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_swin_family_file_is_short():
    from composer.api import zoo_index

    lines = zoo_index()["swin_t"].read_text().splitlines()
    # the paper's table in under 20 lines, each further variant a short inheritance
    starts = [i for i, line in enumerate(lines) if line.startswith("model ")]
    assert starts[1] - starts[0] < 20 and len(starts) == 3
    assert all(b - a <= 6 for a, b in zip(starts[1:], starts[2:] + [len(lines) + 1]))
