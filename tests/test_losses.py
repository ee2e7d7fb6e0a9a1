"""Losses named in a blueprint (`loss = ...`) and built by composer.build_loss, each compared with
its formula written out here (or torchvision's sigmoid_focal_loss)."""

import math

import pytest
import torch

import composer
from composer.cli import main
from helpers import write

BASE = """
model tiny(num_classes = 5) {{
    input image(3, 16)
    stem conv(8, kernel = 3, stride = 2)
    head {{ global_pool; classifier(num_classes) }}
    {loss}
}}
"""


def loss_of(tmp_path, text):
    return composer.build_loss(write(tmp_path, BASE.format(loss=text)))


def data(multi=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 5, generator=g) * 2
    target = torch.randint(0, 2, (6, 5), generator=g).float() if multi else torch.randint(0, 5, (6,), generator=g)
    return logits, target


def test_default_is_plain_cross_entropy(tmp_path):
    logits, y = data()
    expected = sum(-math.log(math.exp(logits[i, y[i]]) / logits[i].exp().sum()) for i in range(6)) / 6
    assert loss_of(tmp_path, "")(logits, y).item() == pytest.approx(float(expected), rel=1e-5)


def test_label_smoothing(tmp_path):
    logits, y = data()
    s, k = 0.1, 5
    logp = torch.log_softmax(logits, 1)
    expected = 0.0
    for i in range(6):
        q = [s / k + (1 - s) * (j == int(y[i])) for j in range(k)]
        expected += -sum(q[j] * logp[i, j].item() for j in range(k))
    got = loss_of(tmp_path, "loss = cross_entropy(smoothing = 0.1)")(logits, y)
    assert got.item() == pytest.approx(expected / 6, rel=1e-5)


def test_binary_cross_entropy(tmp_path):
    logits, y = data(multi=True)
    p = torch.sigmoid(logits)
    expected = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert loss_of(tmp_path, "loss = binary_cross_entropy")(logits, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_single_label(tmp_path):
    logits, y = data()
    p_t = torch.softmax(logits, 1)[torch.arange(6), y]
    expected = (-0.25 * (1 - p_t) ** 2 * p_t.log()).mean()
    got = loss_of(tmp_path, "loss = focal(alpha = 0.25, gamma = 2)")(logits, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_multi_label_equals_torchvision(tmp_path):
    from torchvision.ops import sigmoid_focal_loss

    logits, y = data(multi=True)
    expected = sigmoid_focal_loss(logits, y, alpha=0.25, gamma=2.0, reduction="mean")
    got = loss_of(tmp_path, "loss = focal(alpha = 0.25, gamma = 2, multi_label = true)")(logits, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # also the survey's written form: pos alpha (1-p)^g (-log p), neg (1-alpha) p^g (-log(1-p))
    p = torch.sigmoid(logits)
    written = (y * 0.25 * (1 - p) ** 2 * -p.log() + (1 - y) * 0.75 * p ** 2 * -(1 - p).log()).mean()
    assert got.item() == pytest.approx(written.item(), rel=1e-5)


def test_focal_without_alpha_and_gamma_is_cross_entropy(tmp_path):
    logits, y = data()
    got = loss_of(tmp_path, "loss = focal(alpha = none, gamma = 0)")(logits, y)
    assert got.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_hard_distillation(tmp_path):
    cls, y = data(seed=1)
    dist, _ = data(seed=2)
    teacher, _ = data(seed=3)
    t = teacher.argmax(1)

    def ce(lg, lab):
        return float(sum(-torch.log_softmax(lg, 1)[i, lab[i]] for i in range(6)) / 6)

    expected = 0.5 * ce(cls, y) + 0.5 * ce(dist, t)
    got = loss_of(tmp_path, "loss = hard_distillation")((cls, dist), y, teacher)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_coarse_to_fine(tmp_path):
    coarse, y = data(seed=4)
    fine, _ = data(seed=5)
    fine.requires_grad_(True)
    pf, pc = torch.softmax(fine, 1), torch.softmax(coarse, 1)
    kl = (pf * (pf.log() - pc.log())).sum(1).mean()  # KL(fine || coarse), batch mean
    ce = -torch.log_softmax(fine, 1)[torch.arange(6), y].mean()
    got = loss_of(tmp_path, "loss = coarse_to_fine")((coarse, fine), y)
    assert got.item() == pytest.approx((ce + kl).item(), rel=1e-5)
    got.backward()  # the fine pass is the KL's teacher: its gradient comes from the CE term only
    ce_only = torch.autograd.grad(-torch.log_softmax(fine, 1)[torch.arange(6), y].mean(), fine)[0]
    assert torch.allclose(fine.grad, ce_only, atol=1e-6)


@pytest.mark.parametrize("text, message", [
    ("loss = focal(gamma = -1)", "'focal' argument 'gamma' must be >= 0.0"),
    ("loss = layernorm", "loss must be a loss, got op 'layernorm'"),
    ("loss = cross_entropy(smoothing = 1.5)", "'cross_entropy' argument 'smoothing'"),
    ("loss = focl", "did you mean"),
])
def test_bad_losses_are_located_errors(tmp_path, capsys, text, message):
    path = write(tmp_path, BASE.format(loss=text))
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    assert message in err and "m.arch:6:" in err


def test_a_loss_is_not_a_layer(tmp_path, capsys):
    path = write(tmp_path, BASE.format(loss="").replace("global_pool;", "global_pool; focal;"))
    assert main(["check", path]) == 2
    assert "is a loss" in capsys.readouterr().err
