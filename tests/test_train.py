"""Training at scale: examples/train.py learns under torchrun DDP (2 processes, gloo on the CPU),
resumes exactly from its safetensors checkpoint, and goes on under FSDP2 from a DDP checkpoint; and
no zoo model has a parameter that a loss never reaches (what plain DDP refuses)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import composer

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TINY = str(EXAMPLES / "tiny_convnet.arch")
# a short run of the tiny ConvNet: 16 samples per process and step, a 128-image validation set
RUN = ["--model", TINY, "--batch", "16", "--lr", "3e-3", "--warmup", "5", "--val-size", "128",
       "--log-every", "5", "--no-progress"]


@pytest.fixture(scope="module")
def train():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train as module
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def _result(text: str) -> dict:
    m = re.search(r"^result (\{.*\})$", text, re.M)
    assert m, text
    return json.loads(m.group(1))


def _in_process(train, argv) -> str:
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            assert train.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


def test_resume_continues_exactly(train, tmp_path):
    """12 steps in one run, or 8 steps, a checkpoint and 4 more in a second run: the same model
    (optimizer moments, EMA, schedule and the sampler's place in the epoch all come back)."""
    straight = _result(_in_process(train, [*RUN, "--steps", "12"]))
    first = _in_process(train, [*RUN, "--steps", "12", "--stop-at", "8", "--out", str(tmp_path)])
    assert _result(first)["step"] == 8
    second = _in_process(train, [*RUN, "--steps", "12", "--out", str(tmp_path), "--resume"])
    assert "resumed from step 8" in second and "before training" not in second
    resumed = _result(second)
    assert resumed["step"] == 12
    for key in ("val_loss", "ema_val_loss"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5, abs=1e-6), (key, straight, resumed)


def test_torchrun_ddp_learns_then_fsdp2_resumes(train, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP) trains 20 steps of a 30-step schedule and saves;
    two processes under FSDP2 (fully_shard per block) resume from that checkpoint and go on 4 steps.
    The model learns: validation loss down, accuracy well above chance (0.25)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "train.py"), *RUN, "--steps", "30", "--stop-at", "20", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es) on cpu (DDP)" in proc.stdout, proc.stdout
    initial = float(re.search(r"before training: val loss ([0-9.]+)", proc.stdout).group(1))
    ddp = _result(proc.stdout)
    assert ddp["step"] == 20 and ddp["val_loss"] < initial and ddp["val_acc"] >= 0.40, proc.stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["ema.safetensors", "model.safetensors", "optimizer.safetensors"]
    # the weights are the model's own state_dict: they load into a freshly built model
    from safetensors.torch import load_file

    model = composer.build(TINY, num_classes=4)
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")))

    # torchrun again: forking this process would fail once any test before ran autograd (its threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "train.py"), *RUN, "--steps", "30", "--stop-at", "24", "--out", str(tmp_path), "--resume",
           "--fsdp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "(FSDP2)" in text and "resumed from step 20" in text, text
    fsdp = _result(text)
    assert fsdp["step"] == 24 and fsdp["val_loss"] < ddp["val_loss"], text  # it went on learning
    assert fsdp["val_acc"] >= 0.40 and fsdp["ema_val_acc"] >= 0.40, text


@pytest.mark.parametrize("name, size", [("vit_adapter_t", 64), ("pathformer_etth1", None)])
def test_every_trainable_parameter_gets_a_gradient(name, size):
    """Formerly refused by plain DDP: ViT-Adapter's classifier read one pyramid level (the others'
    layers got no gradient) and `unused(...)` parity layers (Pathformer's never-called norms, ViT-
    Adapter's class-token position row) wanted gradients. Now the head pools every level and the
    parity layers are frozen parameters: still counted and in the state_dict under the same keys."""
    model = composer.build(name, num_classes=3, **({"img_size": size} if size else {})).train()
    plan = model.plan
    model(torch.randn(2, plan.input.channels, *plan.input.spatial)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".op." in n for n in frozen)  # only what `unused` holds
    assert frozen <= set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == plan.params
