"""gMLP (blueprints/gmlp.arch) against timm: parameter counts of both variants, the ported
gmlp_ti16's logits at 224 (with the token-axis linears made large enough that their orientation
shows in the logits), and the refusal of another input size (the spatial gating's linear is
N x N over the build grid's tokens)."""

from __future__ import annotations

import pytest
import torch

import composer
from composer.port import from_timm
from tests.helpers import count_of_timm, n_params, perturb

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("ours, name, count", [
    ("gmlp_ti16", "gmlp_ti16_224", 5_867_328),
    ("gmlp_s16", "gmlp_s16_224", 19_422_656),
])
def test_parameter_count_equals_timm(ours, name, count):
    assert count_of_timm(ours, name) == count


def test_built_at_another_size_counts_its_tokens():
    """At img_size 256 the gating linears are 256 x 256 (timm's too)."""
    with torch.device("meta"):
        ref = timm.create_model("gmlp_ti16_224", pretrained=False, img_size=256)
    assert composer.load("gmlp_ti16", img_size=256).params == n_params(ref) == 5_867_328 + 30 * (256 * 257 - 196 * 197)


def test_non_square_size_counts_its_tokens():
    """`token_linear` reads N from the grid: 224x160 gives 14 x 10 = 140 tokens, as timm's."""
    with torch.device("meta"):
        ref = timm.create_model("gmlp_ti16_224", pretrained=False, img_size=(224, 160))
    assert composer.load("gmlp_ti16", img_size=[224, 160]).params == n_params(ref) \
        == 5_867_328 + 30 * (140 * 141 - 196 * 197)


@pytest.fixture(scope="module")
def ported():
    torch.manual_seed(0)
    ref = timm.create_model("gmlp_ti16_224", pretrained=False, num_classes=10).eval()
    ref.blocks = ref.blocks[:4]  # the first 4 of its 30 blocks (ours: depth = 4): the suite's time
    perturb(ref)  # norms and biases (the gates' biases included)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gate.proj.weight"):  # timm's init (std 1e-6) would hide a transpose
                p.normal_(std=0.1)
        ref.get_classifier().weight.normal_(std=0.1)  # timm's is zero: the logits would be the bias
    ours = composer.build("gmlp_ti16", num_classes=10, depth=4).eval()
    report = from_timm(ours, ref.state_dict())
    assert report.ok, report.render()
    return ours, ref


def test_ported_gives_timm_logits(ported):
    ours, ref = ported
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), ref(x)
        gate = dict(ours.named_modules())["stages.0.blocks.0.mlp_channels.gate.proj"]
        gate.weight.copy_(gate.weight.t().clone())  # mixing along the wrong axis of the tokens
        wrong = ours(x)
        gate.weight.copy_(gate.weight.t().clone())
    assert a.shape == b.shape == (1, 10)
    assert (a - b).abs().max().item() < 1e-4
    assert (wrong - b).abs().max().item() > 1e-2


def test_other_size_is_refused(ported):
    """timm's model is as tied to its 196 tokens (its SGU's nn.Linear(196, 196))."""
    ours, _ = ported
    with pytest.raises(composer.InputSizeError, match=r"gmlp_ti16 \(built for 224x224\) cannot run at 256x256.*"
                       r"Admitted sizes: H and W: fixed at 224"):
        ours(torch.randn(1, 3, 256, 256))
