"""`composer graph` for papers (issue 16, item 6): every zoo model's drawing checked against its plan,
the left-to-right layout, whole labels, opened blocks, PDF and PNG."""

import os
import struct
import sys
import xml.etree.ElementTree as ET

import pytest
from helpers import write

import composer
from composer.api import zoo_index
from composer.cli import main
from composer.render_svg import to_svg
from composer.render_tree import diagram

SVG = "{http://www.w3.org/2000/svg}"
ZOO = zoo_index()


def classes(el) -> list[str]:
    return el.get("class", "").split()


def read(svg: str):
    """What the drawing shows: its boxes (id -> the plan steps each names, its rectangle on the page)
    and its edges (source box, target box), read from the SVG."""
    root = ET.fromstring(svg)
    steps, rects = {}, {}
    for g in root.iter(f"{SVG}g"):
        if g.get("data-steps") is None:
            continue
        steps[g.get("id")] = g.get("data-steps").split()
        shape = next(c for c in g if c.tag in (f"{SVG}rect", f"{SVG}circle"))
        if shape.tag == f"{SVG}circle":
            cx, cy, r = (float(shape.get(k)) for k in ("cx", "cy", "r"))
            rects[g.get("id")] = (cx - r, cy - r, 2 * r, 2 * r)
        else:
            rects[g.get("id")] = tuple(float(shape.get(k)) for k in ("x", "y", "width", "height"))
    edges = [(p.get("data-src"), p.get("data-dst")) for p in root.iter(f"{SVG}path") if "edge" in classes(p)]
    return root, steps, rects, edges


def wrong_edges(plan, svg: str) -> list:
    """The drawing's edges against the plan's data flow. The expectation comes from
    Plan.to_networkx (ops, merges and reuses as nodes; a `from` continues where its tensor was
    saved), which the renderer does not use: each end is replaced by the box that stands for it
    (the box naming that step, else the one naming the longest path it lies under: a collapsed
    composite, a run of blocks), and edges inside one box vanish."""
    _, steps, _, edges = read(svg)
    box = {name: b for b, names in steps.items() for name in names}

    def box_of(node: str) -> str:
        key = node
        while key not in box:
            assert "." in key, f"{plan.name}: plan node {node} is in no box of the drawing"
            key = key.rsplit(".", 1)[0]
        return box[key]

    g = plan.to_networkx()
    want = {(box_of(u), box_of(v)) for u, v in g.edges if box_of(u) != box_of(v)}
    out = box["output"]
    got = {e for e in edges if e[1] != out}
    into_output = [e[0] for e in edges if e[1] == out]
    sinks = {box_of(n) for n in g.nodes if g.out_degree(n) == 0}
    def say(e):  # an edge by the first step each end names
        return " -> ".join(steps[b][0] if b in steps else str(b) for b in e)

    bad = [("missing", say(e)) for e in sorted(want - got)] + [("extra", say(e)) for e in sorted(got - want)]
    if len(into_output) != 1 or into_output[0] not in sinks:
        bad.append(("output from", [say((b,)) for b in into_output]))
    return bad


def test_every_zoo_model_draws_the_edges_of_its_plan():
    assert len(ZOO) >= 178
    bad = {}
    for name, path in ZOO.items():
        plan = composer.load(f"{path}:{name}")  # by file: a zoo name would read the whole zoo's index again
        wrong = wrong_edges(plan, to_svg(diagram(plan)))
        if wrong:
            bad[name] = wrong[:4]
    assert not bad, bad


# models with named tensors (`save`/`from`) passed on through blocks: a box that saves or passes on a
# tensor it received does not make it (vit_adapter's extractor, stvit's semantic blocks)
@pytest.mark.parametrize("name", ["vit_adapter_t", "stvit_r_swin_t", "crossvit_tiny", "mobile_former_26m"])
def test_expanded_and_left_to_right_drawings_keep_the_edges(name):
    plan = composer.load(name)
    for expand, direction in ((True, "TB"), (True, "LR"), (False, "LR")):
        assert wrong_edges(plan, to_svg(diagram(plan, expand), direction)) == [], (expand, direction)


def overlaps(rects) -> list:
    items = list(rects.items())
    return [(a, b) for i, (a, (ax, ay, aw, ah)) in enumerate(items) for b, (bx, by, bw, bh) in items[i + 1:]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah]


@pytest.mark.parametrize("direction", ["TB", "LR"])
def test_edges_run_along_the_flow(direction):
    """Left to right every edge leaves a box for one further right; top-down for one further down."""
    for name, opened in (("swin_t", ()), ("convnext_atto", ("stages.1.blocks.0",)), ("crossvit_tiny", ())):
        plan = composer.load(name)
        root, steps, rects, edges = read(to_svg(diagram(plan, opened=opened), direction))
        for src, dst in edges:
            (sx, sy, sw, sh), (tx, ty, tw, th) = rects[src], rects[dst]
            assert (tx >= sx + sw if direction == "LR" else ty >= sy + sh), (name, steps[src], steps[dst])
        assert not overlaps(rects)
        width, height = float(root.get("width")), float(root.get("height"))
        xs = [x + w for x, _, w, _ in rects.values()]
        ys = [y + h for _, y, _, h in rects.values()]
        assert max(xs) < width and max(ys) < height
        if direction == "LR":  # a row: wider than tall
            assert width > 2 * height


LONG_MIXER = "a_mixer_whose_name_is_far_longer_than_any_box_would_hold_on_one_line_of_a_figure"
LONG_BLOCK = "and_a_block_with_an_equally_long_name_so_that_the_collapsed_run_label_wraps_too"


def test_long_labels_are_whole_and_boxes_do_not_overlap(tmp_path):
    path = write(tmp_path, f"""
mixer {LONG_MIXER}(dim) {{ conv(dim, 3, groups = dim); conv(dim, 1) }}
block {LONG_BLOCK}(dim) {{ residual {{ layernorm; {LONG_MIXER}(dim) }} }}
model m {{
    input image(3, 32)
    stem conv(16, 4, stride = 4)
    stages for i in 0..2 {{ repeat 2 {LONG_BLOCK}(16) }}
    head {{ global_pool("avg"); classifier(10) }}
}}
""")
    plan = composer.load(path)
    from composer.render_layout import CW, PADX

    for direction in ("TB", "LR"):
        for opened in ((), (f"stages.1.blocks.0.{LONG_MIXER}",)):
            root, steps, rects, _ = read(to_svg(diagram(plan, opened=opened), direction))
            assert not overlaps(rects)
            texts = []
            for g in root.iter(f"{SVG}g"):
                lines = [t.text for t in g if t.tag == f"{SVG}text" and "label" in classes(t)]
                if lines:
                    texts.append("".join(lines).replace(" ", ""))
                    x, y, w, h = rects[g.get("id")]
                    assert all(len(line) * CW <= w - 2 * PADX + 0.1 for line in lines)  # in its box (to 0.1 px)
                    assert len(lines) > 1 or len(lines[0]) <= 54
            # the whole run label: `2 x BLOCK(MIXER(dwconv 3x3))`, over several lines, nothing cut
            assert f"2x{LONG_BLOCK}({LONG_MIXER}(dwconv3x3))" in texts
            if opened:  # the block opened, its mixer opened: the mixer's title and its two convs
                titles = [t.text for t in root.iter(f"{SVG}text") if "title" in classes(t)]
                assert f"block 0: {LONG_BLOCK}" in titles and LONG_MIXER in titles
                assert {"dwconv3x3", "conv1x1,16"} <= set(texts)


def test_the_font_fits_the_measure():
    """Boxes are sized at CW pixels a character: the PDF's and PNG's font is no wider."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    from composer.render_layout import CW

    text = "metaformer(attention(3 heads, window 7), mlp) Wmw_"
    width = TextPath((0, 0), text, size=12, prop=FontProperties(family="DejaVu Sans Mono")).get_extents().width
    assert width <= len(text) * CW


def test_open_a_stage_a_block_and_a_composite(tmp_path):
    def blocks(*opened):
        out = tmp_path / "s.svg"
        assert main(["graph", "swin_t", "-o", str(out), *(a for n in opened for a in ("--open", n))]) == 0
        root = ET.parse(out).getroot()
        groups = [g.get("id") for g in root.iter(f"{SVG}g") if classes(g) == ["block"]]
        runs = [int(g.get("data-repeat")) for g in root.iter(f"{SVG}g") if g.get("data-repeat")]
        return root, groups, runs

    # swin_t's depths are 2-2-6-2: collapsed, each stage is one run
    _, groups, runs = blocks()
    assert groups == [] and runs == [2, 2, 6, 2]
    # a block opened splits its run: block 3 of stage 2 drawn inside, blocks 0-2 and 4-5 collapsed
    root, groups, runs = blocks("stages.2.blocks.3")
    assert groups == ["g_stages.2.blocks.3"] and runs == [2, 2, 3, 2, 2]
    inside = next(g for g in root.iter(f"{SVG}g") if g.get("id") == "g_stages.2.blocks.3")
    ops = [g.get("data-steps") for g in inside.iter(f"{SVG}g") if g.get("data-steps")]
    assert ops[:2] == ["stages.2.blocks.3.norm1", "stages.2.blocks.3.token_mixer"] and "stages.2.blocks.3.mlp" in ops
    # a stage opened draws each of its blocks; a composite opened draws its ops (and opens its block)
    _, groups, runs = blocks("stages.1", "stages.3.blocks.0.mlp")
    assert groups == ["g_stages.1.blocks.0", "g_stages.1.blocks.1", "g_stages.3.blocks.0"] and runs == [2, 6, 1]
    plan = composer.load("swin_t")
    opened = ("stages.1", "stages.3.blocks.0.mlp")
    assert wrong_edges(plan, to_svg(diagram(plan, opened=opened))) == []
    mlp = {n.steps for n in diagram(plan, opened=opened).nodes.values() if n.steps.startswith("stages.3.blocks.0.mlp")}
    assert mlp == {"stages.3.blocks.0.mlp.fc1", "stages.3.blocks.0.mlp.act", "stages.3.blocks.0.mlp.fc2"}


def test_an_unknown_name_to_open(tmp_path, capsys):
    out = tmp_path / "s.svg"
    assert main(["graph", "swin_t", "-o", str(out), "--open", "stages.9"]) == 2
    err = capsys.readouterr().err
    assert "swin.arch:" in err and "error: swin_t has no stage, block or composite 'stages.9' to open" in err
    assert "openable: stages.0, stages.1, stages.2, stages.3" in err and "Traceback" not in err
    assert main(["graph", "swin_t", "-o", str(out), "--open", "stages.2.blocks.7"]) == 2
    err = capsys.readouterr().err
    assert "openable in stages.2: stages.2.downsample, stages.2.blocks.0," in err and "stages.2.blocks.5" in err
    assert not out.exists()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pdf_and_png(tmp_path):
    svg, pdf, png = tmp_path / "a.svg", tmp_path / "a.pdf", tmp_path / "pic"
    old = os.umask(0o027)
    try:
        assert main(["graph", "convnext_atto", "-o", str(svg), "--direction", "LR"]) == 0
        assert main(["graph", "convnext_atto", "-o", str(pdf), "--direction", "LR"]) == 0
        assert main(["graph", "convnext_atto", "-o", str(png), "--format", "png", "--direction", "LR"]) == 0
    finally:
        os.umask(old)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF") and 5_000 < len(data) < 1_000_000
    assert b"DejaVuSansMono" in data  # the font embedded (TrueType), so the text stays text
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and 20_000 < len(data) < 5_000_000
    root = ET.parse(svg).getroot()  # twice the SVG's size in pixels
    assert png_size(data) == (round(2 * float(root.get("width"))), round(2 * float(root.get("height"))))
    for f in (pdf, png, svg):
        assert f.stat().st_mode & 0o777 == 0o640  # the umask's, as every written file
    assert sorted(os.listdir(tmp_path)) == ["a.pdf", "a.svg", "pic"]  # no temporary file left


def test_pdf_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "x.pdf"
    assert main(["graph", "convnext_atto", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and 'pip install "arch-composer[pictures]"' in err and "Traceback" not in err
    assert not out.exists()
    assert main(["graph", "convnext_atto", "-o", str(tmp_path / "x.svg")]) == 0  # SVG needs nothing more


def test_format_and_suffix_disagree(tmp_path, capsys):
    assert main(["graph", "convnext_atto", "-o", str(tmp_path / "x.svg"), "--format", "pdf"]) == 2
    assert "names a svg file, not pdf" in capsys.readouterr().err


def test_text_formats_follow_the_direction(tmp_path):
    dot, mmd = tmp_path / "a.dot", tmp_path / "a.mmd"
    assert main(["graph", "convnext_atto", "-o", str(dot), "--direction", "LR"]) == 0
    assert main(["graph", "convnext_atto", "-o", str(mmd), "--direction", "LR"]) == 0
    assert "rankdir=LR;" in dot.read_text()
    text = mmd.read_text()
    assert text.startswith("flowchart LR\n") and "direction TB" not in text and "direction LR" in text
