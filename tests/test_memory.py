"""Memory refused before allocation (issue 15, item 5): parameters + buffers + the largest activation
of one forward, estimated from the plan alone, against `--max-memory` (default: a fraction of the
available memory); `composer info` prints the estimate."""

from __future__ import annotations

import pytest
import torch

import composer
import composer.builder
import composer.memory
from composer import api
from composer.cli import main
from composer.diagnostics import ComposerError
from composer.memory import estimate, parse_size

# each would take far more than 8 GiB: weights, a buffer, an activation
HUGE = {
    # 2 x 70000^2 + ... = 4.9e9 parameters (19.6 GB of float32), under the old 2e10-parameter limit
    "weights": "model m {\n    input image(3, 8)\n    stem { conv(70000, 1); conv(70000, 1) }\n}\n",
    # a 512-wide window: relative_position_index (512^2)^2 = 6.9e10 int64 entries (512 GiB)
    "buffer": ("model m(win = 512) {\n    input image(3, 512)\n    stem patch_embed(8, 1)\n"
               "    stages for i in 0..1 { repeat 1 { attention(1, position = relative_bias, "
               "partition = window(win)) } }\n}\n"),
    # img_size = 200000: the input alone is 3 x 200000^2 floats (480 GB)
    "activation": "model m(img_size = 32) {\n    input image(3, img_size)\n    stem { conv(1, 3) }\n}\n",
}
ARGS = {"activation": ["--img-size", "200000"]}

BUFFERS = """import "lib/position_mixers"

model bufs {
    input image(3, 16)
    stem patch_embed(16, 2)
    stages for i in 0..1 {
        repeat 1 {
            sinusoidal_pos
            attention(2, position = relative_bias, partition = window(4, shift = 2))
            attention(2, partition = neighbourhood(3, mask = true))
            attention(2, position = relative_xl)
            position_bias_attention(16, 2, position = relative_position_bias)
            distance_bias_attention(16, 2)
        }
    }
}
"""


@pytest.fixture
def no_allocation(monkeypatch):
    """Building a model fails the test: the refusal must come before anything is allocated."""

    def refuse(*a, **k):
        raise AssertionError("the model was allocated")

    monkeypatch.setattr(composer.builder, "ComposedModel", refuse)


@pytest.mark.parametrize("what", sorted(HUGE))
def test_too_large_is_refused_before_allocation(tmp_path, capsys, no_allocation, what):
    path = tmp_path / "m.arch"
    path.write_text(HUGE[what])
    status = main(["build", str(path), "--max-memory", "8G", *ARGS.get(what, [])])
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"{path}:1:1: error: m needs about" in err and "over the limit of 8.0 GiB (--max-memory)" in err
    assert "hint:" in err and "Traceback" not in err
    largest = {"weights": "parameters 4,900,", "buffer": "buffers 68,719,476,736 ",
               "activation": "largest activation 120,000,000,000 "}[what]
    assert largest in err, err


def test_the_default_limit_is_a_fraction_of_the_available_memory(tmp_path, capsys, monkeypatch, no_allocation):
    monkeypatch.setattr(composer.memory, "available_bytes", lambda: 16 << 30)
    path = tmp_path / "m.arch"
    path.write_text(HUGE["weights"])
    assert main(["build", str(path)]) == 2
    assert "over the limit of 12.8 GiB (80% of the 16.0 GiB available)" in capsys.readouterr().err
    with pytest.raises(ComposerError, match="over the limit of 1.0 MiB"):  # the Python API
        composer.build(str(path), max_memory="1M")


def test_port_checks_memory_too(tmp_path, capsys, no_allocation):
    path = tmp_path / "m.arch"
    path.write_text(HUGE["weights"])
    ckpt = tmp_path / "ref.safetensors"
    ckpt.write_bytes(b"")
    status = main(["port", str(path), str(ckpt), "--from", "timm:x", "-o", str(tmp_path / "o.safetensors"),
                   "--max-memory", "1G"])
    assert status == 2 and "over the limit of 1.0 GiB" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("8G", 8 << 30), ("512M", 512 << 20), ("1.5k", 1536), ("100", 100),
                                            ("2GiB", 2 << 30), ("3 tb", 3 << 40)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "8X", "-1G", "0", "G", "1e400"])
def test_bad_sizes_are_usage_errors(text, capsys, tmp_path):
    path = tmp_path / "m.arch"
    path.write_text(HUGE["activation"])
    assert main(["build", str(path), f"--max-memory={text}"]) == 2
    err = capsys.readouterr().err
    assert "--max-memory" in err and "Traceback" not in err


def test_the_estimate_counts_what_the_built_model_holds(tmp_path):
    """Parameters and buffers against the built module's own tensors (every buffer-making
    attention part and position op); the activation against the largest output a forward pass
    gives, seen by forward hooks."""
    path = tmp_path / "bufs.arch"
    path.write_text(BUFFERS)
    est = estimate(api.load(str(path)))
    model = api.build(str(path))
    assert est.params == sum(p.numel() for p in model.parameters())
    assert est.buffers == sum(b.numel() for b in model.buffers()) > 10_000

    conv = tmp_path / "conv.arch"
    conv.write_text("model c {\n    input image(3, 12)\n    stem { conv(8, 3, padding = 1); conv(40, 1) }\n"
                    "    stages for i in 0..1 { downsample conv(16, 2, stride = 2)\n"
                    "        repeat 1 { attention(2) } }\n    head { global_pool; classifier(5) }\n}\n")
    est = estimate(api.load(str(conv)))
    model = api.build(str(conv)).eval()
    sizes = []
    for m in model.modules():
        m.register_forward_hook(lambda mod, i, o: sizes.append(o.numel()) if torch.is_tensor(o) else None)
    with torch.no_grad():
        model(torch.randn(1, 3, 12, 12))
    assert est.activation == max(sizes) == 40 * 12 * 12
    assert est.buffers == 0 and est.params == sum(p.numel() for p in model.parameters())


def test_a_reused_module_s_buffers_count_once(tmp_path):
    """`reuse` runs the module again: its buffers (the window attention's relative-position index)
    are held once, as the built model's own buffers show."""
    path = tmp_path / "reuse.arch"
    path.write_text("model r {\n    input image(3, 16)\n    stem patch_embed(16, 2)\n    stage {\n"
                    "        block { attention(2, partition = window(4), position = relative_bias) as attn }\n"
                    "        block { reuse stages.0.blocks.0.attn }\n    }\n"
                    "    head { global_pool; classifier(5) }\n}\n")
    est = estimate(api.load(str(path)))
    held = sum(b.numel() for b in api.build(str(path)).buffers())
    assert est.buffers == held > 0


def test_info_prints_the_estimate(tmp_path, capsys):
    path = tmp_path / "m.arch"
    path.write_text(HUGE["buffer"].replace("512", "32"))  # a (32^2)^2 index: 1,048,576 int64 entries
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "memory: about 8.0 MiB" in out and "buffers 1,048,576 (8.0 MiB)" in out, out


def test_the_estimate_imports_no_torch(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "m.arch"
    path.write_text(HUGE["buffer"])
    code = ("import sys; sys.modules['torch'] = None\nfrom composer import api; from composer.memory import estimate; "
            f"print(estimate(api.load({str(path)!r})).buffers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(512 ** 4), out.stderr


def test_multilevel_attention_buffers_are_bounded_from_above(tmp_path):
    """Focal attention's index tables and mask: the estimate is at least what the module holds."""
    path = tmp_path / "focal.arch"
    path.write_text("model f {\n    input image(16, 16)\n"
                    "    stage { block multilevel_attention(2, window = 4, expand = 1, pooled = 3) }\n}\n")
    est = estimate(api.load(str(path)))
    real = sum(b.numel() for b in api.build(str(path)).buffers())
    assert real > 4 ** 4 and real <= est.buffers <= 3 * real
