"""Variants across files (issue 16, item 2): models inherited from imported files (the zoo's by
bare name), `composer show`, model-level settings overridden like parameters (`--set drop_path=...`,
`build(drop_path_rate=...)`), Python sequences and mappings as values, a file cache that notices
edits, `composer diff` across files; the blueprint's preprocessing in timm's data config, and
timm's `reset_classifier(num_classes, global_pool)`."""

from __future__ import annotations

import inspect
import os
import stat
import types
from collections.abc import Sequence

import pytest

import composer
from composer import ComposerError, loader
from composer.cli import main
from composer.expr import from_python
from helpers import REPO, n_params, write

BP = REPO / "blueprints"
VARIANT = 'import "convnext"\nmodel mine : convnext_atto { dims = [32, 64, 128, 256]; depths = [1, 1, 2, 1] }\n'


class Seq(Sequence):
    """A sequence that is no list or tuple (as OmegaConf's ListConfig)."""

    def __init__(self, *items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# ---- inheritance across files -------------------------------------------------------------------


def test_a_zoo_model_is_a_base_in_ones_own_file(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models.convnext import ConvNeXt

    plan = composer.load(write(tmp_path, VARIANT))
    assert plan.chain == ["mine", "convnext_atto"]
    assert plan.arguments["dims"] == [32, 64, 128, 256] and plan.arguments["depths"] == [1, 1, 2, 1]
    # the same architecture, counted by timm's own class
    assert plan.params == n_params(ConvNeXt(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256), conv_mlp=True))
    assert timm  # imported for its model class


def test_bases_chain_through_several_files_and_local_names_win(tmp_path):
    write(tmp_path, "model base(w = 8) {\n  input image(3, 16)\n  stem conv(w, 3)\n  head { global_pool(); classifier(10) }\n}\n",
          "a.arch")
    write(tmp_path, 'import "a"\nmodel wide : base { w = 16 }\n', "b.arch")
    c = write(tmp_path, 'import "b"\nmodel wider : wide { w = 24 }\nmodel base(w = 4) {\n  input image(1, 16)\n'
              '  stem conv(w, 3)\n  head { global_pool(); classifier(10) }\n}\n', "c.arch")
    plan = composer.load(f"{c}:wider")
    assert plan.chain == ["wider", "wide", "base"] and plan.arguments["w"] == 24
    assert plan.input.channels == 3  # `wide`'s base is a.arch's, where it was defined
    assert composer.load(f"{c}:base").input.channels == 1


def test_an_imported_composite_calls_what_its_own_file_sees(tmp_path):
    """A block of the importing file does not reach into an imported composite that calls a block of
    the same name: lib.arch's `pair` keeps calling lib.arch's `unit` (a 3x3 conv with bias), while
    the importing file's own statements get its `unit` (a 1x1 conv without bias)."""
    write(tmp_path, "block unit(c) { conv(c, 3) }\nblock pair(c) { unit(c); unit(c) }\n", "lib.arch")
    m = write(tmp_path, 'import "lib"\nblock unit(c) { conv(c, 1, bias = false) }\n'
              "model a { input image(4, 8)\n  stem pair(4)\n  head { global_pool() } }\n"
              "model b { input image(4, 8)\n  stem unit(4)\n  head { global_pool() } }\n")
    assert composer.load(f"{m}:a").params == 2 * (4 * 4 * 3 * 3 + 4)  # lib's unit, twice: 296
    assert composer.load(f"{m}:b").params == 4 * 4  # this file's unit: 16


def test_an_unknown_base_names_the_zoo_file_to_import(tmp_path, capsys):
    path = write(tmp_path, "model mine : swin_t { win = 8 }\n")
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    assert "m.arch:1:1: error: unknown base model 'swin_t'" in err
    assert 'import "swin"' in err and "did you mean 'mine'" not in err
    assert main(["check", write(tmp_path, "model mine : swim_q { }\n")]) == 2
    assert "unknown base model 'swim_q'" in capsys.readouterr().err


def test_the_issues_example_checks_at_a_size_the_window_divides(tmp_path, capsys):
    path = write(tmp_path, 'import "swin"\nmodel mine : swin_t { win = 8; img_size = 256 }\n')
    assert main(["check", path]) == 0, capsys.readouterr().err
    zoo = composer.load("swin_t", win=8, img_size=256)
    assert composer.load(path).params == zoo.params
    # diff across files: a file's model against a zoo name, and file against file
    assert main(["diff", "swin_t", f"{path}:mine", "--color", "never"]) == 1
    out = capsys.readouterr().out
    assert "params.win: 7 -> 8" in out and "b: mine overrides swin_t: win = 8; img_size = 256" in out
    other = write(tmp_path, 'import "swin"\nmodel theirs : swin_t { win = 8; img_size = 256 }\n', "o.arch")
    assert main(["diff", f"{path}:mine", f"{other}:theirs"]) == 0


# ---- composer show --------------------------------------------------------------------------------


def test_show_prints_the_family_file_and_writes_it(tmp_path, capsys, monkeypatch):
    assert main(["show", "swin_t"]) == 0
    assert capsys.readouterr().out == (BP / "swin.arch").read_text()
    assert main(["show", "lib/metaformer"]) == 0
    assert capsys.readouterr().out == (BP / "lib" / "metaformer.arch").read_text()
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o027)
    try:
        assert main(["show", "convnext_atto", "-o", "mine.arch"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "mine.arch").read_text() == (BP / "convnext.arch").read_text()
    assert stat.S_IMODE(os.stat(tmp_path / "mine.arch").st_mode) == 0o640
    capsys.readouterr()
    assert main(["check", "mine.arch:convnext_atto"]) == 0  # its imports of the library resolve from anywhere
    for bad in ("swin_q", "../convnext", "/etc/passwd"):
        assert main(["show", bad]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'swin_t'" in err and "Traceback" not in err


# ---- settings overridden like parameters ----------------------------------------------------------


def test_drop_path_rate_is_timms_schedule():
    timm = pytest.importorskip("timm")
    ours = composer.load("convnext_atto", drop_path_rate=0.1).drop_path
    with __import__("torch").device("meta"):
        ref = timm.create_model("convnext_atto", drop_path_rate=0.1)
    theirs = [getattr(b.drop_path, "drop_prob", 0.0) for st in ref.stages for b in st.blocks]
    assert ours == pytest.approx(theirs)
    model = composer.build("convnext_atto", img_size=32, drop_path_rate=0.1, device="meta")
    assert model.plan.drop_path == pytest.approx(theirs)


def test_settings_take_overrides_from_python_and_the_command_line(capsys):
    assert composer.load("convnext_atto", drop_path=0.05).drop_path == [0.05] * 12
    assert composer.load("vit_ti", crop_pct=1.0, img_size=32).preprocess["crop_pct"] == 1.0
    assert main(["info", "convnext_atto", "--set", "drop_path=linspace(0, 0.3)"]) == 0
    assert "0.273 .. 0.300" in capsys.readouterr().out  # the last stage's first and last block
    assert main(["check", "convnext_atto", "--set", "drop_path=linspace(0, 1.5)"]) == 2
    err = capsys.readouterr().err
    assert "--set drop_path:1:1: error: drop_path must be at least 0 and below 1" in err
    with pytest.raises(ComposerError, match="drop_path_rate must be"):
        composer.load("convnext_atto", drop_path_rate=1.0)
    with pytest.raises(ComposerError, match="did you mean 'drop_path'"):
        composer.load("convnext_atto", drop_pth=0.1)


def test_python_sequences_mappings_and_numpy_numbers_are_values():
    np = pytest.importorskip("numpy")
    plan = composer.load("convnext_atto", depths=Seq(1, 1, np.int64(2), 1), img_size=np.int64(32),
                         dims=(16, 32, 64, 128), num_classes=np.int32(7))
    assert plan.arguments["depths"] == [1, 1, 2, 1] and plan.arguments["dims"] == [16, 32, 64, 128]
    assert plan.input.spatial == (32, 32) and plan.head.y.channels == 7
    assert from_python(types.MappingProxyType({"a": (1, np.float32(0.5))})) == {"a": [1, 0.5]}
    assert from_python("abc") == "abc" and from_python(np.bool_(True)) is True


# ---- the file cache ----------------------------------------------------------------------------


MODEL = "model m {{\n  input image(3, 16)\n  stem conv({w}, 3)\n  head {{ global_pool(); classifier(10) }}\n}}\n"


def test_the_cache_notices_edits_of_a_file_and_of_its_imports(tmp_path):
    path = write(tmp_path, MODEL.format(w=8))
    assert composer.load(path).arguments == {} and composer.load(path).stem.y.channels == 8
    assert loader.load(path) is loader.load(path)  # just written: compared by its text, not parsed again
    write(tmp_path, MODEL.format(w=9))  # the same size, written within the same clock tick maybe
    assert composer.load(path).stem.y.channels == 9
    write(tmp_path, "block b(w) {\n  conv(w, 3)\n}\n", "blocks.arch")
    top = write(tmp_path, 'import "blocks"\nmodel t {\n  input image(3, 16)\n  stem b(4)\n'
                '  head { global_pool(); classifier(10) }\n}\n', "t.arch")
    small = composer.load(top).params
    write(tmp_path, "block b(w) {\n  conv(w, 5)\n}\n", "blocks.arch")  # only the import is edited
    inline = write(tmp_path, MODEL.format(w=4).replace("conv(4, 3)", "conv(4, 5)"), "inline.arch")
    assert composer.load(top).params == composer.load(inline).params > small


def test_an_unchanged_file_is_parsed_once_and_a_changed_stamp_reparses(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "RACY_NS", 0)  # trust stamps at once (the file was just written)
    path = write(tmp_path, MODEL.format(w=8))
    first = loader.load(path)
    assert loader.load(path) is first
    write(tmp_path, MODEL.format(w=9))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a later stamp, whatever the clock's tick
    assert loader.load(path) is not first and composer.load(path).stem.y.channels == 9


# ---- timm: the blueprint's preprocessing, reset_classifier ----------------------------------------


@pytest.mark.parametrize("ours, theirs", [("vit_ti", "vit_tiny_patch16_224"), ("deit_ti", "deit_tiny_patch16_224"),
                                          ("convnext_t", "convnext_tiny"), ("mobilevit_xxs", "mobilevit_xxs")])
def test_data_config_is_timms_for_the_reference(ours, theirs):
    timm = pytest.importorskip("timm")
    import composer.timm  # noqa: F401
    from timm.data import resolve_data_config

    with __import__("torch").device("meta"):
        ref = timm.create_model(theirs)
    a = resolve_data_config({}, model=timm.create_model(f"composer_{ours}", device="meta"))
    b = resolve_data_config({}, model=ref)
    keys = ("input_size", "mean", "std", "crop_pct", "interpolation")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_preprocessing_settings_are_checked_and_overridable(tmp_path, capsys):
    model = composer.build("vit_ti", img_size=32, device="meta", crop_pct=1.0, interpolation="bilinear")
    cfg = model.pretrained_cfg
    assert (cfg["mean"], cfg["crop_pct"], cfg["interpolation"]) == ((0.5, 0.5, 0.5), 1.0, "bilinear")
    assert composer.build("vit_ti", img_size=32, in_chans=1, device="meta").pretrained_cfg["mean"] == (0.5,)
    bad = MODEL.format(w=8).replace("  stem", "  input_mean = [0.5, 0.5]\n  stem")
    assert main(["check", write(tmp_path, bad)]) == 2
    assert "m.arch:3:16: error: input_mean has 2 values, but the input has 3 channels" in capsys.readouterr().err
    assert main(["check", "vit_ti", "--set", 'interpolation="cubic"']) == 2
    assert "interpolation must be one of" in capsys.readouterr().err


def test_reset_classifier_takes_timms_global_pool():
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    ref = timm.models.vision_transformer.VisionTransformer.reset_classifier
    model = composer.build("vit_ti", img_size=32, depth=2).eval()
    assert list(inspect.signature(model.reset_classifier).parameters) == \
        list(inspect.signature(ref).parameters)[1:]  # (num_classes, global_pool=None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.head.norm(model.forward_features(x))
        model.reset_classifier(5, global_pool="avg")
        expected = model.head.classifier(tokens[:, 1:].mean(1))  # timm's avg: the patch tokens' mean
        assert torch.allclose(model(x), expected, atol=1e-6)
    with pytest.raises(ComposerError, match="global_pool must be one of"):
        model.reset_classifier(5, global_pool="bogus")
