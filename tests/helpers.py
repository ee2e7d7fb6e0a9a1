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
