"""`composer export NAME --to python`: one standalone PyTorch file per model.

For one model of every parity family (the zoo families with a timm or torchvision reference,
tests/test_zoo.py's PARITY), made small (2 blocks per stage or 2 layers, 5 classes, a small input)
to keep the suite fast: the file is imported in a fresh module namespace, takes the built model's
state_dict with strict=True (the same keys), and gives its logits (eval) at the built size and at a
second admitted size; it imports torch and the standard library only (read with `ast`).
benchmarks/export_python_all.py runs the whole zoo at full size."""

import ast
import sys

import pytest
import torch

import composer
from composer.codegen import generate
from composer.codegen_file import load_source
from composer.sizes import admits

# the smallest model of each parity family, and its size override (None: the model's own)
FAMILIES = {
    "beit_b": 32, "cait_xxs24": 32, "coat_lite_mini": 64, "convit_ti": 32, "convnext_atto": 32,
    "crossvit_tiny": None, "deit_ti": 32, "efficientvit_m0": 64, "fastvit_t8": 64, "gcvit_xxt": None,
    "halonet26t": None, "inception_next_t": 64, "maxvit_t": None, "poolformer_s12": 32, "mixer_s16": 32,
    "mobilenetv2_100": 32, "mobilevit_xxs": 64, "mobilevitv2_050": 64, "mvitv2_tiny": None, "pvt_v2_b0": 64,
    "repvgg_a0": 32, "resnet18": 32, "rope_vit_b": None, "shufflenet_v2_x0_5": 32, "swin_t": None,
    "swinv2_cr_tiny": None, "twins_pcpvt_small": 64, "vit_ti": 32, "xcit_nano_12_p16": 32,
}
SHRINK = {"depth": 2, "depths": 1, "tdepths": 1, "repeats": 1}  # blocks per stage (a list: each entry)
NARROW = {"beit_b": {"dim": 192, "heads": 3}, "rope_vit_b": {"dim": 192, "heads": 3}}  # ViT-B's 768 channels


def _overrides(name, size):
    """num_classes=5, the size, and 2 layers (or 1 block per stage) where the blueprint has such a
    parameter and admits it: the same structure, fewer blocks."""
    base = {"num_classes": 5, **({"img_size": size} if size else {}), **NARROW.get(name, {})}
    over = dict(base)
    args = composer.load(name).arguments
    for key, n in SHRINK.items():
        value = args.get(key)
        if isinstance(value, int) and value > n:
            over[key] = n
        elif isinstance(value, list) and all(isinstance(v, int) for v in value):
            over[key] = [min(v, max(n, 1)) for v in value]
    try:
        composer.load(name, **over)
    except composer.ComposerError:  # the blueprint needs its depth (convit: local layers, then the rest)
        return base
    return over


def _imports(text):
    tree = ast.parse(text)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add((node.module or "").split(".")[0])
    return out


def _second_size(plan):
    for d in (32, 16, 8, 4, 1):
        other = tuple(s + d for s in plan.input.spatial)
        if admits(plan, other) is None:
            return other
    return None


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_exported_file_equals_built_model(name):
    model = composer.build(name, **_overrides(name, FAMILIES[name])).eval()
    plan = model.plan
    text = generate(plan)
    compile(text, f"{name}.py", "exec")
    assert "composer" not in _imports(text) and _imports(text) <= {"torch"} | set(sys.stdlib_module_names), \
        _imports(text)
    exported = load_source(text, name)().eval()
    assert set(exported.state_dict()) == set(model.state_dict())
    exported.load_state_dict(model.state_dict(), strict=True)
    sizes = [tuple(plan.input.spatial)]
    other = _second_size(plan)
    if other is not None:
        sizes.append(other)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(2, plan.input.channels, *size, generator=gen)
            want, got = model(x), exported(x)
            assert got.shape == want.shape == (2, 5)
            assert (want - got).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), (name, size)
    refused = _refused_size(plan)
    if refused is not None:  # the file refuses it as the built model does, before anything runs
        x = torch.randn(1, plan.input.channels, *refused)
        with pytest.raises(composer.InputSizeError):
            model(x)
        with pytest.raises(ValueError, match=f"cannot run at {'x'.join(map(str, refused))}. Admitted sizes: "):
            exported(x)
    with pytest.raises(ValueError, match=f"takes {plan.input.channels} input channels, got {plan.input.channels + 1}"):
        exported(torch.randn(1, plan.input.channels + 1, *plan.input.spatial))


def _refused_size(plan):
    """A size near the built one that the built model refuses (its check re-plans the model)."""
    build = tuple(plan.input.spatial)
    for d in (1, -1, 3, 2):
        other = (build[0] + d,) + build[1:]
        if other[0] > 0 and admits(plan, other) is not None:
            return other
    return None


@pytest.mark.parametrize("name, size", [("convnext_atto", 32), ("mobilevitv2_050", 64)])  # a step; runs
def test_the_file_admits_exactly_the_sizes_the_built_model_admits(name, size):
    """Along each axis (the other at the build size), every size from 1 to twice the build size:
    the file's check and the built model's (which plans the model again at that size) agree."""
    plan = composer.load(name, **({"img_size": size} if size else {}), num_classes=5)
    exported = load_source(generate(plan), name)()
    for axis in range(2):
        for n in range(1, 2 * plan.input.spatial[axis] + 1):
            grid = list(plan.input.spatial)
            grid[axis] = n
            x = torch.empty(1, plan.input.channels, *grid, device="meta")
            try:
                exported.check_input(x)
                said = None
            except ValueError as exc:
                said = str(exc)
            assert (said is None) == (admits(plan, tuple(grid)) is None), (name, grid, said)


def test_blocks_of_one_structure_share_a_class_with_their_differences_as_parameters():
    """convnext_atto: 4 stages of ConvNeXt blocks (widths 40, 80, 160, 320) are one block class
    whose width is a constructor argument; a block's forward is straight-line code."""
    text = generate(composer.load("convnext_atto", img_size=32))
    tree = ast.parse(text)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    blocks = [c for c in classes if c.startswith("Convnext") and c != "ConvnextAtto"]
    assert blocks == ["Convnext"], blocks
    init = next(f for f in classes["Convnext"].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assert [a.arg for a in init.args.args][:2] == ["self", "dim"]
    forward = next(f for f in classes["Convnext"].body if isinstance(f, ast.FunctionDef) and f.name == "forward")
    assert not any(isinstance(n, (ast.For, ast.While, ast.If)) for n in ast.walk(forward))
    assert "x = shortcut + x" in ast.get_source_segment(text, forward)
    for width in (40, 80, 160, 320):
        assert f"Convnext(dim={width}," in text
    assert "blueprints/convnext.arch" in text.split('"""')[1]  # the header names the blueprint


def test_cli_writes_the_file_and_refuses_an_unwritable_model(tmp_path, capsys):
    from composer.cli import main

    out = tmp_path / "r18.py"
    assert main(["export", "resnet18", "--to", "python", "-o", str(out), "--img-size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    text = out.read_text()
    assert "import composer" not in text and "from composer" not in text
    model = composer.build("repvgg_a0", img_size=32, num_classes=5, depths=[1, 1, 1, 1]).fuse()  # one conv per block:
    # its state_dict is no longer the blueprint's
    with pytest.raises(composer.ComposerError, match="state_dict"):
        composer.export(model, "python", tmp_path / "fused.py")
    assert not (tmp_path / "fused.py").exists()


def test_a_module_the_file_cannot_write_is_a_located_error(monkeypatch):
    """A module from outside torch and composer's layers (here a class of this test) cannot be
    written into a standalone file: refused with the blueprint's location, not a traceback."""
    from torch import nn

    from composer.ops import linear

    class Foreign(nn.Module):
        def forward(self, x):
            return x

    monkeypatch.setattr(linear.GlobalPool, "build", lambda self, x, y: Foreign())
    with pytest.raises(composer.ComposerError) as info:
        generate(composer.load("vit_ti", img_size=32))
    message = str(info.value)
    assert "vit.arch:" in message and "cannot write vit_ti as Python" in message and "Foreign" in message


def test_dynamic_img_size_follows_the_input_grid():
    """A ViT built with dynamic_img_size resamples its position table to the grid it gets: the file
    does too (checked at a size other than the built one)."""
    model = composer.build("vit_ti", img_size=32, num_classes=5, depth=1, dynamic_img_size=True).eval()
    exported = load_source(generate(model.plan, dynamic_img_size=True), "vit_dyn")().eval()
    exported.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), exported(x)
    assert (want - got).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
