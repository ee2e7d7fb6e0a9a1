"""`composer export` / `composer.export` (issue 16, item 3): ONNX through the dynamo exporter and
torch.export programs, each run back (onnxruntime, torch.export.load) and compared with the eager
model here, independently of the check export itself makes; a file that differs from eager is
refused with nothing written; an unwritable output is refused before any work; a missing ONNX
toolchain is a user error naming the extra to install. convnext_atto at 32x32 keeps it quick."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import composer
from composer import exporter
from composer.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def model():
    return composer.build("convnext_atto", num_classes=10, img_size=32, seed=1).eval()


def test_pt2_reloads_with_eager_outputs(model, tmp_path):
    out = tmp_path / "atto.pt2"
    result = composer.export(model, "pt2", out)
    assert result.path == out and result.checked and result.max_diff < 1e-5
    program = torch.export.load(str(out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (program.module()(x) - model(x)).abs().max().item() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atto.pt2"]  # no temporary file left


def test_onnx_runs_in_onnxruntime_like_eager(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "atto.onnx"
    composer.export(model, "onnx", out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (2, 10) and abs(got - want).max() < 1e-4


TINY = """
block conv_bn(dim, stride = 1) {
    conv(dim, 3, stride = stride, bias = false)
    batchnorm as bn
    relu
}

model tiny(num_classes = 10) {
    input image(3, 64)
    stem conv_bn(8, stride = 2)
    stages for i in 0..2 {
        repeat 1 conv_bn(8 * (i + 1), stride = 2)
    }
    head { global_pool("avg"); classifier(num_classes) }
}
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.arch"
    path.write_text(TINY)
    return path


def test_a_mismatch_is_refused_and_nothing_is_written(tiny, tmp_path, monkeypatch):
    real = exporter.run_exported
    monkeypatch.setattr(exporter, "run_exported",
                        lambda to, path, xs: [[t + 1e-2 for t in out] for out in real(to, path, xs)])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(composer.ComposerError) as exc:
        composer.export(str(tiny), "pt2", out / "tiny.pt2")
    assert exc.value.diagnostics[0].code == "export-mismatch"
    assert "differ from the eager model by 0.01" in str(exc.value)
    assert list(out.iterdir()) == []  # neither the file nor its temporary copy
    assert main(["export", str(tiny), "--to", "pt2", "-o", str(out / "tiny.pt2")]) == 2
    assert list(out.iterdir()) == []
    composer.export(str(tiny), "pt2", out / "tiny.pt2", tolerance=0.1)  # a looser tolerance writes it
    assert (out / "tiny.pt2").is_file()


def test_cli_dynamic_program_runs_at_other_sizes(tiny, tmp_path, capsys):
    out = tmp_path / "tiny.pt2"
    assert main(["export", str(tiny), "--to", "pt2", "--dynamic", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    # the stages reduce by 8; the exporter specialises a size of 1, so from 2 x 8
    assert "dynamic: batch, H: multiples of 8 from 16, W: multiples of 8 from 16" in text and f"wrote {out}" in text
    eager = composer.build(str(tiny)).eval()
    program = torch.export.load(str(out)).module()
    x = torch.randn(3, 3, 40, 96)  # another batch and size than the example (2x3x64x64)
    with torch.no_grad():
        assert (program(x) - eager(x)).abs().max().item() < 1e-5


def test_cli_refuses_unwritable_output_before_building(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(composer.api, "build", lambda *a, **k: pytest.fail("built before checking the output"))
    assert main(["export", "convnext_atto", "--to", "pt2", "-o", str(tmp_path / "file" / "x.pt2")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_missing_onnx_toolchain_is_a_user_error(monkeypatch, capsys):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find(name, *a))
    assert main(["export", "convnext_atto", "--to", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "needs onnxruntime" in err and "arch-composer[export]" in err
