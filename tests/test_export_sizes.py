"""torch.export with dynamic input sizes (issue 13, item 6): one program for every admitted size,
checked against eager at two or three sizes, for a convnet, a reduced-attention model, a ViT whose
position table is resampled and a windowed-attention model (Swin under dynamic_img_size: every
stage padded up to a multiple of its window and the shifted windows' mask made in the program for
the size it gets; small depths so the tests stay quick), and one ONNX file (the dynamo exporter)
with dynamic batch, height and width run by onnxruntime.

Swin's program covers sizes from 256: its fake-tensor shape checks specialise on whether a dim is
1, and below 256 the last stage (grid H/32 < 8) has a single window along an axis, so the program
records a guard that a smaller size fails (with an error, never a wrong result); torch.export's
Dim range says so (`min`)."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import composer

CASES = {
    # name: (build overrides, dynamic_img_size, the size multiple its rule admits, the fewest multiples,
    # the sizes to check (the first is the example))
    "resnet18": ({}, False, 32, 2, [(96, 128), (160, 96)]),
    "vit_ti": ({"depth": 2}, True, 16, 2, [(224, 224), (160, 256)]),
    "pvt_v2_b0": ({"depths": [1, 1, 1, 1]}, False, 32, 2, [(128, 128), (96, 160)]),
    # padded at every stage (64x80 -> 70x84, ..., 8x10 -> 14x14), none padded, other pads; shifted
    # windows (and their mask) in the first and last stage, plain windows in the others
    "swin_t": ({"depths": [2, 1, 1, 2]}, True, 32, 8, [(256, 320), (448, 448), (352, 288)]),
}


@pytest.mark.parametrize("name", CASES)
def test_export_with_dynamic_height_and_width(name):
    overrides, dynamic, step, low, sizes = CASES[name]
    model = composer.build(name, num_classes=10, dynamic_img_size=dynamic, **overrides).eval()
    h, w = Dim("h", min=low, max=32), Dim("w", min=low, max=32)
    example = torch.randn(2, 3, *sizes[0])
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {2: step * h, 3: step * w}})
    exported = program.module()
    for size in sizes:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = model(x)
            got = exported(x)
        assert got.shape == expected.shape == (2, 10)
        assert (got - expected).abs().max().item() < 1e-4, size


def test_onnx_with_dynamic_axes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = composer.build("resnet18", num_classes=10).eval()
    b, h, w = Dim("b", min=1, max=64), Dim("h", min=2, max=32), Dim("w", min=2, max=32)
    program = torch.onnx.export(model, (torch.randn(2, 3, 128, 96),), dynamo=True,
                                dynamic_shapes={"x": {0: b, 2: 32 * h, 3: 32 * w}})
    program.save(str(tmp_path / "resnet18.onnx"))
    session = ort.InferenceSession(str(tmp_path / "resnet18.onnx"), providers=["CPUExecutionProvider"])
    for size in ((128, 96), (224, 160)):
        x = torch.randn(3, 3, *size)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == expected.shape == (3, 10)
        assert abs(got - expected).max() < 1e-4, size
