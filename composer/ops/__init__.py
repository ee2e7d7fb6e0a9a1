"""The generic op library: importing this package registers every op (pure Python, no torch)."""

from . import act, attention, conv, embed, gating, linear, loss, norm, reparam, resample, patches, tile, tokens, tokens_extra  # noqa: F401  (registration)
from . import cluster, sampling, unfold_tokens  # noqa: F401, E402  (registration: soft clustering, deformable sampling, unfold)
from . import dynamic, deform_attn  # noqa: F401, E402  (registration: conditioning streams, multi-scale deformable attention)
from . import routing  # noqa: F401, E402  (registration: top-k mixture of experts)
from . import multilevel, select  # noqa: F401, E402  (registration: multi-level window attention; top-k token selection, early exit)
from . import window_tokens  # noqa: F401, E402  (registration: per-window prefix tokens for window(messengers = true))
from . import rearrange, indexed_linear, member_attention, unused  # noqa: F401, E402  (registration: einops-style reshape of maps; per-index/generated linears; attention in channel-held sets; parameter-only layers)
from . import series  # noqa: F401, E402  (registration: moving-average trend, Fourier season, moments/destandardize)
from . import level_embed  # noqa: F401, E402  (registration: a learned vector per level of a multi-level sequence)
from . import heads  # noqa: F401, E402  (registration: attention primitives: heads, scores, weights)
from . import rotary  # noqa: F401, E402  (registration: rotary position embeddings on q and k)
from . import positions  # noqa: F401, E402  (registration: position terms on scores: relative bias table, position scores)
from . import windows  # noqa: F401, E402  (registration: windows into the batch and back; window score terms)
from . import head_maps  # noqa: F401, E402  (registration: heads into the batch as maps and back)
from .registry import OPS, Op, op

__all__ = ["OPS", "Op", "op"]
