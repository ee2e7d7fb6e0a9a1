"""`composer graph`: SVG, DOT, Mermaid and HTML block diagrams (issue 6, item 2)."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from helpers import REPO

import composer
from composer.cli import main

SVG = "{http://www.w3.org/2000/svg}"

# Hand-written from the papers / blueprints: stages, blocks per stage, collapsed runs per stage.
EXPECTED = {
    # Swin-T: depths 2-2-6-2; the two blocks of a pair differ only by the window shift (0, 3)
    "swin_t": {
        "stages": 4, "runs": [[2], [2], [6], [2]],
        "labels": ["2 x metaformer(attention(3 heads, window 7), mlp)",
                   "6 x metaformer(attention(12 heads, window 7), mlp)",
                   "2 x metaformer(attention(24 heads, window 7), mlp)"],
        "shapes": ["3x224x224", "96x56x56", "3136x96 tokens", "784x192 tokens", "196x384 tokens", "49x768 tokens",
                   "768", "1000"],
    },
    # CrossViT-Ti: one stage of 3 multi-scale blocks over two streams (240 px / 12 and 224 px / 16 patches)
    "crossvit_tiny": {
        "stages": 1, "runs": [[3]], "labels": ["3 x multiscale"],
        "shapes": ["3x240x240", "401x96 tokens", "197x192 tokens", "3x224x224"],
    },
    # MaxViT-T: depths 2-2-5-2; the first block of each stage is strided, the rest repeat
    "maxvit_t": {
        "stages": 4, "runs": [[1, 1], [1, 1], [1, 4], [1, 1]], "labels": ["maxvit_block(", "4 x maxvit_block("],
        "shapes": ["3x224x224", "64x112x112", "1000"],
    },
}


@pytest.fixture(autouse=True)
def _threads():
    import torch

    torch.set_num_threads(1)


def graph(tmp_path, model, suffix=".svg", *extra):
    out = tmp_path / f"{model}{suffix}"
    assert main(["graph", model, "-o", str(out), *extra]) == 0
    return out


def classes(el) -> list[str]:
    return el.get("class", "").split()


def node_text(g) -> str:
    """A box's label: its label lines joined (a long label is wrapped over several lines)."""
    return " ".join(t.text.strip() for t in g.iter(f"{SVG}text") if "label" in classes(t))


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_svg_structure(tmp_path, model):
    exp = EXPECTED[model]
    root = ET.parse(graph(tmp_path, model)).getroot()
    assert root.tag == f"{SVG}svg"
    assert float(root.get("width")) > 100 and float(root.get("height")) > 100
    stages = [g for g in root.iter(f"{SVG}g") if classes(g) == ["stage"]]
    assert len(stages) == exp["stages"] == len(composer.load(model).stages)
    # every stage group is titled with its name, and its collapsed runs add up to the stage's depth
    for i, (g, runs) in enumerate(zip(stages, exp["runs"])):
        titles = [t.text for t in g.iter(f"{SVG}text") if "title" in classes(t)]
        assert titles[0] == f"stages.{i}"
        blocks = [b for b in g.iter(f"{SVG}g") if "block" in classes(b)]
        assert [int(b.get("data-repeat")) for b in blocks] == runs
    labels = [node_text(g) for g in root.iter(f"{SVG}g") if "block" in classes(g)]
    for want in exp["labels"]:
        assert any(want in label for label in labels), (want, labels)
    edge_labels = {t.text for t in root.iter(f"{SVG}text") if "shape" in classes(t)}
    for shape in exp["shapes"]:
        assert any(label == shape or label.endswith(": " + shape) for label in edge_labels), (shape, edge_labels)
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert model in texts and "params" in texts and "MACs" in texts


def test_swin_notes_and_head(tmp_path):
    root = ET.parse(graph(tmp_path, "swin_t")).getroot()
    notes = [t.text for t in root.iter(f"{SVG}text") if "note" in classes(t)]
    assert notes.count("shift 0/3") == 4  # every stage's pair alternates shift 0 and 3 (= 7 // 2)
    heads = [g for g in root.iter(f"{SVG}g") if classes(g) == ["head"]]
    assert len(heads) == 1
    assert {node_text(g) for g in heads[0].iter(f"{SVG}g") if "node" in classes(g)} == \
        {"layernorm", "global avg pool", "classifier, 1000"}
    title = next(t.text for t in root.iter(f"{SVG}text") if "model-subtitle" in classes(t))
    assert title.startswith("28.29M params")  # 28,288,354 parameters (timm's swin_tiny)


def test_crossvit_named_streams(tmp_path):
    root = ET.parse(graph(tmp_path, "crossvit_tiny")).getroot()
    named = [p for p in root.iter(f"{SVG}path") if classes(p) == ["edge", "named"]]
    # from input (the resized stream), s0 and s1 into the blocks, s0 and s1 into the two heads
    assert len(named) == 5
    labels = {t.text for t in root.iter(f"{SVG}text") if "shape" in classes(t)}
    assert {"s0: 401x96 tokens", "s1: 197x192 tokens", "input: 3x240x240"} <= labels
    merges = [node_text(g) or "".join(t.text for t in g.iter(f"{SVG}text"))
              for g in root.iter(f"{SVG}g") if "merge" in classes(g)]
    assert merges == ["mean"]  # the two heads' logits averaged


def test_expand_draws_every_block(tmp_path):
    plain = ET.parse(graph(tmp_path, "swin_t")).getroot()
    out = tmp_path / "x" / "swin_expanded.svg"
    assert main(["graph", "swin_t", "-o", str(out), "--expand"]) == 0
    full = ET.parse(out).getroot()
    count = lambda root: sum(1 for g in root.iter(f"{SVG}g") if "block" in classes(g))
    assert count(plain) == 4 and count(full) == 2 + 2 + 6 + 2
    assert len([g for g in full.iter(f"{SVG}g") if classes(g) == ["stage"]]) == 4
    ops = [node_text(g) for g in full.iter(f"{SVG}g") if "node" in classes(g)]
    assert ops.count("attention(3 heads, window 7)") == 1 and ops.count("attention(3 heads, window 7, shift 3)") == 1
    adds = [g for g in full.iter(f"{SVG}g") if "merge" in classes(g)]
    assert len(adds) == 2 * 12  # two residual adds per block
    assert len([p for p in full.iter(f"{SVG}path") if "skip" in classes(p)]) == 24


def test_dot_and_mermaid(tmp_path):
    dot = graph(tmp_path, "swin_t", ".dot").read_text()
    assert dot.startswith("digraph") and dot.count("{") == dot.count("}")
    assert dot.count("subgraph cluster_") == 1 + 4 + 1  # stem, 4 stages, head
    for i in range(4):
        assert f'label="stages.{i}\\n' in dot
    assert "2 x metaformer" in dot and "6 x metaformer" in dot and '"96x56x56"' in dot
    mmd = graph(tmp_path, "crossvit_tiny", ".mmd").read_text()
    lines = mmd.splitlines()
    assert lines[0] == "flowchart TD"
    assert sum(1 for x in lines if x.strip().startswith("subgraph ")) == sum(1 for x in lines if x.strip() == "end") == 3
    assert 'stages.0' in mmd and "==>|\"s0: 401x96 tokens\"|" in mmd
    assert mmd.count("[") == mmd.count("]") and mmd.count("(") == mmd.count(")")


def test_html_page(tmp_path):
    page = graph(tmp_path, "swin_t", ".html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "</svg>" in page
    assert "<td>stages.3</td>" in page and "28,288,354" in page  # the summary table's total
    svg = page[page.index("<svg"):page.index("</svg>") + 6]
    assert len([g for g in ET.fromstring(svg).iter(f"{SVG}g") if classes(g) == ["stage"]]) == 4


def test_unknown_suffix_and_no_partial_file(tmp_path, capsys):
    out = tmp_path / "model.jpg"
    assert main(["graph", "swin_t", "-o", str(out)]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()
    # a failing model leaves an existing file untouched and no temporary file behind
    target = tmp_path / "keep.svg"
    target.write_text("old")
    assert main(["graph", "no_such_model", "-o", str(target)]) == 2
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["keep.svg"]


def test_overrides_reach_the_diagram(tmp_path):
    out = tmp_path / "s.svg"
    assert main(["graph", "swin_t", "-o", str(out), "--set", "depths=[2, 2, 2, 2]", "--num-classes", "10"]) == 0
    root = ET.parse(out).getroot()
    assert [int(g.get("data-repeat")) for g in root.iter(f"{SVG}g") if "block" in classes(g)] == [2, 2, 2, 2]
    assert "10" in {t.text for t in root.iter(f"{SVG}text") if "shape" in classes(t)}


def test_graph_without_torch(tmp_path):
    """SVG, and PNG through matplotlib (which must not pull torch in either)."""
    out, png = tmp_path / "m.svg", tmp_path / "m.png"
    code = ("import sys; sys.modules['torch'] = None\n"
            f"from composer.cli import main; rc = main(['graph', 'maxvit_t', '-o', {str(out)!r}])\n"
            f"rc = rc or main(['graph', 'maxvit_t', '-o', {str(png)!r}, '--direction', 'LR'])\n"
            "assert sys.modules.get('torch') is None; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert ET.parse(out).getroot().tag == f"{SVG}svg"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_named_edge_says_what_was_saved(tmp_path):
    """Mobile-Former's head reads the tokens `z` (3 x 128, saved by the bridge) into a pool over a
    map: the edge says `z: 3x128 tokens`, what the bridge saved, not the map it becomes."""
    mmd = graph(tmp_path, "mobile_former_26m", ".mmd").read_text()
    z_edges = [line for line in mmd.splitlines() if '==>|"z: ' in line]
    assert len(z_edges) == 10 and all('"z: 3x128 tokens"' in e for e in z_edges), z_edges
