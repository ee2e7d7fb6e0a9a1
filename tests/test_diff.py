"""`composer diff A B`: a semantic diff of two resolved architectures, with params and MACs per stage.

Goldens: `tests/data/diff/<case>.text.expected` and `<case>.json.expected` hold the exact output of
`composer diff` for each case of GOLDEN. Run `pytest tests/test_diff.py --update-goldens` to rewrite
them, then review the changes by eye.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import composer
from composer import cli
from composer.compare import describe, diff_trees, flow_text

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "diff"
BP = "blueprints"
VARIANTS = "tests/data/diff/variants.arch"

GOLDEN = {
    "swin_t-swin_s": [f"{BP}/swin.arch:swin_t", f"{BP}/swin.arch:swin_s"],
    "convnext_t-caformer_s18": [f"{BP}/convnext.arch:convnext_t", f"{BP}/metaformer.arch:caformer_s18"],
    "crossvit_tiny-crossvit_small": [f"{BP}/crossvit.arch:crossvit_tiny", f"{BP}/crossvit.arch:crossvit_small"],
    "caformer_s18-convformer_s18": [f"{BP}/metaformer.arch:caformer_s18", f"{BP}/metaformer.arch:convformer_s18"],
    "variants-small-small_attn": [f"{VARIANTS}:small", f"{VARIANTS}:small_attn"],
    "variants-overrides": [f"{VARIANTS}:small", f"{VARIANTS}:small_attn", "--img-size", "64", "--num-classes", "5"],
    "resnet18-resnet50": [f"{BP}/resnet.arch:resnet18", f"{BP}/resnet.arch:resnet50"],
}


SWIN = [f"{BP}/swin.arch:swin_t", f"{BP}/swin.arch:swin_s"]


def run_diff(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`composer diff ...` in-process from the repository root: (exit status, stdout, stderr)."""
    import composer.loader

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(composer.loader, "_CACHE", {})
    capsys.readouterr()
    status = cli.main(["diff", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def built_params(target: str) -> dict[str, int]:
    """Parameter counts of the built model (meta device) per section: stem, stages.i, head, total."""
    model = composer.build(target, device="meta", seed=None)
    out: dict[str, int] = {"total": 0}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = f"stages[{parts[1]}]" if parts[0] == "stages" else parts[0]
        out[key] = out.get(key, 0) + p.numel()
        out["total"] += p.numel()
    return out


def cost_rows(out: str) -> dict:
    return {r["section"]: r for r in json.loads(out)["cost"]}


# ---- acceptance --------------------------------------------------------------------------------


def test_swin_t_swin_s(capsys, monkeypatch):
    status, out, err = run_diff(["swin_t", "swin_s"], capsys, monkeypatch)
    assert status == 1, err
    assert "~ stages[2].depth: 6 -> 18" in out  # the third stage, zero-based
    assert "stages[2] is the third stage" in out
    assert "~ drop_path: linspace(0, 0.2) -> linspace(0, 0.3)" in out
    assert "+ stages[2].blocks[6..17]: 12 x metaformer" in out
    assert "b: swin_s overrides swin_t: depths = [2, 2, 18, 2]; drop_path = linspace(0, 0.3)" in out
    assert "stages[0]" not in out.split("section")[0]  # nothing but stage 2 changes structurally
    status, out, _ = run_diff(["swin_t", "swin_s", "--format", "json"], capsys, monkeypatch)
    rows = cost_rows(out)
    a, b = built_params("swin_t"), built_params("swin_s")
    assert rows["total"]["params"]["delta"] == b["total"] - a["total"] == 21_317_904
    for section in ("stem", "stages[0]", "stages[1]", "stages[2]", "stages[3]", "head"):
        assert rows[section]["params"]["a"] == a[section], section
        assert rows[section]["params"]["b"] == b[section], section
    # MACs of the added stage-2 blocks: 12 swin blocks at 14x14, C=384 (window 7, 4 windows, 12 heads):
    # qkv 3C^2 + proj C^2 + mlp 8C^2 per token, plus q@k and attn@v (2 * 49 * C per token).
    tokens, c = 14 * 14, 384
    per_block = tokens * (12 * c * c + 2 * 49 * c)
    assert rows["stages[2]"]["macs"]["delta"] >= 12 * per_block  # norms, bias table lookups come on top
    assert rows["stages[2]"]["macs"]["delta"] < 12 * per_block * 1.01


def test_convnext_t_caformer_s18_mixers_per_stage(capsys, monkeypatch):
    status, out, err = run_diff(["convnext_t", "caformer_s18"], capsys, monkeypatch)
    assert status == 1, err
    lines = out.splitlines()
    mixers = [line for line in lines if ".token_mixer:" in line]
    assert any(m.startswith("+ stages[0].blocks[*].token_mixer: sepconv{") and "dwconv: conv(out=128, kernel=7"
               in m for m in mixers), mixers
    assert any(m.startswith("+ stages[1].blocks[*].token_mixer: sepconv{") for m in mixers), mixers
    assert "+ stages[2,3].blocks[*].token_mixer: attention(head_dim=32, qkv_bias=false, proj_bias=false)" in lines
    assert "~ stages[*].blocks[*].call: convnext -> metaformer" in lines
    assert "- stages[0].blocks[*].conv_dw: conv(out=96, kernel=7, groups=96)" in lines
    status, out, _ = run_diff(["convnext_t", "caformer_s18", "--format", "json"], capsys, monkeypatch)
    a, b = built_params("convnext_t"), built_params("caformer_s18")
    assert cost_rows(out)["total"]["params"]["delta"] == b["total"] - a["total"]
    assert b["total"] == 26_341_656 and a["total"] == 28_589_128  # timm's counts


def test_crossvit_two_branches_params_match_built(capsys, monkeypatch):
    status, out, _ = run_diff(["crossvit_tiny", "crossvit_small", "--format", "json"], capsys, monkeypatch)
    assert status == 1
    a, b = built_params("crossvit_tiny"), built_params("crossvit_small")
    assert cost_rows(out)["total"]["params"]["delta"] == b["total"] - a["total"]
    paths = [c["path"] for c in json.loads(out)["changes"]]
    assert "stages[*].blocks[*].blocks1.metaformer{1..4}.token_mixer" in paths  # both branches are compared
    assert "stages[*].blocks[*].blocks0.metaformer.token_mixer" in paths


def test_identical(capsys, monkeypatch):
    status, out, err = run_diff(["swin_t", f"{BP}/swin.arch:swin_t"], capsys, monkeypatch)
    assert status == 0, err
    assert "no differences" in out
    assert len(out.splitlines()) == 3
    status, out, _ = run_diff(["swin_t", "swin_t", "--format", "json"], capsys, monkeypatch)
    assert status == 0 and json.loads(out)["identical"] is True and json.loads(out)["changes"] == []


def test_overrides_apply_to_both_sides(capsys, monkeypatch):
    status, out, _ = run_diff([*SWIN, "--num-classes", "10", "--format", "json"], capsys, monkeypatch)
    rows = cost_rows(out)
    assert rows["head"]["params"]["a"] == rows["head"]["params"]["b"] == 768 * 2 + 768 * 10 + 10
    same = [f"{BP}/swin.arch:swin_t"] * 2
    status, _, _ = run_diff([*same, "--set", "depths=[2, 2, 2, 2]"], capsys, monkeypatch)
    assert status == 0


@pytest.mark.parametrize("argv, message", [
    (["swin_t", "swin_q"], "no zoo model 'swin_q'"),
    (["nope.arch", "swin_t"], "no such file: nope.arch"),
    ([f"{BP}/swin.arch:swin_t", f"{BP}/swin.arch:swin_x"], "no model 'swin_x'"),
    ([*SWIN, "--set", "nope=1"], "has no parameter 'nope'"),
])
def test_errors_exit_2(argv, message, capsys, monkeypatch):
    status, out, err = run_diff(argv, capsys, monkeypatch)
    assert status == 2
    assert message in err and "error:" in err and "Traceback" not in err
    assert "while loading" in err
    assert out == ""


def test_colour_only_when_asked_or_on_a_terminal(capsys, monkeypatch):
    _, out, _ = run_diff(SWIN, capsys, monkeypatch)  # captured: not a terminal
    assert "\x1b[" not in out
    _, out, _ = run_diff([*SWIN, "--color", "always"], capsys, monkeypatch)
    assert "\x1b[33m~ stages[2].depth: 6 -> 18\x1b[0m" in out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    _, out, _ = run_diff([*SWIN, "--color", "never"], capsys, monkeypatch)
    assert "\x1b[" not in out
    _, out, _ = run_diff(SWIN, capsys, monkeypatch)
    assert "\x1b[32m+ stages[2].blocks[6..17]: 12 x metaformer\x1b[0m" in out


def test_markdown(capsys, monkeypatch):
    status, out, _ = run_diff([*SWIN, "--format", "markdown"], capsys, monkeypatch)
    assert status == 1
    assert "| `stages[2].depth` | changed | `6` | `18` |" in out
    assert "| total | 28,288,354 | 49,606,258 | +21,317,904 |" in out


def test_python_api():
    d = composer.diff(composer.load("swin_t"), composer.load("swin_s"))
    assert not d.identical
    assert ("stages[2].depth", 6, 18) in [(c.where, c.a, c.b) for c in d.changes]
    assert composer.diff(composer.load("swin_t"), composer.load("swin_t")).identical


# ---- the tree diff on hand-written trees -------------------------------------------------------


def test_tree_diff_collapses_and_locates():
    blk = {"call": "b", "mix": "pool()", "fc": "linear(out=8)", "flow": ["mix", "fc"]}
    new = {**blk, "mix": "attention(heads=2)"}
    a = {"stages": [{"blocks": [blk, blk]}, {"blocks": [blk, blk, blk]}, {"blocks": [blk, blk, blk, blk]}]}
    b = {"stages": [{"blocks": [new, new]}, {"blocks": [new, new]}, {"blocks": [blk, new, blk, new]}], "extra": "x"}
    got = [(c.where, c.change, c.a, c.b) for c in diff_trees(a, b)]
    assert got == [
        ("stages[0,1].blocks[*].mix", "changed", "pool()", "attention(heads=2)"),
        ("stages[1].blocks[2]", "removed", "b{mix: pool(); fc: linear(out=8)}", None),
        ("stages[2].blocks[1,3].mix", "changed", "pool()", "attention(heads=2)"),
        ("extra", "added", None, "x"),
    ]
    b["stages"][2]["blocks"] = [new] * 4 + [new] * 3
    assert [c.where for c in diff_trees(a, b)][:3] == ["stages[*].blocks[*].mix", "stages[1].blocks[2]",
                                                        "stages[2].blocks[4..6]"]


def test_tree_diff_numbered_siblings_and_flow():
    a = {"norm1": "layernorm()", "norm2": "layernorm()", "x": "relu()",
         "flow": [["residual", [], ["norm1", "x"]], "norm2"]}
    b = {"norm1": "rmsnorm()", "norm2": "rmsnorm()", "x": "relu()", "flow": ["norm1", "x", "norm2"]}
    got = [(c.where, c.a, c.b) for c in diff_trees(a, b)]
    assert got == [("norm{1,2}", "layernorm()", "rmsnorm()"), ("flow", "residual(norm1 x) norm2", "norm1 x norm2")]
    # entries only one side has do not make the flow differ by themselves
    c = {**b, "y": "gelu()", "flow": ["norm1", "x", "y", "norm2"]}
    assert [ch.where for ch in diff_trees(b, c)] == ["y"]
    assert flow_text([["parallel", "concat", ["a"], ["b", ["save", "t"]]]]) == "concat(a | b save t)"


def test_describe_is_plain_data():
    tree = describe(composer.load(f"{BP}/swin.arch:swin_t"))
    json.dumps(tree)  # nested dicts, lists and strings only
    assert tree["drop_path"] == "linspace(0, 0.2)"
    assert [s["depth"] for s in tree["stages"]] == [2, 2, 6, 2]
    mixer = tree["stages"][0]["blocks"][1]["token_mixer"]
    assert mixer == "attention(heads=3, partition=window(size=7, shift=3), position=relative_bias())"


# ---- goldens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden(case, fmt, capsys, monkeypatch, update_goldens):
    status, out, err = run_diff([*GOLDEN[case], "--format", fmt, "--color", "never"], capsys, monkeypatch)
    assert status == 1, err
    expected = DATA / f"{case}.{fmt}.expected"
    if update_goldens:
        expected.write_text(out, encoding="utf-8")
        return
    assert expected.is_file(), f"missing {expected.name}; run pytest with --update-goldens"
    assert out == expected.read_text(encoding="utf-8")


def test_every_expected_has_a_case():
    names = {f"{case}.{fmt}.expected" for case in GOLDEN for fmt in ("text", "json")}
    assert {p.name for p in DATA.glob("*.expected")} <= names


# ---- torch-free --------------------------------------------------------------------------------


def test_diff_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from composer.cli import main; status = main(['diff', 'swin_t', 'swin_s', '--format', 'json'])\n"
            "assert sys.modules.get('torch') is None; sys.exit(status)")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["cost"][-1]["params"]["delta"] == 21_317_904
