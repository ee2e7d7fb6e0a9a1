"""The examples run: the training script trains (the loss goes down) and every blueprint in
`examples/` checks, builds and runs a forward pass."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
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


def test_train_tiny_has_a_title_docstring():
    doc = ast.get_docstring(ast.parse((EXAMPLES / "train_tiny.py").read_text()))
    assert doc and doc.splitlines()[0].strip()


def test_train_tiny_loss_goes_down():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_tiny.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"initial_loss=([0-9.eE+-]+) final_loss=([0-9.eE+-]+)", proc.stdout)
    assert m, proc.stdout
    initial, final = float(m.group(1)), float(m.group(2))
    assert final < initial, proc.stdout
    steps = [float(x) for x in re.findall(r"train loss ([0-9.]+)", proc.stdout)]
    assert len(steps) >= 2


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
