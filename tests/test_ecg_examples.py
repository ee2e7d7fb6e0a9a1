"""The 12-lead ECG examples (examples/ecg_convnext.arch, ecg_smt.arch, ecg_caformer.arch): 1-D
versions of three image families. Each builds, runs a forward pass on a (2, 12, 5000) batch, gives
one logit per diagnostic superclass, names a multi-label loss, and `composer build` prints its
parameter count.

The expected counts are derived from the 2-D references, never from composer: timm's
convnext_atto / caformer_s18 (in_chans=12, num_classes=5) with every k x k conv weight replaced by
its 1-D counterpart (kernel k, or 15 for the depthwise convs that the examples widen), and for SMT
the official smt_t count (shared/MODELS.md row 24) adjusted by hand below.
"""

from __future__ import annotations

import pytest
import torch

import composer
from composer import cli
from helpers import REPO, n_params

EXAMPLES = REPO / "examples"


def _timm_1d(name: str, dw_kernel: int) -> int:
    """timm's 2-D model with 12 input channels and 5 classes, each Conv2d counted as a Conv1d:
    kernel `dw_kernel` for depthwise (grouped) convs, the kernel's width for the others."""
    import timm

    model = timm.create_model(name, pretrained=False, in_chans=12, num_classes=5)
    total = n_params(model)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            k = dw_kernel if mod.groups > 1 else mod.kernel_size[1]
            total += mod.out_channels * mod.in_channels // mod.groups * k - mod.weight.numel()
    return total


def _smt_t_1d() -> int:
    """SMT-T's official count (11,506,536: 3 channels, 1000 classes, 3x3 stem) turned 1-D by hand."""
    dims = [64, 128, 256, 512]
    total = 11_506_536
    total += (512 * 5 + 5) - (512 * 1000 + 1000)                           # head: 5 classes
    total += 64 * 12 * 7 - 64 * 3 * 9                                       # stem conv: 12 leads, kernel 7
    total += 64 * 64 * (2 - 4)                                              # stem 2x2 s2 conv -> 2
    total += sum(dims[i - 1] * dims[i] * (3 - 9) for i in (1, 2, 3))        # 3x3 patch embeddings -> 3
    sam_groups = 2 * 16 + 2 * 32 + 4 * 64                                   # SAM blocks' dim / 4
    total += sam_groups * ((3 + 5 + 7 + 9) - (9 + 25 + 49 + 81))             # multi-head mixed convs
    hidden = 2 * 256 + 2 * 512 + 8 * 1024 + 1 * 1024                        # every block's MLP width
    total += hidden * (3 - 9)                                               # 3x3 depthwise in the MLP -> 3
    total += (4 * 256 + 1 * 512) * (3 - 9)                                  # LePE 3x3 -> 3 (attention blocks)
    return total


CASES = [
    ("ecg_convnext.arch", "ecg_convnext", lambda: _timm_1d("convnext_atto", 15)),   # 3,179,165
    ("ecg_smt.arch", "ecg_smt", _smt_t_1d),                                        # 9,836,357
    ("ecg_caformer.arch", "ecg_caformer", lambda: _timm_1d("caformer_s18", 15)),   # 22,981,749
]


@pytest.mark.parametrize("file,name,expected", CASES, ids=[c[1] for c in CASES])
def test_ecg_example(file, name, expected, capsys):
    target = f"{EXAMPLES / file}:{name}"
    want = expected()

    plan = composer.load(target)
    assert plan.input_kind == "signal"
    assert (plan.input.channels, plan.input.spatial) == (12, (5000,))
    assert plan.params == want

    model = composer.build(target).eval()
    assert n_params(model) == want
    with torch.no_grad():
        y = model(torch.randn(2, 12, 5000))
    assert y.shape == (2, 5)

    # several labels per record: a sigmoid per class, averaged over every element
    loss = composer.build_loss(target)
    logits, labels = torch.zeros(2, 5), torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    assert abs(loss(logits, labels).item() - torch.log(torch.tensor(2.0)).item()) < 1e-6

    assert cli.main(["build", target]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {want:,}" in out
    assert "-> output (1, 5)" in out
