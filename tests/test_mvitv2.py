"""Pooling attention written with the primitives (issue 14): `heads_to_batch` / `batch_to_heads`
(every head a map of its own in the batch, so any map op pools it with weights the heads share)
against the per-head maps written out; `axis_relative_logits(scaled = true)` (relative logits
per axis between grids of different sizes) against its equation; the `pooling_attention`
composite against timm's MultiScaleAttention with copied weights; the MViTv2 family against
timm (parameters, logits after porting, another build size, other run sizes refused)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import composer
from composer.diagnostics import ComposerError
from composer.program import Attend
from tests.helpers import perturb, write

timm = pytest.importorskip("timm")

_FILES = iter(range(10 ** 6))


def block_model(tmp_path, body: str, grid=(6, 8), dim: int = 16):
    """A one-block model whose tokens lie on `grid`; its modules by name under `b.` and its plan."""
    text = f"""import "lib/pooling_mixers"
model m {{
    input image(3, [{4 * grid[0]}, {4 * grid[1]}])
    stem {{ conv({dim}, 4, stride = 4) as proj; to_tokens }}
    stage {{ block {{ {body} }} }}
    head {{ global_pool("avg"); classifier(10) }}
}}
"""
    path = write(tmp_path, text, f"m{next(_FILES)}.arch")
    model = composer.build(path).eval()
    mods = {k.replace("stages.0.blocks.0.", "b."): v for k, v in model.named_modules()}
    return mods, model, composer.load(path)


def _steps(plan):
    for sec in plan.sections:
        for step in sec.steps:
            yield from step.walk()


def test_heads_to_batch_pools_every_head_with_the_shared_op(tmp_path):
    grid, heads, d = (6, 8), 2, 8
    mods, model, plan = block_model(tmp_path, f"""h = split_heads({heads})
        h = {{ from h; heads_to_batch as fold; conv({d}, 3, stride = 2, groups = {d}, bias = false) as pool
              batch_to_heads as unfold }}
        from h
        merge_heads""", grid)
    fold, pool, unfold = mods["b.fold"], mods["b.pool"], mods["b.unfold"]
    x = torch.randn(3, heads, grid[0] * grid[1], d)
    maps = fold(x, grid)
    # written out: row b * heads + i is head i of image b, its (N, d) tokens as a (d, H, W) map
    for b in range(3):
        for i in range(heads):
            assert torch.equal(maps[b * heads + i], x[b, i].t().reshape(d, *grid))
    with torch.no_grad():
        pooled = pool(maps)
        back = unfold(pooled, pooled.shape[2:])
    assert unfold.out_grid(pooled.shape[2:]) == (3, 4)
    for b in range(3):
        for i in range(heads):
            one = F.conv2d(x[b, i].t().reshape(1, d, *grid), pool.weight, stride=2, padding=1, groups=d)
            assert torch.allclose(back[b, i], one.reshape(d, -1).t(), atol=1e-6)
    # the plan: heads on the pooled grid, the conv's MACs counted once per head
    steps = {s.name: s for s in _steps(plan) if s.kind == "op"}
    assert steps["unfold"].y.heads == heads and steps["unfold"].y.spatial == (3, 4)
    assert steps["pool"].own_macs() == heads * d * 9 * 3 * 4


def test_any_map_op_pools_the_heads(tmp_path):
    mods, _, _ = block_model(tmp_path, """h = split_heads(4)
        h = { from h; heads_to_batch as fold; pool(3, stride = 2, padding = 1, mode = "max") as pool
              batch_to_heads as unfold }
        from h
        merge_heads""", (8, 8))
    x = torch.randn(2, 4, 64, 4)
    out = mods["b.unfold"](mods["b.pool"](mods["b.fold"](x, (8, 8))), (4, 4))
    want = F.max_pool2d(x.transpose(-2, -1).reshape(2, 4, 4, 8, 8).reshape(8, 4, 8, 8), 3, 2, 1)
    assert torch.equal(out, want.reshape(2, 4, 4, 16).transpose(-2, -1))


def test_heads_folds_are_closed_and_need_heads(tmp_path):
    with pytest.raises(ComposerError, match="heads_to_batch is not closed by batch_to_heads"):
        block_model(tmp_path, "h = split_heads(2); from h; heads_to_batch")
    with pytest.raises(ComposerError, match="no matching heads_to_batch"):
        block_model(tmp_path, "to_map; batch_to_heads")
    with pytest.raises(ComposerError, match="needs a heads but gets tokens"):
        block_model(tmp_path, "heads_to_batch; batch_to_heads")


def relative_logits(q, qgrid, kgrid, tables, offset):
    """The equation: for the query at x and the key at k, Σ_a q · R_a[i_a], the positions of the
    coarser grid stretched onto the finer: with r_q = max(K/Q, 1), r_k = max(Q/K, 1),
    i = floor(x r_q - k r_k + (K - 1) r_k) ("query-key") or floor(k r_k - x r_q + (Q - 1) r_q)."""
    b, h, _, _ = q.shape
    qpos = [p for p in torch.cartesian_prod(*[torch.arange(n) for n in qgrid]).reshape(-1, len(qgrid)).tolist()]
    kpos = [p for p in torch.cartesian_prod(*[torch.arange(n) for n in kgrid]).reshape(-1, len(kgrid)).tolist()]
    out = torch.zeros(b, h, len(qpos), len(kpos))
    for i, xs in enumerate(qpos):
        for j, ks in enumerate(kpos):
            for a, (x, k, nq, nk) in enumerate(zip(xs, ks, qgrid, kgrid)):
                rq, rk = max(nk / nq, 1.0), max(nq / nk, 1.0)
                idx = math.floor(x * rq - k * rk + (nk - 1) * rk if offset == "query-key"
                                 else k * rk - x * rq + (nq - 1) * rq)
                out[:, :, i, j] += q[:, :, i] @ tables[a][idx]
    return out


@pytest.mark.parametrize("qgrid,kgrid", [((4, 6), (2, 3)), ((2, 3), (4, 6)), ((3, 3), (2, 2)), ((4, 4), (4, 4))])
@pytest.mark.parametrize("offset", ["query-key", "key-query"])
def test_scaled_axis_relative_logits_equation(qgrid, kgrid, offset):
    from composer.layers.windows import AxisRelativeLogits
    from composer.ops import OPS
    from composer.shapes import Shape, TensorRef

    d, heads = 5, 2
    op = OPS["axis_relative_logits"](q=TensorRef("q", "q", None, Shape(d, qgrid, "heads", heads=heads)),
                                     offset=offset, scaled=True)
    scores = Shape(math.prod(kgrid), qgrid, "scores", heads=heads, keys=(kgrid, 0))
    rows = [2 * max(a, b) - 1 for a, b in zip(qgrid, kgrid)]
    assert op.params(scores, scores) == sum(rows) * d
    module = op.build(scores, scores)
    assert isinstance(module, AxisRelativeLogits) and [module.rel_0.shape[0], module.rel_1.shape[0]] == rows
    q = torch.randn(3, heads, math.prod(qgrid), d)
    with torch.no_grad():
        got = module.score_bias((qgrid, kgrid), q)
    want = relative_logits(q, qgrid, kgrid, [module.rel_0.detach(), module.rel_1.detach()], offset)
    assert torch.allclose(got, want, atol=1e-5)


def test_unscaled_axis_relative_logits_refuse_more_queries_than_keys(tmp_path):
    with pytest.raises(ComposerError, match="outnumber the keys"):
        block_model(tmp_path, """linear(48) as qkv
            q, k, v = split_heads(2)
            k = { from k; heads_to_batch; pool(2); batch_to_heads }
            v = { from v; heads_to_batch; pool(2); batch_to_heads }
            scores(q, k)
            axis_relative_logits(q)
            softmax
            weighted_sum(v)
            merge_heads""", (4, 4))


@pytest.mark.parametrize("grid,dim,out,heads,stride_q,stride_kv,mode", [
    ((8, 8), 16, 16, 1, 1, 4, "conv"),
    ((8, 8), 16, 32, 2, 2, 2, "conv"),   # widens 16 -> 32, queries and keys pooled alike
    ((8, 8), 32, 32, 4, 1, 1, "conv"),
    ((8, 8), 16, 32, 2, 2, 4, "max"),
    ((12, 12), 16, 16, 2, 1, 4, "avg"),  # 12 -> 3 keys per axis: a ratio of 4
])
def test_pooling_attention_equals_timms_multiscale_attention(tmp_path, grid, dim, out, heads, stride_q, stride_kv,
                                                             mode):
    from functools import partial

    from timm.models.mvitv2 import MultiScaleAttention

    mods, _, _ = block_model(tmp_path, f'pooling_attention({out}, {heads}, stride_q = {stride_q}, '
                                       f'stride_kv = {stride_kv}, mode = "{mode}") as attn', grid, dim)
    ours = mods["b.attn"]
    torch.manual_seed(0)
    ref = MultiScaleAttention(dim, out, grid, num_heads=heads, mode=mode, kernel_q=(3, 3), kernel_kv=(3, 3),
                              stride_q=(stride_q,) * 2, stride_kv=(stride_kv,) * 2, has_cls_token=False,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    perturb(ref)
    with torch.no_grad():
        ref.rel_pos_h.normal_()
        ref.rel_pos_w.normal_()
    state = {k.replace("rel_pos_h", "rel_pos.rel_0").replace("rel_pos_w", "rel_pos.rel_1"): v
             for k, v in ref.state_dict().items()}
    ours.load_state_dict(state)
    assert any(isinstance(i, Attend) for i in _programs(ours))  # the chain with the q-dependent term: one SDPA call
    x = torch.randn(2, grid[0] * grid[1], dim)
    with torch.no_grad():
        a = ours(x, {" grid": grid})
        b, size = ref(x, list(grid))
    assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5


def _programs(seq):
    for ins in seq.program:
        yield ins
        for branch in getattr(ins, "branches", ()):
            yield from branch


def test_mvitv2_parameters_equal_timm():
    for name, n in (("mvitv2_tiny", 24_173_320), ("mvitv2_small", 34_870_216), ("mvitv2_base", 51_472_744)):
        ref = timm.create_model(name, pretrained=False)
        assert composer.load(name).params == sum(p.numel() for p in ref.parameters()) == n, name


@pytest.mark.parametrize("size", [224, 256])
def test_mvitv2_ported_gives_timms_logits(size):
    from composer.port import from_timm

    torch.manual_seed(0)
    ref = timm.create_model("mvitv2_tiny", pretrained=False, num_classes=10, img_size=size).eval()
    perturb(ref)
    ours = composer.build("mvitv2_tiny", num_classes=10, img_size=size).eval()
    assert from_timm(ours, ref.state_dict()).ok
    x = torch.randn(2 if size == 224 else 1, 3, size, size)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4


def test_mvitv2_refuses_input_sizes_its_tables_were_not_built_for():
    """timm's tables are sized by the build grid too: it fails past it (an index error) and,
    below it, reads rows whose offsets the tables were not trained for. Ours says so at once."""
    ours = composer.build("mvitv2_tiny", num_classes=10).eval()
    with pytest.raises(ValueError, match=r"rel_pos \(axis_relative_logits\) is built for input"):
        ours(torch.randn(1, 3, 192, 192))
