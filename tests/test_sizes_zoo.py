"""Input sizes across the zoo (issue 13): MobileViT at sizes that are not multiples of its patches
(timm's MobileViT block resizes the map to a multiple and back: `fit = "interpolate"`), every
zoo model's admitted sizes derived from its plan, and one model per family (the first model of
each blueprint file) run at its smallest admitted size, refused just outside its rule, and as a
`features_only` backbone at dense prediction sizes."""

from __future__ import annotations

import functools
import os

import pytest
import torch

import composer
from composer.api import zoo_index
from composer.port import from_timm
from composer.sizes import admits, axis_rule, replan, rule_text
from helpers import FAMILY_SAMPLE, perturb, write

timm = pytest.importorskip("timm")

ZOO = zoo_index()
SMALL = dict(FAMILY_SAMPLE.values())  # one small model per family (tests/helpers.py): model -> arguments
SAMPLE = sorted(SMALL)


# ---- MobileViT: timm's logits at 224 (its reference's own size: 7x7 in the last stage, not a
# multiple of the 2x2 patches) and at non-square sizes

@pytest.mark.parametrize("size", [(224, 224), (192, 320), (200, 232)])
def test_mobilevit_follows_timm_at_sizes_that_are_not_multiples_of_its_patches(size):
    torch.manual_seed(0)
    ref = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10).eval()
    perturb(ref)
    ours = composer.build("mobilevit_xxs", num_classes=10).eval()  # built at 256
    assert from_timm(ours, ref.state_dict()).ok
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (2, 10)
    assert (a - b).abs().max().item() < 1e-4


def test_mobilevit_admits_every_size_and_divide_still_needs_multiples(tmp_path):
    plan = composer.load("mobilevit_xxs")
    assert admits(plan, (224, 224)) is None and admits(plan, (97, 130)) is None

    path = write(tmp_path, """
model m {
    input image(3, 16)
    stage { block { patches_to_batch(2); linear(8) as fc; batch_to_patches(2) } }
}
""")
    small = composer.load(str(path))
    assert admits(small, (32, 32)) is None
    assert "does not divide" in admits(small, (17, 17))


def test_fold_back_with_another_fit_is_refused(tmp_path):

    path = write(tmp_path, """
model m {
    input image(3, 16)
    stage { block { patches_to_batch(2, fit = "interpolate"); linear(8) as fc; batch_to_patches(2) } }
}
""")
    with pytest.raises(composer.ComposerError, match="same fit"):
        composer.load(str(path))


# ---- every zoo model: the admitted sizes in words (torch-free)

@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_model_admits_its_build_size(name):
    plan = composer.load(name)
    assert admits(plan, plan.input.spatial) is None
    if os.environ.get("COMPOSER_ALL_SIZES"):  # rule_text probes 2 x 448 sizes: 1 to 10 s a model
        assert rule_text(plan)
    elif name in SAMPLE:  # the family's rule at its small build size (probed once, shared below)
        assert _rules(name)[2].text()


# ---- one model per family: smallest admitted size, just outside, dense prediction

@functools.cache
def _rules(name):
    """(build kwargs, plan, rule of the first axis probed up to the build size)."""
    kwargs = SMALL[name]
    plan = composer.load(name, **kwargs)
    return kwargs, plan, axis_rule(plan, 0, limit=plan.input.spatial[0])


def _square(plan, n) -> tuple:
    return (n,) * len(plan.input.spatial)


def _smallest(name) -> tuple:
    _, plan, rule = _rules(name)
    low = rule.build if rule.fixed else (rule.irregular[0] if rule.irregular else rule.low)
    size = _square(plan, low)
    return size if admits(plan, size) is None else tuple(plan.input.spatial)


def _outside(name):
    """A size just outside the rule (None when every size from 1 is admitted)."""
    _, plan, rule = _rules(name)
    if rule.fixed:
        n = rule.build + 1
    elif rule.step > 1 and not rule.irregular:
        n = rule.low + 1
    elif (rule.irregular[0] if rule.irregular else rule.low) > 1:
        n = (rule.irregular[0] if rule.irregular else rule.low) - 1
    else:
        return None
    return _square(plan, n)


def _calls(model):
    count = [0]
    for m in model.modules():
        if not list(m.children()):
            m.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


# admitted by composer.sizes but failing when run: the plan at that size is valid, the module is not
# (found by these tests; each needs its op to refuse the size or to follow the grid)
BROKEN: dict = {}  # families the size check admits at a size where they then fail (none now)


def _cases(names, ids=None):
    return [pytest.param(n, id=ids(n) if ids else n,
                         marks=[pytest.mark.xfail(reason=BROKEN[n], strict=True)] if n in BROKEN else [])
            for n in names]


@pytest.mark.parametrize("name", _cases(SAMPLE))
def test_family_runs_at_its_smallest_size_and_refuses_one_outside(name):
    kwargs, plan, rule = _rules(name)
    model = composer.build(name, **kwargs).eval()
    size = _smallest(name)
    with torch.no_grad():
        y = model(torch.randn(1, plan.input.channels, *size))
    assert torch.isfinite(y if torch.is_tensor(y) else y[0]).all()
    out = _outside(name)
    if out is None:
        assert rule.low == 1 and not rule.fixed
        return
    assert admits(plan, out) is not None
    count = _calls(model)
    with pytest.raises(composer.InputSizeError), torch.no_grad():
        model(torch.randn(1, plan.input.channels, *out))
    assert count[0] == 0  # refused at the entry, before any module ran


DENSE = [(512, 384), (640, 448)]  # two non-square sizes of dense prediction (test_sizes.py: 800x608 on ResNet-50)


def _nearest(rule, n) -> int:
    if rule.irregular:
        return min(rule.irregular, key=lambda m: abs(m - n))
    k = max(0, round((n - rule.low) / rule.step))
    return rule.low + k * rule.step


def _dense_case(name):
    _, plan, rule = _rules(name)
    if len(plan.input.spatial) != 2:
        return "not an image model", None
    if rule.fixed:
        return "fixed-size", None
    sizes = [tuple(_nearest(rule, n) for n in size) for size in DENSE]
    if any(admits(plan, s) is not None for s in sizes):
        return "refuses dense sizes", None
    return "x".join(map(str, sizes[0])) + "+" + "x".join(map(str, sizes[1])), sizes


DENSE_CASES = _cases(SAMPLE, lambda name: f"{name}-{_dense_case(name)[0]}")


@pytest.mark.parametrize("name", DENSE_CASES)
def test_family_features_at_dense_prediction_sizes(name):
    """Features at dense-prediction sizes have the shapes inferred there (stage outputs, or the
    model's named outputs); a family whose rule does not admit them refuses them at the entry."""
    why, sizes = _dense_case(name)
    kwargs, plan, _ = _rules(name)
    if sizes is None:
        if why == "not an image model":
            assert len(plan.input.spatial) != 2
            return
        _, _, rule = _rules(name)
        near = [tuple(_nearest(rule, n) for n in size) for size in DENSE] if not rule.fixed else []
        bad = next(s for s in DENSE + near if admits(plan, s) is not None)
        model = composer.build(name, features_only=True, **kwargs).eval()
        with pytest.raises(composer.InputSizeError), torch.no_grad():
            model(torch.randn(1, plan.input.channels, *bad))
        return
    model = composer.build(name, features_only=True, **kwargs).eval()
    for size in sizes:
        with torch.no_grad():
            feats = model(torch.randn(1, plan.input.channels, *size))
        other = replan(plan, size)
        if plan.outputs:
            expected = [other.saved[n] for n in plan.outputs]
        elif plan.features == "blocks":  # `feature_points = "blocks"`: every block's output (plain transformers)
            expected = [b.y for st in other.stages for b in st.blocks]
        else:
            expected = [st.y for st in other.stages]
        assert [tuple(f.shape[1:]) for f in feats] == [(y.channels, *y.spatial) for y in expected]
