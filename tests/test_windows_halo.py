"""Windowed and blocked local attention written with the primitives (issue 14):
`windows_to_batch` / `batch_to_windows` against the window partition written out here,
`shifted_window_mask` against Swin's region rule, `position_mlp_bias` against its equation,
`halo_windows_to_batch` against `F.unfold`, `axis_relative_logits` against its equation; the
composites against timm's Swin V2 block and HaloAttn; the Swin V2 and HaloNet families against
timm (parameters, logits after porting)."""

from __future__ import annotations

import math

import pytest
import torch

import composer
from composer.diagnostics import ComposerError
from composer.program import Attend
from tests.helpers import perturb, write

timm = pytest.importorskip("timm")


_FILES = iter(range(10 ** 6))


def block_model(tmp_path, body: str, grid=(10, 13), dim: int = 16):
    """A one-block model whose tokens lie on `grid`; its modules by name under `b.`."""
    text = f"""import "lib/window_mixers"
model m {{
    input image(3, [{4 * grid[0]}, {4 * grid[1]}])
    stem patch_embed({dim}, 4)
    stage {{ block {{ to_tokens; {body} }} }}
    head {{ global_pool("avg"); classifier(10) }}
}}
"""
    model = composer.build(write(tmp_path, text, f"m{next(_FILES)}.arch")).eval()
    mods = {k.replace("stages.0.blocks.0.", "b."): v for k, v in model.named_modules()}
    return mods, model


def partition(x, grid, window, shift):
    """The windows written out: x (B, N, C) on `grid` rolled by -shift, zero-padded at the end of
    each axis to multiples of the window; window (i, j) of image b is row b * nW + i * nw + j, its
    token (a, c) at a * w + c holds position (i * w + a, j * w + c)."""
    b, _, c = x.shape
    h, w = grid
    wh, ww = window
    m = x.reshape(b, h, w, c)
    rolled = torch.empty_like(m)
    for y in range(h):
        for z in range(w):
            rolled[:, y, z] = m[:, (y + shift[0]) % h, (z + shift[1]) % w]
    ph, pw = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    padded = torch.zeros(b, ph, pw, c)
    padded[:, :h, :w] = rolled
    nh, nw = ph // wh, pw // ww
    out = torch.empty(b * nh * nw, wh * ww, c)
    for n in range(b):
        for i in range(nh):
            for j in range(nw):
                for a in range(wh):
                    for e in range(ww):
                        out[n * nh * nw + i * nw + j, a * ww + e] = padded[n, i * wh + a, j * ww + e]
    return out


@pytest.mark.parametrize("size,shift", [(4, 0), (4, 2), (5, 3)])
def test_windows_to_batch_is_the_partition_and_batch_to_windows_its_inverse(tmp_path, size, shift):
    grid = (10, 13)  # not multiples of the window: padded at run time
    mods, _ = block_model(tmp_path, f"windows_to_batch({size}, shift = {shift}) as cut; "
                                    f"batch_to_windows({size}, shift = {shift}) as back", grid)
    x = torch.randn(2, grid[0] * grid[1], 16)
    cut, back = mods["b.cut"], mods["b.back"]
    y = cut(x, grid)
    assert torch.equal(y, partition(x, grid, (size, size), (shift, shift)))
    window_grid = cut.out_grid(grid)
    assert tuple(window_grid) == (size, size) and window_grid.source == grid
    assert torch.equal(back(y, window_grid), x)
    assert back.out_grid(window_grid) == grid


def test_a_grid_no_larger_than_the_window_is_one_unshifted_window(tmp_path):
    mods, _ = block_model(tmp_path, "windows_to_batch(7, shift = 3) as cut; batch_to_windows(7, shift = 3)", (5, 12))
    assert mods["b.cut"].window == (5, 7) and mods["b.cut"].shift == (0, 3)


def swin_mask(padded, window, shift, value=-100.0):
    """Swin's rule: label the padded grid by the slices (0, -w), (-w, -s), (-s, None) of each axis,
    cut the labels into windows, `value` where a query's and a key's labels differ."""
    h, w = padded
    labels = torch.zeros(h, w)
    cnt = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            labels[hs, ws] = cnt
            cnt += 1
    wins = []
    for i in range(h // window[0]):
        for j in range(w // window[1]):
            wins.append(labels[i * window[0]:(i + 1) * window[0], j * window[1]:(j + 1) * window[1]].reshape(-1))
    wins = torch.stack(wins)
    diff = wins[:, None, :] - wins[:, :, None]
    return torch.where(diff != 0, torch.tensor(value), torch.tensor(0.0))


@pytest.mark.parametrize("grid,size,shift", [((8, 8), 4, 2), ((10, 13), 4, 2), ((9, 9), 3, 1)])
def test_shifted_window_mask_is_swins_rule(tmp_path, grid, size, shift):
    mods, _ = block_model(tmp_path, f"""windows_to_batch({size}, shift = {shift}) as cut
        linear(48) as qkv
        q, k, v = split_heads(2)
        scores(q, k)
        shifted_window_mask as mask
        softmax
        weighted_sum(v)
        merge_heads
        batch_to_windows({size}, shift = {shift})""", grid)
    window_grid = mods["b.cut"].out_grid(grid)
    got = mods["b.mask"].score_bias((window_grid, window_grid))
    padded = tuple(math.ceil(g / size) * size for g in grid)
    assert torch.equal(got[:, 0], swin_mask(padded, (size, size), (shift, shift)))
    # run as written (not fused): added to the scores of every image's windows
    scores = torch.zeros(2 * got.shape[0], 2, size * size, size * size)
    added = mods["b.mask"](scores, (window_grid, window_grid))
    assert torch.equal(added, got.expand(-1, 2, -1, -1).repeat(2, 1, 1, 1))
    # unshifted windows: no term
    plain = mods["b.cut"].__class__((size, size), (0, 0)).out_grid(grid)
    assert mods["b.mask"].score_bias((plain, plain)) is None


def test_position_mlp_bias_is_the_mlp_of_log_coordinates(tmp_path):
    mods, _ = block_model(tmp_path, """linear(48) as qkv
        q, k, v = split_heads(2)
        scores(q, k)
        position_mlp_bias(32, coords = "raw") as cpb
        softmax
        weighted_sum(v)
        merge_heads""", (3, 4))
    cpb = mods["b.cpb"]
    got = cpb.score_bias(((3, 4), (3, 4)))[0]
    pos = [(y, z) for y in range(3) for z in range(4)]
    want = torch.empty(2, 12, 12)
    with torch.no_grad():
        for i, p in enumerate(pos):
            for j, q in enumerate(pos):
                r = torch.tensor([math.copysign(math.log(1 + abs(p[0] - q[0])), p[0] - q[0]),
                                  math.copysign(math.log(1 + abs(p[1] - q[1])), p[1] - q[1])])
                h = torch.relu(r @ cpb.fc1.weight.t() + cpb.fc1.bias)
                want[:, i, j] = h @ cpb.fc2.weight.t() + cpb.fc2.bias
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("grid,shift", [((14, 14), 3), ((10, 13), 3), ((14, 14), 0)])
def test_window_cosine_attention_equals_timms_swin_v2_attention(tmp_path, grid, shift):
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock

    dim, heads = 32, 4
    mods, model = block_model(tmp_path, f"window_cosine_attention({dim}, {heads}, 7, shift = {shift}) as attn",
                              grid, dim)
    ours = mods["b.attn"]
    ref = SwinTransformerV2CrBlock(dim, heads, feat_size=(14, 14), window_size=(7, 7), shift_size=(shift, shift),
                                   dynamic_mask=True).eval()
    perturb(ref)
    with torch.no_grad():
        for name in ("qkv", "proj", "meta_mlp.fc1", "meta_mlp.fc2"):
            dst, src = ours.get_submodule(name), ref.attn.get_submodule(name)
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        ours.logit_scale.scale.copy_(ref.attn.logit_scale.view(-1, 1, 1))
    assert any(isinstance(i, Attend) for i in ours.program)  # scores -> terms -> softmax -> sum: one SDPA call
    x = torch.randn(2, grid[0] * grid[1], dim)
    with torch.no_grad():
        a = ours(x, {" grid": grid})
        b = ref._shifted_window_attn(x.reshape(2, *grid, dim)).reshape(2, -1, dim)
    assert (a - b).abs().max().item() < 1e-5


def test_unclosed_or_mismatched_windows_are_located_errors(tmp_path):
    with pytest.raises(ComposerError, match="shift"):
        block_model(tmp_path, "windows_to_batch(4, shift = 2); batch_to_windows(4)")
    with pytest.raises(ComposerError, match="windows_to_batch"):
        block_model(tmp_path, "to_map; patches_to_batch(2); to_tokens; batch_to_windows(4)", (8, 8))
    with pytest.raises(ComposerError, match="not closed"):
        block_model(tmp_path, "windows_to_batch(4)")
    with pytest.raises(ComposerError, match="shift must be in"):
        block_model(tmp_path, "windows_to_batch(4, shift = 4); batch_to_windows(4, shift = 4)")


def _swinv2(**kwargs):
    torch.manual_seed(0)
    ref = timm.create_model("swinv2_cr_tiny_ns_224", pretrained=False, **kwargs).eval()
    perturb(ref)
    return ref


def test_swinv2_parameters_equal_timm():
    plan = composer.load("swinv2_cr_tiny_ns")
    ref = timm.create_model("swinv2_cr_tiny_ns_224", pretrained=False)
    assert plan.params == sum(p.numel() for p in ref.parameters()) == 28_333_468


def test_swinv2_ported_gives_timms_logits_at_other_sizes_too():
    from composer.port import from_timm

    ref = _swinv2(num_classes=10, strict_img_size=False)
    ours = composer.build("swinv2_cr_tiny_ns", num_classes=10).eval()
    assert from_timm(ours, ref.state_dict()).ok
    for size in ((224, 224), (160, 288)):  # 160 x 288: windows padded, shifted masks made for that grid
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert (ours(x) - ref(x)).abs().max().item() < 1e-4


def test_halo_windows_to_batch_is_unfold(tmp_path):
    grid, block, halo, dim = (8, 12), 4, 1, 16
    mods, _ = block_model(tmp_path, f"""to_map
        kv = conv(16, 1)
        to_tokens
        windows_to_batch({block})
        halo_windows_to_batch(kv, {block}, {halo}) as gather
        batch_to_windows({block})""", grid)
    x = torch.randn(2, grid[0] * grid[1], dim)
    got = mods["b.gather"](x, grids=(grid,))
    win = block + 2 * halo
    cols = torch.nn.functional.unfold(x.transpose(1, 2).reshape(2, dim, *grid), win, padding=halo, stride=block)
    want = cols.reshape(2, dim, win * win, -1).permute(0, 3, 2, 1).reshape(-1, win * win, dim)  # (B * blocks, win², C)
    assert torch.equal(got, want)


def test_axis_relative_logits_equation(tmp_path):
    mods, _ = block_model(tmp_path, """to_map
        kv = conv(32, 1)
        to_tokens
        windows_to_batch(2)
        q = split_heads(2)
        halo_windows_to_batch(kv, 2, 1)
        k, v = split_heads(2)
        scores(q, k)
        axis_relative_logits(q) as rel
        softmax
        weighted_sum(v)
        merge_heads
        batch_to_windows(2)""", (4, 6))
    rel = mods["b.rel"]
    q = torch.randn(3, 2, 4, 8)  # queries of 2x2 blocks, keys of 4x4 windows
    got = rel.score_bias(((2, 2), (4, 4)), q)
    want = torch.empty(3, 2, 4, 16)
    for i, (x0, x1) in enumerate((a, b) for a in range(2) for b in range(2)):
        for j, (k0, k1) in enumerate((a, b) for a in range(4) for b in range(4)):
            want[:, :, i, j] = q[:, :, i] @ rel.rel_0[k0 - x0 + 3] + q[:, :, i] @ rel.rel_1[k1 - x1 + 3]
    assert torch.allclose(got, want, atol=1e-5)
    scores = torch.randn(3, 2, 4, 16)  # run as written (not fused): added to the scores
    assert torch.allclose(rel(scores, q, grids=(((2, 2), (4, 4)), (2, 2))), scores + want, atol=1e-5)


@pytest.mark.parametrize("grid,stride,block,halo", [((16, 16), 1, 8, 2), ((16, 16), 2, 8, 2), ((8, 8), 1, 8, 2),
                                                    ((8, 12), 1, 4, 1)])
def test_halo_attention_equals_timms_halo_attn(tmp_path, grid, stride, block, halo):
    from timm.layers.halo_attn import HaloAttn

    dim = 32
    text = f"""import "lib/window_mixers"
model m {{
    input image(3, [{4 * grid[0]}, {4 * grid[1]}])
    stem conv({dim}, 4, stride = 4)
    stage {{ block {{ halo_attention({dim}, 4, {block}, {halo}, stride = {stride}) as attn }} }}
    head {{ global_pool("avg"); classifier(10) }}
}}
"""
    ours = composer.build(write(tmp_path, text, f"h{next(_FILES)}.arch")).eval().stages[0].blocks[0].attn
    ref = HaloAttn(dim, dim, stride=stride, num_heads=4, block_size=block, halo_size=halo).eval()
    perturb(ref)
    ours.load_state_dict({"q.weight": ref.q.weight, "kv.weight": ref.kv.weight,
                          "pos_embed.rel_0": ref.pos_embed.height_rel, "pos_embed.rel_1": ref.pos_embed.width_rel})
    assert any(isinstance(i, Attend) and len(i.biases) == 1 for i in ours.program)  # the q-dependent term fuses
    x = torch.randn(2, dim, *grid)
    with torch.no_grad():
        assert (ours(x, {}) - ref(x)).abs().max().item() < 1e-5


def test_halo_blocks_must_pair_with_open_windows(tmp_path):
    with pytest.raises(ComposerError, match="none is open"):
        block_model(tmp_path, "kv = linear(16); halo_windows_to_batch(kv, 4, 1)", (8, 8))
    with pytest.raises(ComposerError, match="must pair up"):
        block_model(tmp_path, "kv = linear(16); windows_to_batch(2); halo_windows_to_batch(kv, 4, 1); "
                              "batch_to_windows(2)", (8, 8))


def test_halonet_parameters_and_ported_logits_equal_timm():
    from composer.port import from_timm

    ref = timm.create_model("halonet26t", pretrained=False)
    assert composer.load("halonet26t").params == sum(p.numel() for p in ref.parameters()) == 12_480_288
    torch.manual_seed(0)
    ref = timm.create_model("halonet26t", pretrained=False, num_classes=10).eval()
    perturb(ref)
    ours = composer.build("halonet26t", num_classes=10).eval()
    assert from_timm(ours, ref.state_dict()).ok
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4


def test_window_attention_is_attention_inside_shifted_windows(tmp_path):
    grid, size, shift, dim, heads = (8, 10), 4, 2, 16, 2
    mods, _ = block_model(tmp_path, f"window_attention({dim}, {heads}, {size}, shift = {shift}) as attn", grid, dim)
    attn = mods["b.attn"]
    x = torch.randn(2, grid[0] * grid[1], dim)
    with torch.no_grad():
        got = attn(x, {" grid": grid})
        w = partition(x, grid, (size, size), (shift, shift))  # (B * nW, N, C)
        q, k, v = (attn.qkv(w).reshape(w.shape[0], -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4))
        padded = tuple(math.ceil(g / size) * size for g in grid)
        mask = swin_mask(padded, (size, size), (shift, shift)).repeat(2, 1, 1)[:, None]
        a = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5 + mask).softmax(-1)
        out = attn.proj((a @ v).transpose(1, 2).reshape(w.shape[0], -1, dim))
        # back on the grid: window (i, j) token (r, c) is rolled position (i * size + r, j * size + c)
        nh, nw = padded[0] // size, padded[1] // size
        full = out.reshape(2, nh, nw, size, size, dim).permute(0, 1, 3, 2, 4, 5).reshape(2, *padded, dim)
        want = torch.roll(full[:, :grid[0], :grid[1]], (shift, shift), (1, 2)).reshape(2, -1, dim)
    assert (got - want).abs().max().item() < 1e-5


def test_position_mlp_bias_in_windows_counts_its_mlp_once(tmp_path):
    """The bias MLP runs once per forward, not once per window: its MACs are the distinct relative
    coordinates of one 4x4 window (7 x 7 = 49 rows) through 2 -> 32 -> heads, counted by hand,
    whatever the number of windows (8 x 8 grid: 4 windows)."""
    _, model = block_model(tmp_path, """windows_to_batch(4)
        linear(48) as qkv
        q, k, v = split_heads(2)
        scores(q, k)
        position_mlp_bias(32, coords = "raw") as cpb
        softmax
        weighted_sum(v)
        merge_heads
        batch_to_windows(4)""", (8, 8))
    step = next(s for sec in model.plan.sections for st in sec.steps for s in st.walk() if s.path.endswith(".cpb"))
    assert step.macs == 49 * 32 * (2 + 2)
