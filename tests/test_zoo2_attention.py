"""Zoo II attention families (MODELS.md rows 23, 35, 44, 49): the BUILT model's parameter count
against the official code's own count, a forward pass of every model, and the fixed input size of
TransNeXt.

The expected figures are those of shared/MODELS.md and, for the larger variants, the official model
files (rayleizhu/BiFormer, JIAOJIAYUASD/dilateformer, LeapLabTHU/Agent-Attention,
DaiShiResearch/TransNeXt) instantiated unmodified and counted with sum(p.numel()); they are written
here as numbers. Where MODELS.md rounds to the thousand (rows 35, 44, 49) the exact official count
is written, and the test also checks it against the rounded figure.
"""

import pytest
import torch
from helpers import n_params

import composer

# (model, MODELS.md figure or None, tolerance of that figure, exact official count): every row is exact
ROWS = [
    ("biformer_t", 13_142_760, 0, 13_142_760),  # row 23
    ("dilateformer_tiny", 17_239_000, 1_000, 17_238_744),  # row 49
    ("agent_pvt_t", 11_570_000, 1_000, 11_570_352),  # row 44
    ("agent_swin_t", None, 0, 28_902_964),  # row 44, second member
    ("transnext_micro", 12_809_000, 1_000, 12_809_304),  # row 35
]

# Larger variants (official counts), counted torch-free (tests/test_zoo.py checks that this rule
# equals the built module).
LARGER = [
    ("biformer_s", 25_536_232),
    ("biformer_b", 56_804_968),
    ("dilateformer_small", 24_057_504),
    ("dilateformer_base", 47_432_376),
    ("agent_pvt_s", 20_635_066),
    ("agent_pvt_m", 35_921_746),
    ("agent_pvt_l", 48_738_180),
    ("agent_swin_s", 49_666_684),
    ("agent_swin_b", 88_095_096),
    ("transnext_tiny", 28_258_960),
]

FAMILIES = ["biformer", "dilateformer", "agent_pvt", "agent_swin", "transnext"]


@pytest.mark.parametrize("name,figure,tol,official", ROWS, ids=[r[0] for r in ROWS])
def test_built_param_count(name, figure, tol, official):
    count = n_params(composer.build(name))
    assert count == official, f"{name}: {count:,} (official {official:,})"
    if figure is not None:
        assert abs(count - figure) <= tol  # and within MODELS.md's rounding


@pytest.mark.parametrize("name,official", LARGER, ids=[r[0] for r in LARGER])
def test_larger_variant_param_count(name, official):
    assert composer.load(name).params == official


def _family_models():
    from composer.api import zoo_index

    names = sorted(n for n in zoo_index() if any(n.startswith(f + "_") for f in FAMILIES))
    assert len(names) >= 14
    return names


def _small_kwargs(name):
    """64 pixels where the model allows it. BiFormer's 7x7 regions must divide every stage's grid
    (multiples of 224); TransNeXt is built for its `train_size`, so it is built for 64."""
    if name.startswith("biformer"):
        return {}
    if name.startswith("transnext"):
        return {"train_size": 64}
    return {"img_size": 64}


@pytest.mark.parametrize("name", _family_models())
def test_forward(name):
    model = composer.build(name, num_classes=7, **_small_kwargs(name)).eval()
    plan = model.plan
    assert n_params(model) == plan.params
    with torch.no_grad():
        y = model(torch.randn(2, 3, *plan.input.spatial))
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_transnext_rejects_other_input_sizes():
    with pytest.raises(composer.ComposerError) as exc:
        composer.load("transnext_micro", img_size=256)
    span = exc.value.diagnostics[0].span
    assert span.file.endswith("transnext.arch") and "let fixed = require(" in exc.value.render()
    assert "img_size = train_size" in exc.value.render()
    assert composer.load("transnext_micro", train_size=256).input.spatial == (256, 256)


def test_biformer_regions_must_divide_the_grid():
    with pytest.raises(composer.ComposerError) as exc:
        composer.load("biformer_t", img_size=256)
    assert exc.value.diagnostics[0].span.file.endswith("biformer.arch")
    assert "routed regions 7 does not divide" in exc.value.render()
