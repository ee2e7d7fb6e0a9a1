"""Issue 4's acceptance: every "primitives to notice" entry of shared/MODELS.md (rows 1-54) can be
written with the ops.

One case per primitive (a row's list split into its separate primitives; rows 1-19 name theirs in
the "survey entry" column). Each case is a tiny blueprint written here as text: it imports the
family or library file that defines the composite (or uses the ops and attention parts directly
where no family file says it), applies it once or twice to a small input, and runs one forward pass
on a random batch of 2. The expected output shapes are worked out by hand and written as literals
(batch first; a map is (B, C, *grid), tokens are (B, N, C), a vector (B, C)); the input must get a
nonzero gradient. Every case runs in 2-D and, where the primitive allows, in 1-D; the ones that
are inherently 2-D say why in `only2d`.

Primitives that cannot be written at all with what exists are listed in NOT_EXPRESSIBLE, and those
whose family file is still being written (and that the ops cannot say yet) in PENDING; a test
pins both lists, so a change (a new part, a new family) shows here. Rows 47 and 51 repeat rows 18
and 16 (DUPLICATE_ROWS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import composer
from helpers import write

B = 2  # batch


@dataclass(frozen=True)
class Case:
    row: int
    name: str                    # the primitive, in MODELS.md's words
    body: str                    # the model's sections (stem/stage/head), for 2-D and 1-D alike
    x2: tuple                    # 2-D input (C, H, W)
    y2: tuple                    # expected 2-D output shape, worked out by hand
    x1: tuple | None = None      # 1-D input (C, L); None with `only2d`
    y1: tuple | None = None
    only2d: str = ""             # why there is no 1-D version
    imports: tuple = ()
    body1: str | None = None     # a different body for 1-D
    check: Callable | None = None  # check(model, x, dims): extra hand-computed facts

    def source(self, dims: int) -> str:
        if dims == 2:
            c, h, w = self.x2
            inp = f"image({c}, [{h}, {w}])"
            body = self.body
        else:
            c, n = self.x1
            inp = f"signal({c}, {n})"
            body = self.body1 if self.body1 is not None else self.body
        imports = "".join(f'import "{f}"\n' for f in self.imports)
        return f"{imports}\nmodel m {{\n    input {inp}\n{body}\n}}\n"


def _param(model, suffix: str) -> torch.Tensor:
    found = [p for n, p in model.named_parameters() if n.endswith(suffix)]
    assert len(found) == 1, (suffix, [n for n, _ in model.named_parameters()])
    return found[0]


def _names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _fuses(model, x, dims):
    """The re-parameterized (fused) form gives the training form's output (eval mode) with fewer
    parameters."""
    model.eval()
    with torch.no_grad():
        before = model(x)
    n_train = sum(p.numel() for p in model.parameters())
    model.fuse()
    with torch.no_grad():
        after = model(x)
    assert sum(p.numel() for p in model.parameters()) < n_train
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), (before - after).abs().max()


# ---------------------------------------------------------------------------------------------
# the cases, row by row
# ---------------------------------------------------------------------------------------------

def _shuffle_is_a_transpose(model, x, dims):
    # groups 3 over 12 channels: view (3, 4), transpose, flatten -> out[j * 3 + g] = in[g * 4 + j]
    with torch.no_grad():
        y = model(x)
    for g in range(3):
        for j in range(4):
            assert torch.equal(y[:, j * 3 + g], x[:, g * 4 + j])


def _learned_bias_size(model, x, dims):
    # heads 2; queries = the grid (8x8 or 24); keys = the grid pooled by 2 (4x4 or 12)
    shape = (2, 64, 16) if dims == 2 else (2, 24, 12)
    assert tuple(_param(model, "relative_pos").shape) == shape


def _agent_biases(model, x, dims):
    names = _names(model)
    for key in ("an_bias", "na_bias"):
        assert any(n.endswith(key) for n in names), (key, names)


def _agent_dwconv(model, x, dims):
    # a depthwise 5-wide conv with bias over V (16 channels)
    w = [p for n, p in model.named_parameters() if "dwc" in n and n.endswith("weight")]
    assert len(w) == 1 and tuple(w[0].shape) == ((16, 1, 5, 5) if dims == 2 else (16, 1, 5))


def _offset_network(model, x, dims):
    # 2 groups of 8 channels: depthwise 5x5 (stride 2) with bias, LN, GELU, 1x1 to d offsets, no bias
    ws = {n: tuple(p.shape) for n, p in model.named_parameters() if "conv_offset" in n}
    k = (5, 5) if dims == 2 else (5,)
    one = (1, 1) if dims == 2 else (1,)
    assert ws[next(n for n in ws if n.endswith("conv_offset.0.weight"))] == (8, 1, *k)
    assert ws[next(n for n in ws if n.endswith("conv_offset.3.weight"))] == (dims, 8, *one)
    assert not any(n.endswith("conv_offset.3.bias") for n in ws)


def _frozen_random_features(model, x, dims):
    """Performer's random features are a frozen parameter (T2T's `w`): (16 * 0.5, 16), orthogonal rows
    scaled by sqrt(8), no gradient."""
    w = _param(model, "attn.w")
    assert w.shape == (8, 16) and not w.requires_grad
    assert torch.allclose(w @ w.T, 8 * torch.eye(8), atol=1e-4)


def _messenger_biases(model, x, dims):
    """Each window attention has two learned scalars per head for its messenger (MSG's rel_pos_msg)."""
    found = [p for n, p in model.named_parameters() if n.endswith("rel_pos_msg")]
    assert len(found) == 2 and all(p.shape == (2, 2, 1, 1) for p in found)


def _dw_strided_kv(model, x, dims):
    # the reduction is depthwise (16 filters of one channel, 2 wide), k and v 16 -> 16 each
    assert tuple(_param(model, "sr.weight").shape) == ((16, 1, 2, 2) if dims == 2 else (16, 1, 2))
    assert tuple(_param(model, "k.weight").shape) == tuple(_param(model, "v.weight").shape) == (16, 16)


def _narrow_attention(model, x, dims):
    # q: 16 -> 8, kv: 16 -> 2 * 8 (from the pooled map), and no output projection
    assert tuple(_param(model, "attention.q.weight").shape) == (8, 16)
    assert tuple(_param(model, "attention.kv.weight").shape) == (16, 16)
    assert not any("proj" in n for n in _names(model)), _names(model)


def _learned_slots(model, x, dims):
    # slots 4 per dim: K = 16 (2-D) or 4 (1-D) slots of 16 channels
    slots = _param(model, "init_slots")
    k = 16 if dims == 2 else 4
    assert tuple(slots.shape[-2:]) == (k, 16) and slots.numel() == k * 16


def _slot_attention(model, x, dims):
    assert tuple(_param(model, "mixer.qkv.weight").shape) == (48, 16)


def _hooked(model, names):
    """Capture the outputs of the named submodules on the next forward pass."""
    got = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o)) for n in names]
    return got, handles


def _depends_on(y, x):
    """Which input positions (summed over batch and channels) the output `y` depends on."""
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    return g.abs().sum((0, 1)) > 0


def _strided_grid_windows(model, x, dims):
    """EW-MHSA over 7x7 grid windows of a 14-grid: the attention output at a pixel depends only on the
    pixels of its window, those with the same parities (n = 2 windows per side). The norm before it
    is a per-pixel batch norm (eval)."""
    got, handles = _hooked(model, [n for n, _ in model.named_modules() if n.endswith("blocks.0.attn")])
    x = x.clone().requires_grad_(True)
    model(x)
    (a,) = got.values()
    for h in handles:
        h.remove()
    assert tuple(a.shape[1:]) == tuple(x.shape[1:])
    queries = [(0, 0), (1, 0), (5, 8)] if dims == 2 else [(0,), (1,), (9,)]
    for q in queries:
        dep = _depends_on(a[(slice(None), slice(None)) + q], x)
        expected = torch.zeros(x.shape[2:], dtype=torch.bool)
        if dims == 2:
            expected[q[0] % 2::2, q[1] % 2::2] = True
        else:
            expected[q[0] % 2::2] = True
        assert torch.equal(dep, expected), (q, dep.int())


def _focal_levels(model, x, dims):
    """The query token at (0, 0) of the 12x12 grid (window (0, 0) = rows/cols 0-3) sees: its window;
    the ring, 1 token around the window from the four diagonally rolled key maps (cyclic: rows and
    cols 11, 0-4); and through the pooled level every token of the windows (0-1, 0-1) around it
    (rows/cols 0-7; the 3x3 neighbourhood is zero padded). Nothing else: e.g. (10, 10) is in window
    (2, 2), outside the pooled neighbourhood and the ring. Norms and MLP are per token."""
    assert tuple(_param(model, "relative_position_bias_table").shape) == (49, 2)          # (2 * 4 - 1)^2
    assert tuple(_param(model, "relative_position_bias_table_to_neighbors").shape) == (1, 2, 16, 28)
    assert tuple(_param(model, "relative_position_bias_table_to_windows").shape) == (2, 36)  # (4 + 3 - 1)^2
    x = x.clone().requires_grad_(True)
    dep = _depends_on(model(x)[:, 0], x)
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[:8, :8] = True                      # own window + pooled windows (0-1, 0-1)
    ring = [11, 0, 1, 2, 3, 4]
    expected[torch.tensor(ring)[:, None], torch.tensor(ring)[None, :]] = True
    assert torch.equal(dep, expected), dep.int()
    assert not dep[10, 10] and dep[6, 6] and dep[11, 11]


def _informative_regions(model, x, dims):
    """Worked by hand from the coarse pass's output: a coarse token's score is its dot product with
    the coarse class token (upsampled, a region's mean is that coarse token's score); the output is
    the fine class token, then the fine tokens of the two best regions (best first; row-major inside
    a 2x2 region)."""
    got, handles = _hooked(model, ["stem.coarse", "stem.cls_fine"])
    with torch.no_grad():
        y = model(x)
    for h in handles:
        h.remove()
    coarse, fine = got["stem.coarse"], got["stem.cls_fine"]   # (B, 1 + coarse grid, 16), (B, 1 + fine grid, 16)
    for b in range(x.shape[0]):
        scores = coarse[b, 1:] @ coarse[b, 0]
        best = scores.argsort(descending=True)[:2].tolist()
        rows = [0]
        for r in best:
            if dims == 2:          # coarse 2x2 -> region r = (r // 2, r % 2) of the 4x4 fine grid
                i, j = divmod(r, 2)
                rows += [1 + (2 * i + a) * 4 + 2 * j + c for a in range(2) for c in range(2)]
            else:                  # coarse 4 -> fine tokens 2r, 2r + 1
                rows += [1 + 2 * r, 2 + 2 * r]
        assert torch.allclose(y[b], fine[b, rows], atol=1e-6), (b, best)


def _exits(model, x, dims):
    """Per sample: the coarse logits when max softmax(coarse) >= 0.5, else the fine logits; checked
    as built (an untrained 5-way head is not confident: fine logits) and with the coarse head scaled
    up 100 times (confident: coarse logits)."""
    taken = set()
    for factor in (1.0, 100.0):
        with torch.no_grad():
            head = dict(model.named_modules())["stem.coarse_head"]
            head.weight.mul_(factor)
            head.bias.mul_(factor)
            got, handles = _hooked(model, ["stem.coarse_head", "head.head"])
            y = model(x)
            for h in handles:
                h.remove()
        coarse, fine = got["stem.coarse_head"], got["head.head"]
        for b in range(x.shape[0]):
            confident = coarse[b].softmax(-1).max() >= 0.5
            taken.add(bool(confident))
            assert torch.equal(y[b], coarse[b] if confident else fine[b]), (factor, b)
    assert taken == {True, False}


CASES: list[Case] = [
    # ---- rows 1-19: the survey entry is the primitive ----------------------------------------
    Case(1, "Transformer encoder",
         "    stage { repeat 2 metaformer(16, attention(2)) }",
         x2=(16, 4, 4), y2=(B, 16, 16), x1=(16, 8), y1=(B, 8, 16), imports=("lib/metaformer",)),
    Case(1, "ViT",
         "    stem { patch_embed(16, 4); class_token(); pos_embed() }\n"
         "    stage { block metaformer(16, attention(2), norm = layernorm(1e-6)) }\n"
         "    head { layernorm(1e-6) as norm; global_pool(\"token\"); classifier(5) }",
         x2=(3, 16, 16), y2=(B, 5), x1=(3, 32), y1=(B, 5), imports=("lib/metaformer",)),
    Case(2, "DeiT (distillation token)",
         "    stem { patch_embed(16, 4); class_token(2); pos_embed() }\n"
         "    stage { block metaformer(16, attention(2)) }\n"
         "    head { layernorm as norm; parallel mean {\n"
         "        { global_pool(\"token\", index = 0); classifier(5) as head }\n"
         "        { global_pool(\"token\", index = 1); classifier(5) as head_dist } } }",
         x2=(3, 16, 16), y2=(B, 5), x1=(3, 32), y1=(B, 5), imports=("lib/metaformer",)),
    Case(3, "MLP-Mixer",
         "    stem patch_embed(16, 4)\n"
         "    stage { repeat 2 mixer_layer(16, 8, 32) }",
         # 16x16 / 4 = 4x4 = 16 tokens; 1-D: 32 / 4 = 8 tokens
         x2=(3, 16, 16), y2=(B, 16, 16), x1=(3, 32), y1=(B, 8, 16), imports=("mlp_mixer",)),
    Case(4, "standard conv",
         "    stem { conv(16, 3, stride = 2); batchnorm; relu }",
         x2=(3, 16, 16), y2=(B, 16, 8, 8), x1=(3, 48), y1=(B, 16, 24)),
    Case(4, "ResNet bottleneck",
         "    stem conv(16, 3)\n"
         "    stage { block bottleneck(4, 16); block bottleneck(8, 32, stride = 2, project = true) }",
         x2=(3, 16, 16), y2=(B, 32, 8, 8), x1=(3, 32), y1=(B, 32, 16), imports=("lib/convnets",)),
    Case(5, "depthwise separable conv",
         "    stage { block depthwise_separable(8, 8); block depthwise_separable(8, 16, stride = 2) }",
         x2=(8, 16, 16), y2=(B, 16, 8, 8), x1=(8, 48), y1=(B, 16, 24), imports=("lib/convnets",)),
    Case(5, "MobileNetV2 inverted residual",
         "    stage { block inverted_residual(8, 8); block inverted_residual(8, 16, stride = 2) }",
         x2=(8, 16, 16), y2=(B, 16, 8, 8), x1=(8, 48), y1=(B, 16, 24), imports=("lib/convnets",)),
    Case(6, "PVT (v2)",
         # overlapping 7/4 embedding: (32 + 6 - 7) // 4 + 1 = 8; 1-D (96 + 6 - 7) // 4 + 1 = 24; the
         # block ends with dwconv_mlp's fc2, a linear applied to the map its dwconv made: a map
         "    stem patch_embed(16, 7, stride = 4, padding = 3, norm = layernorm)\n"
         "    stage { block metaformer(16, attention(2, kv = reduce(2, norm = layernorm)),\n"
         "                             mlp = dwconv_mlp(16, 32)) }",
         x2=(3, 32, 32), y2=(B, 16, 8, 8), x1=(3, 96), y1=(B, 16, 24), imports=("lib/metaformer",)),
    Case(7, "Swin",
         # 16 / 2 = 8x8 tokens, windows of 4 shifted by 2 in the second block, merging -> 4x4 of 32
         "    stem patch_embed(16, 2, norm = layernorm)\n"
         "    stage { repeat 2 metaformer(16, attention(2, partition = window(4, shift = alternate(0, 2)),\n"
         "                                             position = relative_bias)) }\n"
         "    stage { downsample patch_merging(32, norm = layernorm) }",
         x2=(3, 16, 16), y2=(B, 16, 32), x1=(3, 32), y1=(B, 8, 32), imports=("lib/metaformer",)),
    Case(8, "MobileViT",
         "    stem conv(16, 3)\n"
         "    stage { block mobilevit(16, 24, 1, heads = 2) }",
         x2=(3, 8, 8), y2=(B, 16, 8, 8), x1=(3, 24), y1=(B, 16, 24), imports=("mobilevit",)),
    Case(9, "CrossViT",
         # two branches (patches 4 and 8) with class tokens; one multi-scale block; two heads averaged
         "    stem {\n"
         "        patch_embed(16, 4) as pe0; class_token(std = 0.02) as cls0; pos_embed as pos0; save s0\n"
         "        from input\n"
         "        patch_embed(32, 8) as pe1; class_token(std = 0.02) as cls1; pos_embed as pos1; save s1\n"
         "    }\n"
         "    stage { block multiscale([16, 32], [2, 2], [1, 1]) }\n"
         "    head { parallel mean {\n"
         "        { from s0; layernorm as norm0; global_pool(\"token\"); classifier(5) as head0 }\n"
         "        { from s1; layernorm as norm1; global_pool(\"token\"); classifier(5) as head1 } } }",
         x2=(3, 16, 16), y2=(B, 5), x1=(3, 32), y1=(B, 5), imports=("crossvit",)),
    Case(10, "ConvNeXt",
         "    stage { repeat 2 convnext(8, kernel = 5) }",
         x2=(8, 8, 8), y2=(B, 8, 8, 8), x1=(8, 16), y1=(B, 8, 16), imports=("lib/convnets",)),
    Case(11, "InceptionNeXt",
         "    stage { block metanext(16) }",
         x2=(16, 16, 16), y2=(B, 16, 16, 16), imports=("inception_next",),
         only2d="its band kernels 1 x 11 and 11 x 1 are the two axes of an image"),
    Case(12, "GC-ViT",
         # global tokens: MBConv + 3x3/2 max pool from the 8-grid to the 4-window, tiled over the grid
         "    stem { save tokens; feature_block(16, 8, 1) as global_block; save query; from tokens }\n"
         "    stage {\n"
         "        block metaformer(16, attention(2, partition = window(4), position = relative_bias))\n"
         "        block metaformer(16, global_attention(2, 4, 8))\n"
         "    }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 8), y1=(B, 8, 16), imports=("gcvit",)),
    Case(13, "EfficientViT (cascaded group attention, MSRA)",
         "    stage { block sandwich(16, 2, 4, [3, 3], win = 4) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 8), y1=(B, 16, 8), imports=("efficientvit_msra",)),
    Case(14, "MetaFormer baselines (PoolFormer pooling)",
         "    stage { repeat 2 metaformer(8, pooling(), norm = groupnorm(1), ls_init = 1e-5) }",
         x2=(8, 8, 8), y2=(B, 8, 8, 8), x1=(8, 16), y1=(B, 8, 16), imports=("lib/metaformer",)),
    Case(14, "MetaFormer baselines (ConvFormer separable conv)",
         "    stage { repeat 2 metaformer(8, sepconv(8), norm = layernorm(1e-6, bias = false),\n"
         "                                act = star_relu, bias = false) }",
         x2=(8, 8, 8), y2=(B, 8, 8, 8), x1=(8, 16), y1=(B, 8, 16), imports=("lib/metaformer",)),
    Case(14, "MetaFormer baselines (CAFormer attention, res scale)",
         "    stage { repeat 2 metaformer(8, attention(head_dim = 4, qkv_bias = false, proj_bias = false),\n"
         "                                norm = layernorm(1e-6, bias = false), act = star_relu,\n"
         "                                bias = false, rs_init = 1.0) }",
         x2=(8, 8, 8), y2=(B, 64, 8), x1=(8, 16), y1=(B, 16, 8), imports=("lib/metaformer",)),
    Case(15, "MaxViT",
         # MBConv stride 2: 16 -> 8; block attention in 4-windows, grid attention over a 4-grid
         "    stage { block maxvit_block(8, 16, stride = 2, part = 4, head_dim = 8) }",
         x2=(8, 16, 16), y2=(B, 64, 16), x1=(8, 48), y1=(B, 24, 16), imports=("maxvit",)),
    Case(16, "FastViT (train form)",
         "    stage { block repmixer_block(8); block attention_block(8, head_dim = 4) }",
         x2=(8, 8, 8), y2=(B, 8, 8, 8), x1=(8, 16), y1=(B, 8, 16), imports=("fastvit",)),
    Case(16, "FastViT (re-parameterized form)",
         "    stem embed(8, 4)\n"
         "    stage { block repmixer_block(8); block attention_block(8, head_dim = 4) }",
         x2=(4, 16, 16), y2=(B, 8, 8, 8), x1=(4, 32), y1=(B, 8, 16), imports=("fastvit",),
         check=_fuses),
    Case(17, "RepVGG (train form)",
         "    stage { block repvgg_unit(16, stride = 2); block repvgg_unit(16) }",
         x2=(8, 16, 16), y2=(B, 16, 8, 8), x1=(8, 48), y1=(B, 16, 24), imports=("repvgg",)),
    Case(17, "RepVGG (re-parameterized form)",
         "    stage { block repvgg_unit(16, stride = 2); block repvgg_unit(16) }",
         x2=(8, 16, 16), y2=(B, 16, 8, 8), x1=(8, 48), y1=(B, 16, 24), imports=("repvgg",),
         check=_fuses),
    Case(18, "Twins (PCPVT: spatial reduction + position encoding generator)",
         "    stem patch_embed(16, 2, norm = layernorm)\n"
         "    stage { block twins(16, 2, 2, 2, peg = true); block twins(16, 2, 2, 2) }",
         x2=(3, 16, 16), y2=(B, 64, 16), x1=(3, 48), y1=(B, 24, 16), imports=("twins",)),
    Case(18, "Twins (SVT: locally-grouped + global sub-sampled attention)",
         "    stem patch_embed(16, 2, norm = layernorm)\n"
         "    stage { block twins(16, 2, 2, 2, ws = 4, peg = true); block twins(16, 2, 2, 2) }",
         x2=(3, 16, 16), y2=(B, 64, 16), x1=(3, 48), y1=(B, 24, 16), imports=("twins",)),
    Case(19, "ShuffleNet V2",
         "    stage { block shuffle_down(8, 16); block shuffle_unit(16) }",
         x2=(8, 16, 16), y2=(B, 16, 8, 8), x1=(8, 48), y1=(B, 16, 24), imports=("shufflenet_v2",)),

    # ---- rows 20-54: the "primitives to notice" column ----------------------------------------
    Case(20, "spatial-reduction attention",
         "    stem patch_embed(16, 2)\n"
         "    stage { block metaformer(16, attention(2, kv = reduce(2, norm = layernorm)), norm = layernorm(1e-6)) }",
         x2=(3, 16, 16), y2=(B, 64, 16), x1=(3, 48), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(20, "per-stage pos-embed",
         # stage 0: 16 / 2 = 8x8 of 16; stage 1: 4x4 of 32, each with its own position embedding
         "    stages for i in 0..2 {\n"
         "        downsample { patch_embed([16, 32][i], 2, norm = layernorm); pos_embed() }\n"
         "        block metaformer([16, 32][i], attention(2))\n"
         "    }",
         x2=(3, 16, 16), y2=(B, 16, 32), x1=(3, 32), y1=(B, 8, 32), imports=("lib/metaformer",)),
    Case(20, "cls token in stage 4",
         "    stage { downsample { patch_embed(16, 2, norm = layernorm); pos_embed() }\n"
         "            block metaformer(16, attention(2)) }\n"
         "    stage { downsample { patch_embed(32, 2, norm = layernorm); class_token(std = 0.02); pos_embed() }\n"
         "            block metaformer(32, attention(2)) }\n"
         "    head { layernorm(1e-6) as norm; global_pool(\"token\"); classifier(5) }",
         x2=(3, 16, 16), y2=(B, 5), x1=(3, 32), y1=(B, 5), imports=("lib/metaformer",)),
    Case(21, "conv token embedding",
         # 7/4 overlapping conv: (32 + 6 - 7) // 4 + 1 = 8; 1-D (96 + 6 - 7) // 4 + 1 = 24
         "    stem patch_embed(16, 7, stride = 4, padding = 3, norm = layernorm)",
         x2=(3, 32, 32), y2=(B, 16, 8, 8), x1=(3, 96), y1=(B, 16, 24)),
    Case(21, "depthwise-conv+BN q/k/v projection",
         "    stage { block metaformer(16, attention(2, projection = conv_proj(3), scale = 16 ** -0.5)) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(21, "stride-2 k/v",
         # with a class token, which bypasses the convolutions: 1 + 64 tokens
         "    stem class_token(std = 0.02)\n"
         "    stage { block metaformer(16, attention(2, projection = conv_proj(3, stride_kv = 2), scale = 16 ** -0.5)) }",
         x2=(16, 8, 8), y2=(B, 65, 16), x1=(16, 16), y1=(B, 17, 16), imports=("lib/metaformer",)),
    Case(22, "soft split (unfold)",
         # unfold 7/4 pad 2: (32 + 4 - 7) // 4 + 1 = 8 -> 8x8 tokens of 3 * 49; one T2T layer to 16;
         # unfold 3/2 pad 1: (8 + 2 - 3) // 2 + 1 = 4 -> 4x4 tokens of 16 * 9 = 144.
         # 1-D: 16 tokens of 3 * 7 -> 16 -> 8 tokens of 16 * 3 = 48
         "    stem { unfold(7, stride = 4, padding = 2); t2t_layer(16); unfold(3, stride = 2, padding = 1) }",
         x2=(3, 32, 32), y2=(B, 16, 144), x1=(3, 64), y1=(B, 8, 48), imports=("lib/tokens",)),
    Case(22, "Performer attention in the T2T module (FAVOR+, skip through V)",
         # unfold 3/2 pad 1: (16 + 2 - 3) // 2 + 1 = 8 -> 8x8 tokens of 3 * 9 = 27 -> 16 (the layer's width);
         # 1-D: (32 + 2 - 3) // 2 + 1 = 16 tokens of 3 * 3 = 9 -> 16
         "    stem unfold(3, stride = 2, padding = 1)\n"
         "    stage { block t2t_layer(16) }",
         x2=(3, 16, 16), y2=(B, 64, 16), x1=(3, 32), y1=(B, 16, 16), imports=("lib/tokens",),
         check=_frozen_random_features),
    Case(22, "sinusoidal PE",
         # a fixed sin-cos table over the grid tokens (the class token is left alone): 1 + 16 tokens.
         # (T2T's own table is the 1-D transformer one over all 197 tokens, sin/cos interleaved,
         # class token included; `sinusoidal_pos` lays the bands out per axis and skips class tokens.)
         "    stem { patch_embed(16, 4); class_token(); sinusoidal_pos() }\n"
         "    stage { block metaformer(16, attention(2)) }",
         x2=(3, 16, 16), y2=(B, 17, 16), x1=(3, 32), y1=(B, 9, 16), imports=("lib/metaformer",)),
    Case(23, "bi-level routing attention (region top-k gather)",
         # 2 regions per dim (4 regions of 4x4), each keeps its top 2
         "    stage { block cpe_block(16, attention(2, partition = routed(2, 2), scale = 16 ** -0.5)) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/attention_mixers",),
         body1="    stage { block cpe_block(16, attention(2, partition = routed(4, 2), scale = 16 ** -0.5)) }"),
    Case(23, "LePE",
         "    stage {\n"
         "        block metaformer(16, attention(2, partition = routed(2, 1), position = lepe(5)))\n"
         "        block metaformer(16, attention(2, qkv_bias = false, position = lepe(3, source = \"input\")))\n"
         "    }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(24, "multi-head mixed conv",
         # four heads of 4 channels through depthwise 3, 5, 7, 9
         "    stage { block { parallel concat(split = [4, 4, 4, 4]) {\n"
         "        conv(4, 3, groups = 4); conv(4, 5, groups = 4); conv(4, 7, groups = 4); conv(4, 9, groups = 4) } } }",
         x2=(16, 16, 16), y2=(B, 16, 16, 16), x1=(16, 24), y1=(B, 16, 24)),
    Case(24, "scale-aware aggregation",
         # the SAM mixer: MHMC, interleave the heads (channel shuffle), grouped 1x1 to 2C, back, modulate v
         "    stage { block metaformer(16, scale_aware_modulation(16), mlp = dwres_mlp(16, 32)) }",
         x2=(16, 16, 16), y2=(B, 16, 16, 16), x1=(16, 24), y1=(B, 16, 24),
         imports=("lib/metaformer", "lib/conv_ffn", "lib/modulation")),
    Case(24, "SAM/MSA hybrid stage",
         # SAM, attention, SAM: the third block receives tokens from the attention block, and its
         # v linear and output projection keep them tokens (the dwres_mlp ends in a linear too)
         "    stage { repeat 3 as j metaformer(16, j % 2 == 1 ? attention(2, position = lepe(3))\n"
         "                                                   : scale_aware_modulation(16),\n"
         "                                     norm = layernorm(1e-6), mlp = dwres_mlp(16, 32)) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16),
         imports=("lib/metaformer", "lib/conv_ffn", "lib/modulation")),
    Case(25, "convolutional modulation (a * dwconv(b))",
         "    stage { block conv2former_block(16, 5) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("conv2former",)),
    Case(26, "head groups with different k/v reductions",
         # half the heads on keys reduced by 4 (2x2), half on keys reduced by 2 (4x4). The mixer's
         # first layout-specific op is the conv `sr1`, so the first residual runs on the map (the
         # attention's tokens are turned back into the map for the sum); dwres_mlp's linears and
         # depthwise conv keep the map: the block gives the map (16, 8x8), in 1-D (16, 24)
         "    stage { block metaformer(16, shunted_attention(16, 4, 4), mlp = dwres_mlp(16, 32)) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24),
         imports=("lib/metaformer", "lib/conv_ffn", "lib/shunted")),
    Case(27, "semantic token generation (pooling + cross-attn)",
         # STViT: 2x2 (1-D: 2) max-pooled semantic tokens ahead of the 64 image tokens; the semantic tokens
         # are the queries (first(4)), keys and values all 68 tokens; a residual on the pooled tokens
         "    stage { block {\n"
         "        parallel tokens { adaptive_pool(2, mode = \"max\") as init; identity }\n"
         "        residual(shortcut = select_tokens(0, 4)) { layernorm; attention(2, query = first(4)) }\n"
         "    } }",
         x2=(16, 8, 8), y2=(B, 4, 16), x1=(16, 16), y1=(B, 2, 16),
         body1="    stage { block {\n"
               "        parallel tokens { adaptive_pool(2, mode = \"max\") as init; identity }\n"
               "        residual(shortcut = select_tokens(0, 2)) { layernorm; attention(2, query = first(2)) }\n"
               "    } }"),
    Case(27, "recovery attention",
         # STViT-R: the image tokens (queries) attend to semantic tokens (keys and values); the grid stays
         "    stage { block {\n"
         "        save x\n"
         "        adaptive_pool(2, mode = \"max\"); save sem\n"
         "        from x\n"
         "        residual {\n"
         "            parallel tokens { { from sem; linear(16) as k }; { from sem; linear(16) as v }; linear(16) as q }\n"
         "            attend(2, values = \"split\")\n"
         "            linear(16) as proj\n"
         "        }\n"
         "    } }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16)),
    Case(28, "Hi-Fi window attention + Lo-Fi pooled-kv attention",
         # 1 Hi-Fi head in 2-windows, 1 Lo-Fi head on keys pooled by 2; the dwconv MLP ends on a map
         "    stage { block metaformer(16, hilo(16, 2, size = 2, alpha = 0.5), mlp = dwconv_mlp(16, 32)) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("litv2",)),
    Case(28, "attention-free early stages",
         "    stage { repeat 2 convffn(16) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("litv2",)),
    Case(28, "deformable patch merging",
         "    stage { downsample { deform_conv(32, 2, stride = 2); batchnorm; gelu } }",
         x2=(16, 8, 8), y2=(B, 32, 4, 4), x1=(16, 16), y1=(B, 32, 8)),
    Case(29, "LPU",
         "    stage { block lpu(16) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("lib/conv_ffn",)),
    Case(29, "lightweight MHSA (dw-strided k/v)",
         # as the official code: keys and values from a depthwise 2/2 conv + BN of the map (4x4), through
         # their own linears; queries from every pixel; output projection (no bias here: `attend` has no
         # position part, so this and the next-but-one case cannot be one layer yet)
         "    stage { block { residual {\n"
         "        layernorm as norm1\n"
         "        save x\n"
         "        conv(16, 2, stride = 2, groups = 16) as sr; batchnorm as norm; save r\n"
         "        from x\n"
         "        parallel tokens { { from r; linear(16) as k }; { from r; linear(16) as v }; linear(16) as q }\n"
         "        attend(2, values = \"split\")\n"
         "        linear(16) as proj\n"
         "    } } }",
         # the residual's shortcut is the map: the sum is a map
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), check=_dw_strided_kv),
    Case(29, "IRFFN",
         "    stage { block { residual { layernorm; irffn(16, 32) } } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("lib/conv_ffn",)),
    Case(29, "resolution-dependent position bias",
         # LPU, attention with a (heads, queries, keys) bias, IRFFN (ends on a map)
         "    stage { block cmt_block(16, 2, 2, 2) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("lib/hybrid",),
         check=_learned_bias_size),
    Case(30, "macaron FFNs",
         "    stage { block {\n"
         "        conformer_ffn(16) as ffn1\n"
         "        residual { layernorm as norm_mha; attention(2) as attn }\n"
         "        conformer_ffn(16) as ffn2\n"
         "        layernorm as norm_out\n"
         "    } }",
         x2=(16, 4, 4), y2=(B, 16, 16), x1=(16, 24), y1=(B, 24, 16), imports=("conformer_speech",)),
    Case(30, "relative-position MHSA",
         "    stage { block { residual { layernorm; attention(2, position = relative_xl) } } }",
         x2=(16, 4, 4), y2=(B, 16, 16), x1=(16, 24), y1=(B, 24, 16)),
    Case(30, "GLU + depthwise Conv1d + BatchNorm module",
         # 2-D: the family's module (its depthwise conv takes the input's rank: [k, k] here); 1-D: the
         # module written out with a Conv1d
         "    stage { block conformer_conv(16, kernel = 7) }",
         x2=(16, 16, 1), y2=(B, 16, 16, 1), x1=(16, 24), y1=(B, 16, 24), imports=("conformer_speech",),
         body1="    stage { block { residual {\n"
               "        layernorm; linear(32) as pointwise1; glu\n"
               "        conv(16, 7, groups = 16, bias = false) as depthwise; batchnorm; silu\n"
               "        linear(16) as pointwise2\n"
               "    } } }"),
    Case(31, "multi-scale patch routing (noisy top-k mixture of experts)",
         # 2-D: the family's AMS block on an (L = 8, N = 3) series of d_model 4, four patch sizes, top 2.
         # 1-D: a router (2 logits + 2 noise scales per sample, broadcast) and two experts with
         # patches 2 and 4, mixed by noisy top-1 gating.
         "    stem linear(4) as start_fc\n"
         "    stage { block ams(4, [2, 4, 8, 2], 8, 3, k = 2, d_ff = 8) }",
         x2=(1, 8, 3), y2=(B, 4, 8, 3), x1=(1, 16), y1=(B, 4, 16), imports=("pathformer",),
         body1="    stem linear(4) as start_fc\n"
               "    stage { block { residual {\n"
               "        parallel concat {\n"
               "            { adaptive_pool(1); conv(4, 1) as gate; upsample(16) }\n"
               "            { conv(4, 2, stride = 2) as expert2; gelu; upsample(2) }\n"
               "            { conv(4, 4, stride = 4) as expert4; gelu; upsample(4) }\n"
               "        }\n"
               "        top_k_mixture(2, 1, noisy = true)\n"
               "    } } }"),
    Case(32, "two streams (map + few tokens)",
         # 3 global tokens of 16 channels beside the map; the head reads both streams
         "    stem { learned_tokens(16, [1, 3]) as tokens; save z; from input; conv(8, 3, stride = 2) }\n"
         "    stage { block to_tokens_and_back(8, 16) }\n"
         "    head { to_map; parallel concat { global_pool(\"avg\"); { from z; global_pool(\"avg\") } }; classifier(5) }",
         x2=(3, 16, 16), y2=(B, 5), x1=(3, 32), y1=(B, 5), imports=("mobile_former",),
         body1="    stem { learned_tokens(16, 3) as tokens; save z; from input; conv(8, 3, stride = 2) }\n"
               "    stage { block to_tokens_and_back(8, 16) }\n"
               "    head { to_map; parallel concat { global_pool(\"avg\"); { from z; global_pool(\"avg\") } }; classifier(5) }"),
    Case(32, "cross-attention bridges both ways",
         "    stem { learned_tokens(16, [1, 3]) as tokens; save z; from input; conv(8, 3, stride = 2) }\n"
         "    stage { block { to_tokens_and_back(8, 16); former_to_mobile(8) } }",
         x2=(3, 16, 16), y2=(B, 64, 8), x1=(3, 32), y1=(B, 16, 8), imports=("mobile_former",),
         body1="    stem { learned_tokens(16, 3) as tokens; save z; from input; conv(8, 3, stride = 2) }\n"
               "    stage { block { to_tokens_and_back(8, 16); former_to_mobile(8) } }"),
    Case(32, "dynamic ReLU",
         "    stem { learned_tokens(16, [1, 3]) as tokens; save z; from input; conv(8, 3, stride = 2) }\n"
         "    stage { block dyrelu(8, 16) }",
         x2=(3, 16, 16), y2=(B, 64, 8), x1=(3, 32), y1=(B, 16, 8), imports=("mobile_former",),
         body1="    stem { learned_tokens(16, 3) as tokens; save z; from input; conv(8, 3, stride = 2) }\n"
               "    stage { block dyrelu(8, 16) }"),
    Case(33, "spatial prior module",
         # conv stem to 1/4, then three stride-2 levels (1/8, 1/16, 1/32) projected to 16 and joined:
         # 32 px: 4x4 + 2x2 + 1x1 = 21 tokens; 1-D 64 samples: 8 + 4 + 2 = 14 tokens
         "    stem {\n"
         "        conv(8, 3, stride = 2, bias = false); batchnorm; relu; pool(3, stride = 2, padding = 1, mode = \"max\")\n"
         "        conv(16, 3, stride = 2, bias = false) as conv2; batchnorm as bn2; relu; save s2\n"
         "        conv(16, 3, stride = 2, bias = false) as conv3; batchnorm as bn3; relu; save s3\n"
         "        conv(16, 3, stride = 2, bias = false) as conv4; batchnorm as bn4; relu; save s4\n"
         "        parallel tokens { { from s2; conv(16, 1) as fc2 }; { from s3; conv(16, 1) as fc3 }; { from s4; conv(16, 1) as fc4 } }\n"
         "    }",
         x2=(3, 32, 32), y2=(B, 21, 16), x1=(3, 64), y1=(B, 14, 16)),
    Case(33, "injector / extractor cross-attention side network",
         # c: levels 16x16, 8x8, 4x4 (2, 1, 0.5 of the ViT grid); x: the 8x8 ViT tokens
         "    stem {\n"
         "        conv(16, 2, stride = 2) as l1; save a; conv(16, 2, stride = 2) as l2; save b\n"
         "        conv(16, 2, stride = 2) as l3; save d\n"
         "        parallel tokens { from a; from b; from d }; save c\n"
         "        from input; patch_embed(16, 4); save x\n"
         "    }\n"
         "    stage { block injector(2, 2, 1.0); block extractor(16, 2, 2, 1.0, 8) }",
         x2=(3, 32, 32), y2=(B, 64, 16), imports=("vit_adapter",),
         only2d="multi-scale deformable attention samples 2-D grids (grid_sample over x, y)"),
    Case(34, "inception mixer: channel split into maxpool / dwconv / pooled-attention branches",
         "    stage { block metaformer(16, inception_mixer(16, 4, 1, pool_size = 2)) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("lib/metaformer", "lib/inception_mixer")),
    Case(34, "frequency ramp",
         # the attention's share of the channels grows block by block: 1, 2, 3 of 4 heads
         "    stage { repeat 3 as j metaformer(16, inception_mixer(16, 4, [1, 2, 3][j])) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("lib/metaformer", "lib/inception_mixer")),
    Case(35, "length-scaled cosine attention",
         "    stage {\n"
         "        block metaformer(16, attention(2, partition = neighbourhood(3, mask = true), score = cosine()))\n"
         "        block metaformer(16, attention(2, score = cosine()))\n"
         "    }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(35, "aggregated attention (3x3 neighbourhood + pooled keys under one softmax, learnable tokens)",
         # 8x8 tokens: every query sees its 3x3 neighbourhood (padded keys masked) and the 4x4 pooled
         # keys (1x1 conv, GELU, 2x2 average pool, LN), with a bias per offset, query-conditioned
         # neighbour weights, and the continuous bias on the pooled keys
         "    stage { block metaformer(16, attention(2,\n"
         "        partition = neighbourhood(3, mask = true, bias = true, tokens = true),\n"
         "        extra_kv = reduce(2, \"pool\", pointwise = true, act = gelu, norm = layernorm),\n"
         "        score = cosine, position = continuous_bias(32))) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(35, "continuous (MLP) relative position bias",
         "    stage { block metaformer(16, attention(2, score = cosine, position = continuous_bias(32))) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(35, "ConvGLU",
         "    stage { block { residual { layernorm; conv_glu(16, 24) } } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("lib/attention_mixers",)),
    Case(36, "inverted residual mobile block (iRMB)",
         # EW-MHSA as the official code: windows = strided groups (patches_to_batch), q and k from
         # linears, the (normed) input itself as the values, no output projection; then the "v" 1x1
         # expansion + act, a residual depthwise conv + BN + SiLU, a 1x1 projection, all in a residual
         "    stage { block { residual {\n"
         "        batchnorm as norm\n"
         "        patches_to_batch(2)\n"
         "        parallel tokens { linear(16) as k; identity; linear(16) as q }\n"
         "        attend(2, values = \"split\")\n"
         "        batch_to_patches(2)\n"
         "        conv(32, 1) as v; silu\n"
         "        residual { conv(32, 3, groups = 32, bias = false) as conv_local; batchnorm; silu }\n"
         "        conv(16, 1, bias = false) as proj\n"
         "    } } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24)),
    Case(36, "strided-grid windows",
         # EMO's iRMB with EW-MHSA over 7x7 grid windows: 14 = 2 x 7, so n = 2 windows per side, each
         # holding every 2nd pixel (window (i, j): pixels (2a + i, 2b + j))
         "    stage { block irmb(16, 16, 2.0, batchnorm(1e-6), silu, heads = 2, n = 2) }",
         x2=(16, 14, 14), y2=(B, 16, 14, 14), x1=(16, 14), y1=(B, 16, 14), imports=("lib/mobile",),
         check=_strided_grid_windows),
    Case(37, "multi-level (fine + pooled coarse) keys around each window",
         # Focal attention on a 12x12 grid: 4x4 windows (3x3 of them), a ring of 1 token around each
         # window (4 (16 - 9) = 28 keys) and the 3x3 pooled windows around it (one token per window)
         "    stage { block metaformer(16, multilevel_attention(2, window = 4, expand = 1, pooled = 3)) }",
         x2=(16, 12, 12), y2=(B, 144, 16), imports=("lib/metaformer",), check=_focal_levels,
         only2d="the window, its ring and the pooled windows around it are 2-D (the op takes 2-D grids only)"),
    Case(38, "AttnConv (shared dwconv, tanh gating)",
         "    stage { block attn_conv(16, 3) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("lib/hybrid",)),
    Case(38, "pooled-kv global branch",
         # as the official code: q from the 16 input channels to a width of 8 (2 heads of 4), k and v
         # from the map average-pooled by 2, no output projection: 8 channels out
         "    stage { block attention(2, kv = reduce(2, mode = \"pool\"), dim = 8, proj = false) }",
         x2=(16, 8, 8), y2=(B, 64, 8), x1=(16, 16), y1=(B, 16, 8), check=_narrow_attention),
    Case(39, "image-to-tokens stem",
         # 7x7/2 conv: 32; 3x3/2 max pool: 16; 4x4 patches: 4x4 tokens (a map here, before any attention)
         "    stem { conv(8, 7, stride = 2, bias = false); batchnorm; pool(3, stride = 2, padding = 1, mode = \"max\")\n"
         "           patch_embed(16, 4) as i2t }",
         x2=(3, 64, 64), y2=(B, 16, 4, 4), x1=(3, 64), y1=(B, 16, 4)),
    Case(39, "LeFF",
         "    stem { patch_embed(16, 2); class_token() }\n"
         "    stage { block ceit_block(16, 2) }",
         x2=(3, 16, 16), y2=(B, 65, 16), x1=(3, 32), y1=(B, 17, 16), imports=("ceit",)),
    Case(39, "layer-wise class-token attention",
         "    stem { patch_embed(16, 2); class_token() }\n"
         "    stage {\n"
         "        block { metaformer(16, attention(2)); save x; select_tokens(0, 1); save layers; from x }\n"
         "        block { metaformer(16, attention(2)); save x; parallel tokens { select_tokens(0, 1); from layers }\n"
         "                save layers; from x }\n"
         "    }\n"
         "    head { from layers; pos_embed as pos_layer_embed\n"
         "           residual(shortcut = select_tokens(0, 1)) { layernorm; attention(2, query = first(1)) }\n"
         "           global_pool(\"avg\"); classifier(5) }",
         x2=(3, 16, 16), y2=(B, 5), x1=(3, 32), y1=(B, 5), imports=("lib/metaformer",)),
    Case(40, "local/global bidirectional gating",
         "    stage { block { residual { groupnorm(1); fasa(16, 2, 3, 2) } } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("lib/hybrid",)),
    Case(41, "dilated re-param block",
         "    stage { block { dilated_reparam(16, 13); batchnorm } }",
         x2=(16, 16, 16), y2=(B, 16, 16, 16), x1=(16, 32), y1=(B, 16, 32), imports=("unireplknet",),
         check=_fuses),
    Case(41, "GRN",
         "    stage { block { residual { linear(32); gelu; grn; linear(16) } } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24)),
    Case(41, "SE",
         "    stage { block { conv(16, 3, groups = 16); squeeze_excite(0.25) } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24)),
    Case(42, "local aggregation",
         "    stage { block local_agg(16) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("lib/hybrid",)),
    Case(42, "sparse global attention (select)",
         # every 2nd pixel is a delegate: 4x4 (1-D: 8) tokens attend among themselves
         "    stage { block { pool(1, stride = 2) as sampler; attention(2) } }",
         x2=(16, 8, 8), y2=(B, 16, 16), x1=(16, 16), y1=(B, 8, 16)),
    Case(42, "local propagation",
         # the delegates spread back over their 2x2 cell by a depthwise transposed conv (kernel = stride = 2)
         "    stage { block { pool(1, stride = 2) as sampler; attention(2)\n"
         "                    conv_transpose(16, stride = 2, groups = 16) as local_prop; layernorm; linear(16) as proj } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24)),
    Case(43, "grouped 1x1 conv",
         "    stage { block conv(24, 1, groups = 3, bias = false) }",
         x2=(12, 8, 8), y2=(B, 24, 8, 8), x1=(12, 16), y1=(B, 24, 16)),
    Case(43, "channel shuffle",
         "    stage { block channel_shuffle(3) }",
         x2=(12, 8, 8), y2=(B, 12, 8, 8), x1=(12, 16), y1=(B, 12, 16), check=_shuffle_is_a_transpose),
    Case(43, "concat shortcut",
         # stride-2 unit: 3x3/2 average pool of the input (12) concatenated with ReLU(main) (24 - 12)
         "    stage { block shuffle_v1_down(12, 24, 3) }",
         x2=(12, 8, 8), y2=(B, 24, 4, 4), x1=(12, 16), y1=(B, 24, 8), imports=("shufflenet_v1",)),
    Case(44, "pooled agent tokens",
         "    stage { block metaformer(16, attention(2, agents = agents(4))) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(44, "two softmaxes",
         # agents attend to keys reduced by 2, queries attend to the agents
         "    stage { block metaformer(16, attention(2, kv = reduce(2), agents = agents(4))) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(44, "agent bias",
         "    stage { block metaformer(16, attention(2, partition = window(4), agents = agents(4))) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",),
         check=_agent_biases),
    Case(44, "dwconv on v",
         "    stage { block metaformer(16, attention(2, agents = agents(4, kernel = 5))) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",),
         check=_agent_dwconv),
    Case(45, "feature reuse",
         # CF-ViT: the coarse pass's tokens (patch 8: 2x2), through LN + MLP, upsampled (nearest) to the
         # fine grid (patch 4: 4x4) and added to the fine embedding
         "    stem {\n"
         "        patch_embed(16, 8) as coarse_embed; metaformer(16, attention(2)) as coarse; save coarse_out\n"
         "        from input; patch_embed(16, 4) as fine_embed\n"
         "        parallel add { identity; { from coarse_out; layernorm; mlp(16, 32) as reuse; upsample(2) } }\n"
         "    }\n"
         "    stage { block metaformer(16, attention(2)) }",
         x2=(3, 16, 16), y2=(B, 16, 16), x1=(3, 32), y1=(B, 8, 16), imports=("lib/metaformer",)),
    Case(45, "coarse-to-fine re-tokenization of important regions",
         # coarse pass: patch 8 -> 2x2 tokens (1-D: 4) + class token, one block; fine embedding: patch 4
         # -> 4x4 (1-D: 8) + class token. The class token's scores over the coarse tokens (one per
         # 2x2 region of the fine grid, 1-D: 2) pick the 2 best regions, which keep their fine
         # tokens: 1 + 2 * 4 = 9 tokens (1-D: 1 + 2 * 2 = 5) of the 16 fine channels
         "    stem {\n"
         "        patch_embed(16, 8) as coarse_embed; class_token(); metaformer(16, attention(2)) as coarse\n"
         "        cls = { select_tokens(0, 1); split_heads(1) }\n"
         "        patches = { select_tokens(1); split_heads(1) }\n"
         "        importance = scores(cls, patches)\n"
         "        from input; patch_embed(16, 4) as fine_embed; class_token() as cls_fine\n"
         "        topk_tokens(2, score = importance, region = 2)\n"
         "    }",
         x2=(3, 16, 16), y2=(B, 9, 16), x1=(3, 32), y1=(B, 5, 16), imports=("lib/metaformer",),
         check=_informative_regions),
    Case(45, "early exit (coarse or fine logits per sample)",
         # coarse logits from the coarse pass, fine logits from the fine pass; a sample whose coarse
         # prediction is confident (max softmax >= 0.5) returns the coarse logits, any other the fine
         "    stem {\n"
         "        patch_embed(16, 8) as coarse_embed; class_token(); metaformer(16, attention(2)) as coarse\n"
         "        layernorm as coarse_norm; global_pool(\"token\"); classifier(5) as coarse_head; save coarse_logits\n"
         "        from input; patch_embed(16, 4) as fine_embed; class_token()\n"
         "    }\n"
         "    stage { block metaformer(16, attention(2)) }\n"
         "    head { parallel concat { from coarse_logits\n"
         "                             { layernorm as norm; global_pool(\"token\"); classifier(5) as head } }\n"
         "           early_exit(0.5) }",
         x2=(3, 16, 16), y2=(B, 5), x1=(3, 32), y1=(B, 5), imports=("lib/metaformer",), check=_exits),
    Case(46, "parallel CNN and transformer branches",
         # CNN: 16x16 map (c); transformer: 4x4 patches of the 16x16 stem map + class token (t)
         "    stem {\n"
         "        conv(16, 3, stride = 2); batchnorm; relu; save base\n"
         "        conv_block(16, project = true) as conv_1\n"
         "        from base; patch_embed(16, 4) as trans_patch_conv; class_token(std = 0.02)\n"
         "        trans_block(16, 2) as trans_1; save t\n"
         "    }\n"
         "    stage { block { from c; conv_block(16); from t; trans_block(16, 2); save t; from c } }",
         x2=(3, 32, 32), y2=(B, 16, 16, 16), x1=(3, 64), y1=(B, 16, 32), imports=("conformer",)),
    Case(46, "feature coupling units",
         "    stem {\n"
         "        conv(16, 3, stride = 2); batchnorm; relu; save base\n"
         "        conv_block(16, project = true) as conv_1\n"
         "        from base; patch_embed(16, 4) as trans_patch_conv; class_token(std = 0.02)\n"
         "        trans_block(16, 2) as trans_1; save t\n"
         "    }\n"
         "    stage { block conv_trans(16, 16, 2, 4) }",
         x2=(3, 32, 32), y2=(B, 16, 16, 16), x1=(3, 64), y1=(B, 16, 32), imports=("conformer",)),
    Case(46, "two heads",
         "    stem {\n"
         "        conv(16, 3, stride = 2); batchnorm; relu; save base\n"
         "        conv_block(16, project = true) as conv_1\n"
         "        from base; patch_embed(16, 4) as trans_patch_conv; class_token(std = 0.02)\n"
         "        trans_block(16, 2) as trans_1; save t\n"
         "    }\n"
         "    stage { block conv_trans(16, 16, 2, 4) }\n"
         "    head { parallel add {\n"
         "        { from c; global_pool(\"avg\"); classifier(5) as conv_cls_head }\n"
         "        { from t; layernorm as trans_norm; global_pool(\"token\"); classifier(5) as trans_cls_head } } }",
         x2=(3, 32, 32), y2=(B, 5), x1=(3, 64), y1=(B, 5), imports=("conformer",)),
    Case(48, "messenger tokens per window",
         # 8x8 tokens in 4x4 windows: 2x2 windows, one messenger each (2x2 learned, period 2); each
         # joins its window's attention; the head reads the first messenger after the norm.
         # 1-D: 16 tokens, 4 windows of 4
         "    stem { window_tokens(4, period = 2) as msg_tokens }\n"
         "    stage { repeat 2 { residual { layernorm as norm1\n"
         "        attention(2, partition = window(4, messengers = true), position = relative_bias) as attn }\n"
         "        residual { layernorm as norm2; mlp(16, 32) } } }\n"
         "    head { layernorm as norm; global_pool(\"token\"); classifier(5) as head }",
         x2=(16, 8, 8), y2=(B, 5), x1=(16, 16), y1=(B, 5), check=_messenger_biases, imports=("lib/metaformer",)),
    Case(48, "shuffle between windows",
         # after every attention the messengers of each 2x2 (1-D: 2) block of windows exchange
         # channel groups; the result keeps the messengers ahead of the 8x8 grid: 4 + 64 tokens
         "    stem { window_tokens(4, period = 2) as msg_tokens }\n"
         "    stage { repeat 2 { residual { layernorm as norm1\n"
         "        attention(2, partition = window(4, messengers = true), position = relative_bias) as attn }\n"
         "        shuffle_window_tokens(4, 2)\n"
         "        residual { layernorm as norm2; mlp(16, 32) } } }",
         x2=(16, 8, 8), y2=(B, 68, 16), x1=(16, 16), y1=(B, 20, 16), imports=("lib/metaformer",)),
    Case(49, "multi-scale dilated attention",
         # three head groups over 3x3 neighbourhoods dilated 1, 2, 3
         "    stage { block cpe_block(12, msda(12, 3)) }",
         x2=(12, 8, 8), y2=(B, 64, 12), x1=(12, 16), y1=(B, 16, 12), imports=("lib/attention_mixers",)),
    Case(50, "multi-scale k/v from strided multi-kernel dwconvs",
         # ScopeViT's MSSA: channel groups through stride-2 depthwise 5x5 and 3x3 convs give one reduced map
         # (4x4), projected to k and v; queries from every pixel; output projection
         "    stage { block { residual {\n"
         "        layernorm as norm1\n"
         "        save u\n"
         "        parallel concat(split = [8, 8]) { conv(8, 5, stride = 2, groups = 8, bias = false) as dw5\n"
         "                                           conv(8, 3, stride = 2, groups = 8, bias = false) as dw3 }\n"
         "        save kv\n"
         "        from u\n"
         "        parallel tokens { { from kv; linear(16) as k }; { from kv; linear(16) as v }; linear(16) as q }\n"
         "        attend(2, values = \"split\")\n"
         "        linear(16) as proj\n"
         "    } } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24)),
    Case(50, "strided (dilated) attention",
         # ScopeViT's GSDA: groups of 4x4 tokens spaced 2 apart over the 8x8 map
         "    stage { block metaformer(16, attention(2, qkv_bias = false, partition = grid(4)), ls_init = 1e-6) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(52, "soft clustering into slots",
         "    stage { block { residual { layernorm; cluster(4, init = \"learned\") } } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), check=_learned_slots),
    Case(52, "attention over slots",
         "    stage { block { residual { layernorm; cluster(2, attention(2)) } } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), check=_slot_attention),
    Case(52, "dispatch back",
         # the GLMix block: slots pooled from the block's input, dispatched back onto the 8x8 grid
         "    stage { block glmix(16, 2, slots = 2) }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24), imports=("glnet",)),
    Case(52, "parallel conv branch",
         "    stage { block { residual { layernorm; parallel add {\n"
         "        cluster(2, attention(2))\n"
         "        { conv(16, 1) as pw1; conv(16, 5, groups = 16) as dw; conv(16, 1) as pw2 } } } } }",
         x2=(16, 8, 8), y2=(B, 16, 8, 8), x1=(16, 24), y1=(B, 16, 24)),
    Case(53, "multi-scale re-parameterized depthwise convs",
         # 2-D: RepNeXt's block (chunks: identity, 3x3 + 1x3 + 3x1 + dilated 2x2, 7x7 + 5x3 + ..., 1x11 -> 11x1);
         # 1-D: parallel depthwise 3, 5, 7 and dilated 2 convs with BN, fused into one
         "    stage { block repnext_block(16) }",
         x2=(16, 16, 16), y2=(B, 16, 16, 16), x1=(16, 32), y1=(B, 16, 32), imports=("repnext",),
         body1="    stage { block { residual { parallel add {\n"
               "        { conv(16, 3, groups = 16, bias = false); batchnorm }\n"
               "        { conv(16, 5, groups = 16, bias = false); batchnorm }\n"
               "        { conv(16, 7, groups = 16, bias = false); batchnorm }\n"
               "        { conv(16, 3, dilation = 2, groups = 16, bias = false); batchnorm } } } } }",
         check=_fuses),
    Case(54, "keys/values sampled at learned offsets (grid_sample)",
         "    stage { block metaformer(16, attention(4, kv = deformable(2, 2, kernel = 3))) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",)),
    Case(54, "offset network",
         "    stage { block metaformer(16, attention(4, kv = deformable(2, 2, kernel = 5, stride = 2))) }",
         x2=(16, 8, 8), y2=(B, 64, 16), x1=(16, 24), y1=(B, 24, 16), imports=("lib/metaformer",),
         check=_offset_network),
]

# Rows whose primitive(s) the ops cannot say at all (the families hold a closest form).
NOT_EXPRESSIBLE: dict[int, str] = {}

# Rows whose family file is still being written and whose primitive the ops cannot say yet.
PENDING: dict[int, str] = {}

# Rows that repeat another row (no primitive column of their own).
DUPLICATE_ROWS = {47: 18, 51: 16}


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _params():
    out = []
    for case in CASES:
        base = f"row{case.row}-{_slug(case.name)}"
        out.append(pytest.param(case, 2, id=f"{base}-2d"))
        if case.x1 is not None:
            out.append(pytest.param(case, 1, id=f"{base}-1d"))
        else:
            out.append(pytest.param(case, 1, id=f"{base}-1d",
                                    marks=pytest.mark.skip(reason=f"inherently 2-D: {case.only2d}")))
    return out


@pytest.mark.parametrize("case, dims", _params())
def test_primitive(case: Case, dims: int, tmp_path):
    torch.manual_seed(0)
    path = write(tmp_path, case.source(dims))
    model = composer.build(path).eval()
    shape = case.x2 if dims == 2 else case.x1
    expected = case.y2 if dims == 2 else case.y1
    x = torch.randn(B, *shape, requires_grad=True)
    y = model(x)
    assert tuple(y.shape) == expected
    assert torch.isfinite(y).all()
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "no gradient reaches the input"
    if case.check is not None:
        case.check(model, x.detach(), dims)


def test_case_table_is_complete():
    """Every row 1-54 is covered: by cases, or listed as not expressible, pending or a duplicate;
    every case has a 1-D version or says why not."""
    covered = {c.row for c in CASES} | set(NOT_EXPRESSIBLE) | set(PENDING) | set(DUPLICATE_ROWS)
    assert covered == set(range(1, 55)), sorted(set(range(1, 55)) - covered)
    for case in CASES:
        assert (case.x1 is None) == bool(case.only2d), case.name
        assert (case.x1 is None) == (case.y1 is None), case.name
    ids = [f"{c.row}-{c.name}" for c in CASES]
    assert len(ids) == len(set(ids))


def test_not_expressible_and_pending_lists():
    """Pinned: when a part or a family lands that makes one of these writable, move it to CASES."""
    assert sorted(NOT_EXPRESSIBLE) == []
    assert sorted(PENDING) == []
    assert DUPLICATE_ROWS == {47: 18, 51: 16}
