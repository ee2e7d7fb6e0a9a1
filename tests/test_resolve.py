"""Resolution semantics: inheritance, per-block values, naming, stages."""

import pytest

import composer
import composer.resolve as R
from composer.diagnostics import ComposerError
from helpers import write

TINY = """
model tiny(num_classes = 10, img_size = 32, depths = [1, 2], dims = [8, 16]) {
    input image(3, img_size)
    stem conv(dims[0], 3, stride = 2)
    stages for i in 0..2 {
        downsample i > 0 ? conv(dims[i], 2, stride = 2) : none
        repeat depths[i] as j unit(dims[i], k = alternate(3, 5), tag = j)
    }
    head { global_pool("avg"); classifier(num_classes) }
    drop_path = linspace(0, 0.3)
}
block unit(dim, k = 3, tag = 0) {
    residual { conv(dim, k, groups = dim); batchnorm; relu; conv(dim, 1) }
}
model wide : tiny { dims = [16, 32]; num_classes = 5 }
"""


def test_stages_blocks_and_schedules(tmp_path):
    path = write(tmp_path, TINY)
    plan = composer.load(f"{path}:tiny")
    m = R.resolve_model(R.load(path), "tiny", {})  # the resolved model the plan was lowered from
    assert [len(s.blocks) for s in m.stages] == [1, 2]
    assert m.drop_path == pytest.approx([0.0, 0.15, 0.3])  # linspace over all 3 blocks
    kernels = [b.items[0].body[0].op.kernel for s in m.stages for b in s.blocks]
    assert kernels == [3, 3, 5]  # alternate() cycles within each stage
    # names: conv1/conv2 numbered because `conv` occurs twice in the scope, others as written
    names = [it.name for it in m.stages[1].blocks[0].items[0].body]
    assert names == ["conv1", "batchnorm", "relu", "conv2"]
    assert plan.stages[1].y.channels == 16 and plan.stages[1].y.spatial == (8, 8)


def test_variant_overrides(tmp_path):
    path = write(tmp_path, TINY)
    base, wide = composer.load(f"{path}:tiny"), composer.load(f"{path}:wide")
    assert wide.arguments["dims"] == [16, 32] and wide.arguments["num_classes"] == 5
    assert [name for name, _ in wide.overrides] == ["dims", "num_classes"]
    # a hand count for the wide variant's stem: 3x3 conv from 3 to 16 channels with bias
    assert wide.stem.params == 16 * 3 * 9 + 16
    assert base.stem.params == 8 * 3 * 9 + 8


def test_set_overrides_and_build_keys(tmp_path):
    path = write(tmp_path, TINY)
    plan = composer.load(f"{path}:tiny", img_size=64, in_chans=1, num_classes=3)
    assert plan.input.channels == 1 and plan.input.spatial == (64, 64)
    assert plan.head.y.channels == 3


def test_parallel_split_and_concat(tmp_path):
    path = write(tmp_path, """
model m { input image(4, 8); stem parallel concat(split = [1, 3]) { conv(2); { conv(5, 3) } } }
""")
    plan = composer.load(path)
    assert plan.stem.y.channels == 7
    # hand count: conv 1->2 (1x1, bias) + conv 3->5 (3x3, bias)
    assert plan.params == (1 * 2 + 2) + (3 * 5 * 9 + 5)


def test_one_dimensional_input(tmp_path):
    path = write(tmp_path, """
model ecg { input signal(12, 500); stem conv(32, 7, stride = 2); stage { repeat 2 conv(32, 3) };
            head { global_pool("avg"); classifier(5) } }
""")
    plan = composer.load(path)
    assert plan.stem.y.spatial == (250,)
    assert plan.params == (12 * 32 * 7 + 32) + 2 * (32 * 32 * 3 + 32) + (32 * 5 + 5)


def test_cyclic_inheritance(tmp_path):
    path = write(tmp_path, "model a : b { x = 1 }\nmodel b : a { x = 2 }\n")
    with pytest.raises(ComposerError) as info:
        composer.load(f"{path}:a")
    assert info.value.code == "cyclic-inheritance"


def test_mul_broadcasts_a_pooled_gate(tmp_path):
    path = write(tmp_path, """
model m { input image(8, 6); stem parallel mul { identity; { adaptive_pool(1); conv(8, 1); sigmoid } } }
""")
    plan = composer.load(path)
    assert plan.stem.y.spatial == (6, 6) and plan.stem.y.channels == 8
    bad = write(tmp_path, "model m { input image(8, 6); stem parallel mul { identity; adaptive_pool(2) } }", "bad.arch")
    with pytest.raises(ComposerError) as info:
        composer.load(bad)
    assert info.value.code == "shape"


def test_plan_graph_is_a_networkx_digraph():
    import networkx as nx

    plan = composer.load("swin_t")
    g = plan.graph
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    ops = [n for n, d in g.nodes(data=True) if d["kind"] == "op"]
    # 12 blocks, each: norm1, attention, norm2, mlp's fc1/act/fc2 = 6 ops; plus the stem, 3 merges, the head
    assert sum(1 for n in ops if n.startswith("stages.") and ".blocks." in n) == 12 * 6
    assert g.nodes["head.classifier"]["y"].channels == 1000
    assert nx.has_path(g, "input", "head.classifier")


def test_require_states_a_blueprints_own_condition(tmp_path, capsys):
    from composer.cli import main

    path = write(tmp_path, """
model m(img_size = 32) {
    let sized = require(img_size == 32, "m is defined at 32 px only")
    input image(3, img_size)
    stem { conv(4, 3); quick_gelu }
}
""")
    assert main(["check", path]) == 0
    capsys.readouterr()
    assert main(["check", path, "--img-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "m.arch:3:17: error: m is defined at 32 px only" in err and "^^^" in err


FLOW = """
block pair(dim) {
    residual { conv(dim, 3, padding = 1) as c1 }
    parallel add { conv(dim, 1) as p1; conv(dim, 1) as p2 }
}
model flow {
    input image(3, 8)
    stem { conv(4, 3, padding = 1) as c0; save early; relu as r0 }
    stage { repeat 1 pair(4) }
    head { from early; global_pool(); classifier(10) }
}
"""


def test_graph_derived_from_the_steps_counted_by_hand(tmp_path):
    plan = composer.load(f"{write(tmp_path, FLOW)}:flow")
    g = plan.graph
    ops = [s.path for sec in plan.sections for st in sec.steps for s in st.walk() if s.kind == "op"]
    assert set(ops) <= set(g.nodes) and all(g.nodes[n]["kind"] == "op" for n in ops)  # every op is a node
    b = "stages.0.blocks.0"
    res, par = f"{b}.add@3:5", f"{b}.add@4:5"  # merge nodes named by the residual's and the parallel's line
    assert g.nodes[res]["merge"] == g.nodes[par]["merge"] == "add"
    # nodes: input, c0, r0, c1, the residual's sum, p1, p2, the parallel's sum, global_pool, classifier
    assert g.number_of_nodes() == 10
    # `from early` continues from c0, where the tensor was saved; the shortcut joins from r0
    assert set(g.edges) == {
        ("input", "stem.c0"), ("stem.c0", "stem.r0"), ("stem.r0", f"{b}.c1"), (f"{b}.c1", res), ("stem.r0", res),
        (res, f"{b}.p1"), (res, f"{b}.p2"), (f"{b}.p1", par), (f"{b}.p2", par),
        ("stem.c0", "head.global_pool"), ("head.global_pool", "head.classifier")}
