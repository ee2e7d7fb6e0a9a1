"""Chains of instructions the builder runs as one call.

`scores(q, k)` -> additive score terms (position biases) -> `softmax` -> [`dropout`] ->
`weighted_sum(v)`, written one after the other in a body, is attention as the papers write it;
run as written it materialises the score matrix four times. `fuse_attention` finds such chains
in a compiled program and puts an `Attend` instruction in their place, which runs them as one
`torch.nn.functional.scaled_dot_product_attention` call (the score terms summed into its mask).
The modules stay where they are (their parameters and state_dict keys do not move); the chain
is only read differently. Any other chain runs as written.

A score term is a module with `score_bias(grid_pair, *tensors)`: the additive term for the
scores' (query grid, key grid) seen at run time, given the named tensors the op takes (the
queries, for relative logits); None when it adds nothing there (unshifted windows). A term is
broadcastable to (B, heads, N, M), or has one entry per window of an image along its first axis
(windows moved into the batch, image-major): it is then repeated over the images.
"""

from __future__ import annotations

from torch import nn

from .layers.heads import Scores, Softmax, WeightedSum
from .program import GRID, Attend, Call, GridCall, TensorCall


def fuse_attention(prog: list, modules) -> list:
    """`prog` with every fusable attention chain replaced by one `Attend` instruction."""
    out, i = [], 0
    while i < len(prog):
        found = _chain(prog, i, modules)
        if found is None:
            out.append(prog[i])
            i += 1
        else:
            ins, i = found
            out.append(ins)
    return out


def _chain(prog: list, i: int, modules):
    """(Attend, index after the chain) when an attention chain starts at `prog[i]`, else None."""
    first = prog[i]
    if first.__class__ is not TensorCall:
        return None
    scores = modules[first.name]
    if not isinstance(scores, Scores) or scores.over_channels or len(first.keys) != 1:
        return None
    j, biases = i + 1, []
    while j < len(prog) and prog[j].__class__ in (Call, GridCall, TensorCall) \
            and hasattr(modules[prog[j].name], "score_bias"):
        ins = prog[j]  # a term may take named tensors (the queries): `score_bias(grids, *tensors)`
        keys = ins.keys if ins.__class__ is TensorCall else ()
        biases.append((ins.name, ins.__class__ is GridCall or (bool(keys) and ins.grids), keys))
        j += 1
    if j >= len(prog) or prog[j].__class__ is not Call or not _is(modules[prog[j].name], Softmax, -1):
        return None
    j += 1
    dropout = None
    if j < len(prog) and prog[j].__class__ is Call and isinstance(modules[prog[j].name], nn.Dropout):
        dropout = prog[j].name
        j += 1
    if j >= len(prog) or prog[j].__class__ is not TensorCall:
        return None
    weights = modules[prog[j].name]
    if not isinstance(weights, WeightedSum) or weights.over_channels or weights.group != scores.group:
        return None
    return Attend(first.name, tuple(biases), dropout, prog[j].name, first.keys[0], prog[j].keys[0]), j + 1


def _is(module, cls, dim) -> bool:
    return isinstance(module, cls) and module.dim == dim


def attend(modules, ins: Attend, x, env: dict, training: bool):
    """Run an `Attend` instruction on the flowing queries `x`: the score terms summed are the mask."""
    scores = modules[ins.scores]
    k, v = env[ins.k], env[ins.v]
    grids = (env.get(GRID), env.get(GRID + ins.k))
    mask = None
    for name, takes, keys in ins.biases:
        term = modules[name].score_bias(scores.out_grid(grids) if takes else None, *[env[k] for k in keys])
        if term is not None:  # None: the term adds nothing here (unshifted windows)
            mask = term if mask is None else mask + term
    drop = modules[ins.dropout].p if ins.dropout is not None and training else 0.0
    if mask is not None and mask.dtype != x.dtype:
        mask = mask.to(x.dtype)
    if mask is not None and mask.ndim == 4 and mask.shape[0] not in (1, x.shape[0]):
        mask = mask.repeat(x.shape[0] // mask.shape[0], 1, 1, 1)  # one entry per window of an image
    return nn.functional.scaled_dot_product_attention(x, k, v, attn_mask=mask, dropout_p=drop, scale=scores.scale,
                                                      enable_gqa=scores.group > 1)
