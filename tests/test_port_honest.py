"""Ports that cannot lie (issue 15, item 6): a reshape that would reorder a tensor's elements needs
an explicit rule; split/join collisions are errors; the outputs are compared with the reference's
before anything is written; the docs' port-map example works on a BatchNorm model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import composer
import composer.port
from composer.cli import main
from composer.diagnostics import ComposerError
from composer.port import from_timm
from composer.port_order import keeps_axis_order, suggest_permutation

ROOT = Path(__file__).resolve().parent.parent
# patch_embed(6, 2) on 8x8: a 4x4 grid, pos_embed (1, 16, 6); a batchnorm for num_batches_tracked
BLUEPRINT = """model pe {
    input image(3, 8)
    stem { patch_embed(6, 2); pos_embed; layernorm }
    head { global_pool; classifier(3) }
}
model bn {
    input image(3, 8)
    stem { conv(4, 3); batchnorm; relu }
    head { global_pool; classifier(3) }
}
"""
POS = "stem.pos_embed.pos"
RULE = {r"^stem\.pos_embed\.pos$": [0, 2, 3, 1]}


@pytest.fixture
def arch(tmp_path):
    path = tmp_path / "fam.arch"
    path.write_text(BLUEPRINT)
    return path


def _channels_first(state):
    """The state with the position embedding stored as a map (1, C, H, W), as a conv model keeps it."""
    out = {k: v.clone() for k, v in state.items()}
    out[POS] = state[POS].reshape(1, 4, 4, 6).permute(0, 3, 1, 2).contiguous()
    return out


@pytest.mark.parametrize("a, b, keeps", [
    ((8, 4, 1, 1), (8, 4), True), ((8, 4), (8, 4, 1, 1), True), ((1, 2, 5), (2, 5), True),
    ((2, 3, 20), (6, 4, 5), True), ((12,), (3, 4), True), ((1, 6, 4, 4), (1, 16, 6), False),
    ((6, 4), (4, 6), False), ((3, 4), (2, 6), False), ((2, 3), (7,), False)])
def test_which_reshapes_keep_the_axis_order(a, b, keeps):
    assert keeps_axis_order(a, b) is keeps
    assert keeps_axis_order(b, a) is keeps


def test_the_suggested_permutation_keeps_the_grid_order():
    assert suggest_permutation((1, 96, 7, 7), (1, 49, 96)) == [0, 2, 3, 1]  # not [0, 3, 2, 1]: W before H
    assert suggest_permutation((4, 6), (6, 4)) == [1, 0]


def test_a_scrambling_reshape_is_refused_and_a_rule_loads_it(arch):
    ref = composer.build(f"{arch}:pe", seed=1)
    state = _channels_first(ref.state_dict())
    model = composer.build(f"{arch}:pe", seed=2)
    before = model.state_dict()[POS].clone()
    with pytest.raises(ComposerError) as exc:
        from_timm(model, state, {"source": "timm"})
    text = exc.value.render()
    assert f"{arch}:3:31: error: {POS} [1, 16, 6] would be {POS} [1, 6, 4, 4] reshaped" in text
    assert "permute: {'^stem\\.pos_embed\\.pos$': [0, 2, 3, 1]}" in text
    assert torch.equal(model.state_dict()[POS], before)  # nothing loaded
    report = from_timm(model, state, {"source": "timm", "permute": RULE}, reference=ref)
    assert report.ok and report.permuted[0][:3] == (POS, POS, "permute [0, 2, 3, 1]")
    assert torch.equal(model.state_dict()[POS], ref.state_dict()[POS])
    assert report.max_difference == 0.0 and "largest difference 0 " in report.render()
    # transpose: the same tensor stored (1, C, N); view: a row-major reshape, meant
    flat = {**state, POS: ref.state_dict()[POS].transpose(1, 2).contiguous()}
    assert from_timm(model, flat, {"source": "timm", "transpose": {POS: [1, 2]}}).ok
    assert torch.equal(model.state_dict()[POS], ref.state_dict()[POS])
    report = from_timm(model, state, {"source": "timm", "view": [POS]}, reference=ref, strict=False)
    assert not report.ok and report.disagrees and report.max_difference > 1e-4  # scrambled: the outputs say so
    with pytest.raises(ComposerError, match="largest difference"):
        from_timm(model, state, {"source": "timm", "view": [POS]}, reference=ref)


@pytest.mark.parametrize("spec, message", [
    ({"permute": {POS: [0, 2, 2, 1]}}, "a permutation"), ({"transpose": {POS: [1]}}, "two axes"),
    ({"permute": [POS]}, "mapping"), ({"permute": {POS: [0, 2, 1]}}, "does not fit")])
def test_bad_reorder_rules(arch, spec, message):
    model = composer.build(f"{arch}:pe", seed=1)
    with pytest.raises(ComposerError, match=message):
        from_timm(model, _channels_first(model.state_dict()), {"source": "timm", **spec})


def test_split_and_join_collisions_are_errors(arch):
    model = composer.build(f"{arch}:pe", seed=1)
    state = dict(model.state_dict())
    w = state["stem.patch_embed.proj.weight"]
    split = [{"from": r"\.(qkv|kqv)\.", "into": [".proj.", ".other."], "sizes": [1, 1]}]
    fused = {k: v for k, v in state.items() if k != "stem.patch_embed.proj.weight"}
    fused["stem.patch_embed.qkv.weight"] = torch.cat([w, w])
    fine = from_timm(model, fused, {"source": "timm", "split": split}, strict=False)  # the other part: unused
    assert fine.split == [("stem.patch_embed.proj.weight", "stem.patch_embed.qkv.weight")] and not fine.missing
    cases = [  # a part named like a tensor the checkpoint has; two fused tensors giving one part;
        # a part named like the tensor it cuts
        ({**fused, "stem.patch_embed.proj.weight": w}, split, "is already a checkpoint tensor"),
        ({**fused, "stem.patch_embed.kqv.weight": torch.cat([w, w])}, split, "is already a part of"),
        (fused, [{"from": r"\.qkv\.", "into": [".qkv.", ".other."]}], "is already the tensor it cuts")]
    for checkpoint, rule, message in cases:
        with pytest.raises(ComposerError, match=message):
            from_timm(model, checkpoint, {"source": "timm", "split": rule})
    join = [{"from": [r"^head\.classifier\.weight$", r"^head\.classifier\.bias$"], "into": "stem.pos_embed.pos",
             "dim": 1}]
    with pytest.raises(ComposerError, match="'stem.pos_embed.pos' is already a checkpoint tensor"):
        from_timm(model, {**state, "head.classifier.bias": torch.zeros(3, 1)}, {"source": "timm", "join": join})


def test_the_cli_compares_the_outputs_before_writing(arch, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    (tmp_path / "fam.port.yaml").write_text("source: timm\n")
    ref = composer.build(f"{arch}:pe", seed=1).eval()
    ckpt = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, ckpt)
    wrong = composer.build(f"{arch}:pe", seed=3).eval()  # "timm's model" computing something else
    monkeypatch.setattr(composer.port, "timm_reference", lambda name, state: wrong)
    out = tmp_path / "out.safetensors"
    argv = ["port", f"{arch}:pe", str(ckpt), "--from", "timm:fake", "-o", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "largest difference" in captured.out and "does not compute what timm:fake computes" in captured.err
    assert f"{arch}:1:1:" in captured.err and not out.exists()
    assert main(argv + ["--tolerance", "1e9"]) == 0 and out.exists()
    monkeypatch.setattr(composer.port, "timm_reference", lambda name, state: ref)
    assert main(argv) == 0 and "largest difference 0 " in capsys.readouterr().out


def test_the_docs_port_map_example_ports_a_batchnorm_model(arch):
    text = (ROOT / "docs" / "porting.md").read_text()
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    model = composer.build(f"{arch}:bn", seed=1)
    state = model.state_dict()
    assert "stem.batchnorm.num_batches_tracked" in state
    mapping = {"source": "timm", "ignore": example["ignore"], "permute": example["permute"]}
    assert from_timm(model, state, mapping).ok
    with pytest.raises(ComposerError, match="missing"):  # what the docs used to say
        from_timm(model, state, {"source": "timm", "ignore": ["num_batches_tracked$"]})
