"""The examples run: every blueprint in `examples/` checks, builds and runs a forward pass (the
training script is tested in tests/test_train.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import composer
from composer import resolve

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
BLUEPRINTS = sorted(EXAMPLES.glob("*.arch"))


def test_examples_are_listed_in_readme():
    readme = (EXAMPLES / "README.md").read_text()
    for path in [*BLUEPRINTS, *EXAMPLES.glob("*.py")]:
        assert path.name in readme, f"{path.name} is not in examples/README.md"


@pytest.mark.parametrize("name", ["train.py", "train_ckpt.py"])
def test_training_scripts_have_a_title_docstring(name):
    """The scripts themselves run in tests/test_train.py (DDP, FSDP2, resume)."""
    doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
    assert doc and doc.splitlines()[0].strip()


@pytest.mark.parametrize("path", BLUEPRINTS, ids=lambda p: p.name)
def test_example_blueprint_checks_and_builds(path):
    import torch

    names = [m.name for m in resolve.load(path).file.models]
    assert names
    for name in names:
        plan = composer.load(f"{path}:{name}")
        model = composer.build(f"{path}:{name}")
        model.eval()
        x = torch.randn(1, plan.input.channels, *plan.input.spatial)
        with torch.no_grad():
            y = model(x)
        assert y.shape == (1, model.num_classes)
        assert sum(p.numel() for p in model.parameters()) == plan.params


def test_ecg_example_is_one_dimensional():
    plan = composer.load(f"{EXAMPLES / 'ecg_1d.arch'}:ecg_1d")
    assert plan.input_kind == "signal"
    assert (plan.input.channels, plan.input.spatial) == (12, (5000,))
    features = composer.build(f"{EXAMPLES / 'ecg_1d.arch'}:ecg_1d", features_only=True)
    import torch

    maps = features(torch.randn(2, 12, 5000))
    assert all(m.ndim == 3 for m in maps)
    assert [m.shape[1] for m in maps] == [f["num_chs"] for f in features.feature_info]
