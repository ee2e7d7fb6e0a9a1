"""The `attention` op and its parts, one object per part that owns its rules (protocol.py):
partitions.py (window, grid, neighbourhood, dilated, routed), sources.py (key sources, reduce,
conv_proj, kv_tokens, given, first), positions.py (relative_bias, relative_bias_map, learned_bias,
relative_xl, continuous_bias, lepe), scores.py (dot, cosine, performer, agents), op.py (the op),
cascaded.py (cascaded_attention and offset_bias). The module is composer.layers.attention."""

from .protocol import Geometry, Part, Requirement, check_groups, evaluate, rule  # noqa: F401
from .partitions import Dilated, Grid, LocalPartition, Neighbourhood, Partition, Routed, Window  # noqa: F401
from .sources import ConvProj, ExtraKeys, First, Given, KeySource, KvTokens, Projection, Query, Reduce  # noqa: F401
from .positions import ContinuousBias, LePE, LearnedBias, Position, RelativeBias, RelativeBiasMap, RelativeXL  # noqa: F401
from .positions import cpb_centres, cpb_counts  # noqa: F401
from .scores import Agents, Cosine, Dot, Performer, Score  # noqa: F401
from .op import Attention  # noqa: F401
from .cascaded import CascadedAttention, OffsetBias  # noqa: F401
