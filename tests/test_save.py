"""Self-describing checkpoints (issue 16, item 4): `composer.save(model, folder)` writes config.json,
model.safetensors, README.md and the blueprint files under blueprint/; `composer.build(folder)`
rebuilds the same model with the same weights from the folder alone (no zoo lookup, no installed
standard library: both are switched off here), wherever the folder is moved; a changed blueprint
is a warning, and one that no longer fits the weights a located error."""

from __future__ import annotations

import json
import subprocess
import sys
import shutil
from pathlib import Path

import pytest
import torch

import composer
import composer.loader
from composer.cli import main
from helpers import REPO


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = composer.build("convnext_atto", num_classes=10, img_size=32, seed=3).eval()
    folder = tmp_path_factory.mktemp("save") / "atto"
    composer.save(model, folder)
    return model, folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No zoo lookup and no installed standard library: only the folder's own files."""
    monkeypatch.setattr(composer.api, "zoo_index", lambda: pytest.fail("looked up the zoo"))
    monkeypatch.setattr(composer.loader, "BLUEPRINTS_DIR", tmp_path / "no-stdlib")


def _same(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_the_folder_is_a_model_repository(saved):
    model, folder = saved
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    # convnext.arch imports lib/convnets, which imports "lib/metaformer" from inside lib/
    assert files == ["README.md", "blueprint/convnext.arch", "blueprint/lib/convnets.arch",
                     "blueprint/lib/lib/metaformer.arch", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    c = config["composer"]
    assert config["architecture"] == c["model"] == "convnext_atto"
    assert c["overrides"] == {"num_classes": 10, "img_size": 32}
    assert c["arguments"]["dims"] == [40, 80, 160, 320]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["num_classes"] == 10
    assert c["input"] == {"kind": "image", "channels": 3, "size": [32, 32]}
    assert c["params"] == sum(p.numel() for p in model.parameters())
    zoo = Path(composer.load("convnext_atto").file)
    assert (folder / "blueprint/convnext.arch").read_text() == zoo.read_text()  # verbatim
    assert (folder / "README.md").read_text().startswith("---\nlibrary_name: arch-composer")


def test_build_from_the_folder_gives_the_same_model(saved, offline, tmp_path):
    model, folder = saved
    x = torch.randn(2, 3, 32, 32)
    _same(model, composer.build(str(folder)), x)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, moved)
    _same(model, composer.build(str(moved)), x)
    assert composer.load(str(moved)).params == model.plan.params  # the plan, without torch


def test_timm_keywords_set_after_the_build_are_rebuilt(tmp_path):
    """timm's drop_rate, global_pool and drop_path_rate (edits of the plan after the blueprint) come
    back from the folder: the head's dropout and pooling mode, and the per-block drop-path rates."""
    import composer.timm  # noqa: F401  (registers the zoo)
    import timm

    model = timm.create_model("composer_convnext_atto", num_classes=10, img_size=32, drop_rate=0.25,
                              global_pool="max", drop_path_rate=0.1)
    composer.save(model, tmp_path / "m")
    again = composer.build(str(tmp_path / "m"))
    p = again.plan
    assert p.head_edits == {"drop_rate": 0.25, "global_pool": "max"}
    drops = [m.p for m in again.head.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.25]
    pools = [s.op.mode for s in _op_steps(p.head.steps) if s.op.name == "global_pool"]
    assert pools == ["max"]
    n = len(p.drop_path)  # linspace(0, 0.1) over the blocks, written out here
    assert n == 12 and all(abs(r - 0.1 * i / (n - 1)) < 1e-9 for i, r in enumerate(p.drop_path))
    x = torch.randn(1, 3, 32, 32)
    _same(model, again, x)


def _op_steps(steps):
    for s in steps:
        yield s
        for attr in ("body", "shortcut"):
            yield from _op_steps(getattr(s, attr, None) or [])
        for b in getattr(s, "branches", None) or []:
            yield from _op_steps(b)


def test_cli_check_and_build_take_the_folder(saved, offline, capsys):
    model, folder = saved
    assert main(["check", str(folder)]) == 0
    assert f"ok  {folder} (saved convnext_atto)  {model.plan.params:,} params" in capsys.readouterr().out
    assert main(["build", str(folder)]) == 0
    assert "output (1, 10)" in capsys.readouterr().out


def test_a_changed_blueprint_is_located(saved, tmp_path):
    _, folder = saved
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    main_file = copy / "blueprint/convnext.arch"
    text = main_file.read_text()
    assert "dims = [40, 80, 160, 320]" in text
    main_file.write_text(text.replace("dims = [40, 80, 160, 320]", "dims = [40, 80, 160, 256]"))
    with pytest.warns(composer.ComposerWarning, match="changed since the model was saved"):
        with pytest.raises(composer.ComposerError) as exc:
            composer.build(str(copy))
    d = exc.value.diagnostics[0]
    assert d.code == "weights" and "the blueprint gives [256" in d.message
    assert d.span is not None and Path(d.span.file).resolve().parent.parent == copy.resolve()
    main_file.write_text(text.replace("model convnext_atto", "model convnext_atto {"))  # no longer parses
    with pytest.warns(composer.ComposerWarning), pytest.raises(composer.ComposerError) as exc:
        composer.build(str(copy))
    assert Path(exc.value.diagnostics[0].span.file).resolve() == main_file.resolve()


def test_a_user_blueprint_with_its_import_travels(tmp_path, offline):
    src = tmp_path / "src"
    (src / "parts").mkdir(parents=True)
    (src / "parts" / "blocks.arch").write_text(
        "block conv_bn(dim, stride = 1) {\n    conv(dim, 3, stride = stride, bias = false)\n"
        "    batchnorm as bn\n    relu\n}\n")
    (src / "net.arch").write_text(
        'import "parts/blocks"\n\nmodel net(num_classes = 10, width = 8) {\n    input image(3, 32)\n'
        "    stem conv_bn(width, stride = 2)\n    stages for i in 0..2 {\n"
        "        repeat 1 conv_bn(width * (i + 1), stride = 2)\n    }\n"
        '    head { global_pool("avg"); classifier(num_classes) }\n}\n')
    model = composer.build(str(src / "net.arch"), width=4, in_chans=1, seed=5)
    model.reset_classifier(3)
    composer.save(model, tmp_path / "saved")
    shutil.rmtree(src)
    config = json.loads((tmp_path / "saved/config.json").read_text())
    assert config["composer"]["overrides"] == {"width": 4, "num_classes": 3, "in_chans": 1}
    _same(model, composer.build(str(tmp_path / "saved")), torch.randn(1, 1, 32, 32))


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    model = composer.build("convnext_atto", img_size=32)
    model.stem.patch_embed.proj = torch.nn.Conv2d(3, 40, 2, 2)  # no longer what the blueprint gives
    with pytest.raises(composer.ComposerError) as exc:
        composer.save(model, tmp_path / "x")
    assert exc.value.diagnostics[0].code == "save-mismatch"
    assert not (tmp_path / "x").exists()
    with pytest.raises(composer.ComposerError, match="takes a model composer built"):
        composer.save(torch.nn.Linear(2, 2), tmp_path / "y")


def test_check_reads_the_folder_without_torch(saved):
    _, folder = saved
    code = ("import sys; sys.modules['torch'] = None\nfrom composer.cli import main\n"
            f"sys.exit(main(['check', {str(folder)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(saved convnext_atto)" in out.stdout


@pytest.mark.parametrize("section", [
    {"model": "m", "blueprint": "blueprint/m.arch", "overrides": [], "format": 1},
    {"model": "m", "blueprint": "blueprint/m.arch", "overrides": {"a": {"expr": 3}}, "format": 1},
    {"model": "m", "blueprint": "blueprint/m.arch", "overrides": {}, "files": ["x"], "format": 1},
])
def test_a_damaged_config_is_a_user_error(tmp_path, capsys, section):
    """A hand-edited config.json with the wrong types: exit 2 with a message, not a traceback."""
    import json

    from composer.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"composer": section}))
    assert main(["check", str(tmp_path)]) == 2
    assert "not a composer config" in capsys.readouterr().err


def test_every_op_class_pickles_by_its_name():
    """pickle finds a class by module and name: the activations made in a loop (ops/act.py) are
    module attributes too, or `torch.save(model)` fails on the model's plan."""
    import pickle

    from composer.ops import OPS

    for name, cls in OPS.items():
        assert pickle.loads(pickle.dumps(cls)) is cls, name


@pytest.mark.parametrize("optimized", [False, True])
def test_torch_save_of_the_whole_model_loads_back_equal(tmp_path, optimized):
    """`torch.save(model)` (the module itself, not its state_dict) and `torch.load(...,
    weights_only=False)` give a model with the same logits, also in its optimised form."""
    model = composer.build("vit_ti", img_size=64, depth=1).eval()
    if optimized:
        model.optimize()
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(composer.InputSizeError):  # the plan came along: it still checks sizes
        again(torch.randn(1, 3, 65, 65))
