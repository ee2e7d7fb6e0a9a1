"""Small helpers shared by the tests."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "m.arch") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def small_kwargs(name: str) -> dict:
    """img_size=64 where the zoo model has the parameter and is valid there, and 2 blocks for a plain
    transformer with a `depth` parameter (a base-size model at dense-prediction sizes is slow on CPU)."""
    import composer

    out: dict = {}
    for extra in ({"img_size": 64}, {"depth": 2}):
        try:
            composer.load(name, **out, **extra)
            out.update(extra)
        except composer.ComposerError:
            pass
    return out


def rel_close(a, b, tol=1e-5) -> bool:
    """max |a - b| within `tol` of max |b|."""
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def perturb(model) -> None:
    """Random norm/scale parameters, biases and batch-norm statistics (seeded), so that a tensor the
    port maps to the wrong place shows in the output."""
    import re

    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1:
                if re.search(r"gamma|scale", name):
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                else:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.2)


def explicit_sdpa(q, k, v, attn_mask=None, scale=None, **_):
    """SDPA with explicit matmuls (the flop counter counts 0 for the fused CPU kernel): a drop-in for
    `F.scaled_dot_product_attention` under `monkeypatch.setattr`."""
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        s = s + attn_mask
    return s.softmax(-1) @ v


def split_heads(t, heads):
    """(B, N, C) -> (B, heads, N, C / heads), heads as contiguous channel groups."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def one_block_mixer(tmp_path: Path, call: str, imports: list, dim: int, grid=(4, 6), cls: bool = True):
    """(the module of `call`, the model): a one-block model whose block is `call as attn`, run on
    `dim`-wide tokens on `grid` (8-pixel patches), with a class token ahead when `cls`."""
    import composer

    lines = "\n".join(f'import "{name}"' for name in imports)
    text = f"""{lines}
model m {{
    input image(3, [{8 * grid[0]}, {8 * grid[1]}])
    stem {{ patch_embed({dim}, 8); to_tokens{'; class_token()' if cls else ''} }}
    stage {{ block {{ {call} as attn }} }}
    head {{ global_pool("avg"); classifier(10) }}
}}
"""
    model = composer.build(write(tmp_path, text)).eval()
    return dict(model.named_modules())["stages.0.blocks.0.attn"], model


def count_of_timm(ours: str, name: str) -> int:
    """Our model's parameter count (from the plan, no weights), after checking that its blueprint names
    timm's `name` as its reference, and timm's count (built on the meta device), asserted equal."""
    import timm
    import torch

    import composer

    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    assert composer.load(ours).reference == f"timm:{name}"
    count = composer.check(ours).params
    assert count == n_params(ref)
    return count


def attention_piece(module, cls):
    """The piece of class `cls` (composer/layers/attention/) an attention module was assembled from."""
    return next(p for p in module.pieces if isinstance(p, cls))


# one model of every zoo family (blueprint file), made small through its own blueprint parameters:
# the variant with the fewest parameters, img_size 64 where it is admitted, every depth-like
# parameter at 1 (or the least the blueprint admits); for the tests that run something per family
# (tests/test_compile.py, tests/test_inplace.py). test_compile checks it names every family.
FAMILY_SAMPLE = {
    "agent_pvt": ("agent_pvt_t", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "agent_swin": ("agent_swin_t", {"img_size": 64, "depths": [1, 1, 1, 1], "agent_blocks": [1, 1, 1, 1]}),
    "beit": ("beit_b", {"img_size": 64, "depth": 1}),
    "biformer": ("biformer_t", {"depths": [1, 1, 1, 1]}),
    "cait": ("cait_xxs24", {"img_size": 64, "depth": 1, "class_depth": 1}),
    "ceit": ("ceit_t", {"img_size": 64, "depth": 1}),
    "cf_vit": ("cf_vit_deit_s", {"depth": 1}),
    "cloformer": ("cloformer_xxs", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "cmt": ("cmt_ti", {"depths": [1, 1, 1, 1]}),
    "coat_lite": ("coat_lite_mini", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "conformer": ("conformer_ti", {"img_size": 64, "depth": 6}),
    "conformer_speech": ("conformer_speech_s", {"img_size": 64, "depth": 1}),
    "conv2former": ("conv2former_n", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "convit": ("convit_ti", {"img_size": 64, "depth": 2, "local": 1}),
    "convnext": ("convnext_atto", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "crossvit": ("crossvit_tiny", {"depth": [1, 1], "blocks": 1}),
    "cvt": ("cvt_13", {"img_size": 64, "depths": [1, 1, 1]}),
    "dat": ("dat_t", {"depths": [1, 1, 1, 1]}),
    "deit": ("deit_ti_distilled", {"img_size": 64, "depth": 1}),
    "dilateformer": ("dilateformer_tiny", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "edgevit": ("edgevit_xxs", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "efficientvit_msra": ("efficientvit_m0", {"img_size": 64, "depths": [1, 1, 1]}),
    "emo": ("emo_1m", {"depths": [1, 1, 1, 1]}),
    "fastvit": ("fastvit_t8", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "fat": ("fat_b0", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "focal": ("focal_t", {"depths": [1, 1, 1, 1]}),
    "gcvit": ("gcvit_xxt", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "glnet": ("glnet_4g", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "gmlp": ("gmlp_ti16", {"img_size": 64, "depth": 1}),
    "halonet": ("halonet26t", {}),
    "iformer": ("iformer_s", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "inception_next": ("inception_next_t", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "litv2": ("litv2_s", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "maxvit": ("maxvit_t", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "metaformer": ("poolformer_s12", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "mlp_mixer": ("mixer_s16", {"img_size": 64, "depth": 1}),
    "mobile_former": ("mobile_former_26m", {"img_size": 64}),
    "mobilenetv2": ("mobilenetv2_100", {"img_size": 64}),
    "mobilevit": ("mobilevit_xxs", {"img_size": 64, "tdepths": [1, 1, 1]}),
    "mobilevitv2": ("mobilevitv2_050", {"img_size": 64, "tdepths": [1, 1, 1]}),
    "msg_transformer": ("msg_transformer_t", {"depths": [1, 1, 1, 1]}),
    "mvitv2": ("mvitv2_tiny", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "pathformer": ("pathformer_etth1", {"patches": [[16, 12, 8, 32]]}),
    "pvt_v1": ("pvt_v1_tiny", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "pvt_v2": ("pvt_v2_b0", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "repnext": ("repnext_m0", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "repvgg": ("repvgg_a0", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "resnet": ("resnet18", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "rope_vit": ("rope_vit_b", {"img_size": 64, "depth": 1}),
    "scopevit": ("scopevit_t", {"depths": [1, 1, 1, 1]}),
    "shufflenet_v1": ("shufflenet_v1_g3_x0_5", {"img_size": 64}),
    "shufflenet_v2": ("shufflenet_v2_x0_5", {"img_size": 64}),
    "shunted": ("shunted_t", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "smt": ("smt_t", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "stvit": ("stvit_r_swin_s", {"depths": [1, 1, 1, 1]}),
    "swin": ("swin_t", {"depths": [1, 1, 1, 1]}),
    "swinv2": ("swinv2_cr_tiny", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "t2t_vit": ("t2t_vit_7", {"img_size": 64, "depth": 1}),
    "transnext": ("transnext_micro", {"depths": [1, 1, 1, 1]}),
    "twins": ("twins_svt_small", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "unireplknet": ("unireplknet_a", {"img_size": 64, "depths": [1, 1, 1, 1]}),
    "vit": ("vit_ti", {"img_size": 64, "depth": 1}),
    "vit_adapter": ("vit_adapter_t", {"img_size": 64, "interactions": [1, 1, 1, 1], "extra_extractors": 0}),
    "xcit": ("xcit_nano_12_p16", {"img_size": 64, "depth": 1, "class_depth": 1}),
}
