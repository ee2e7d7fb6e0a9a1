"""The torch modules of the attention ops: `Attention` assembled from the parts' pieces
(module.py: the forward and the piece protocol; projections.py, partitions.py, positions.py,
scores.py: the pieces; groups.py: windows and grid groups; tables.py: index and fixed tables),
and `CascadedAttention` (cascaded.py)."""

from .cascaded import CascadedAttention, offset_index
from .groups import padded_grid, partition_windows, unpartition_windows
from .module import Attention, Piece, Run
from .projections import ReduceKeys, TokensOf

__all__ = ["Attention", "Piece", "Run", "CascadedAttention", "offset_index", "ReduceKeys", "TokensOf",
           "padded_grid", "partition_windows", "unpartition_windows"]
