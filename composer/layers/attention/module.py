"""The torch module behind the `attention` op: a fixed forward assembled from pieces.

Each part of the op (composer/ops/attention/) gives the module one piece (`Part.layer`), a plain
object that installs its parameters, buffers and submodules on the module under their state_dict
names and takes some of the forward's steps. The module itself holds no part's logic:

  enter(m, x, run) -> x          regroup the tokens before the projections (windows); `leave`
                                 undoes it after the attention, in reverse order
  project(m, x, run) -> q, k, v  the projections (exactly one piece; (B', L, C) tokens each)
  extra(m, x, run)               keys and values from elsewhere, under the same softmax (`run.extra`)
  core(m, q, k, v, run) -> y     an attention other than the dense product (at most one piece)
  prepare(m, q, k, run) -> q, k  per-head changes of q and k before the product (cosine, ...)
  keys(m, k, v, run) -> k, v     keys and values prepended to every query's (`run.prepended`)
  bias(m, run) -> term | None    an additive score term; `covers_prepended = False` (the default):
                                 over the tokens' keys only (padded with zeros for prepended keys)
  finish(m, y, run) -> y         added to the output before `leave` (LePE)
  output(m, y, run) -> y         the output projection (exactly one piece)

`Run` carries one call's state (the grid at run time, the values, the prepended key count, ...).
Pieces are installed in `rank` order, the order in which the sealed module of earlier versions
created its parameters, so a seed gives the same weights; the forward calls them in list order."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HOOKS = ("enter", "project", "extra", "core", "prepare", "keys", "bias", "finish", "output")


def _takes(piece, hook: str) -> bool:
    return callable(getattr(type(piece), hook, None))


class Piece:
    """Base class of the attention pieces (see the module docstring)."""

    rank = 50  # install order
    covers_prepended = False  # a `bias` term over every key, prepended ones included

    def install(self, m: nn.Module) -> None:
        pass


class Run:
    """The state of one forward call: `grid` (the tokens' grid at run time), `b` (the batch),
    `x` (the input tokens), `tensors` (the tensors given by name, regrouped as the tokens), `v` (the values' tokens), `extra` (extra keys and values, heads split),
    `prepended` (keys prepended by `keys` pieces), `gathered` (keys gathered per query: score
    terms are (..., N, 1, K)), `unit_keys` (keys are unit vectors), `mask` (a windows' mask: q, k, v grouped per window), `kv_bias` (a
    score bias that came with the keys). A piece may keep its own state of the call on it too
    (Windows: `padded`, `messengers`; Neighbourhood: `q_unit`; RelativeXL: `xl_bias`; NamedQKV:
    `shared_queries`)."""

    def __init__(self, grid, x, tensors=()):
        self.grid, self.x, self.b, self.tensors = grid, x, x.shape[0], tensors
        self.v = self.extra = self.mask = self.kv_bias = None
        self.prepended, self.gathered, self.unit_keys = 0, False, False


class Attention(nn.Module):
    """Multi-head attention over (B, extra + prod(grid), C) tokens, assembled from `pieces`:
    `dim` the width of q, k and v, `scale` the product's (None: head_dim^-0.5)."""

    takes_grid = True  # the builder passes the grid the tokens lie on at run time

    def __init__(self, dim, heads, grid, extra=0, scale=None, pieces=()):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qk_scale = self.head_dim ** -0.5 if scale is None else scale  # where the product is explicit
        self.scale = scale  # None: SDPA's default, head_dim^-0.5
        self.grid, self.extra = tuple(grid), extra
        self.explicit = False  # a piece may ask for the explicit product (few queries, as the references)
        self.pieces = tuple(pieces)
        for piece in sorted(self.pieces, key=lambda p: p.rank):
            piece.install(self)
        hooks = {name: [p for p in self.pieces if _takes(p, name)] for name in HOOKS}
        for name in ("project", "output"):
            if len(hooks[name]) != 1:
                raise ValueError(f"attention needs exactly one `{name}` piece, got {len(hooks[name])}")
        if len(hooks["core"]) > 1:
            raise ValueError("attention takes at most one `core` piece")
        self._project, self._output = hooks["project"][0], hooks["output"][0]
        self._core = hooks["core"][0] if hooks["core"] else None
        self._enter, self._extra = hooks["enter"], hooks["extra"]
        self._prepare, self._keys, self._finish = hooks["prepare"], hooks["keys"], hooks["finish"]
        self.extra_biases = [p for p in self.pieces if _takes(p, "extra_bias")]  # the extra keys' terms
        self.prepares = bool(hooks["prepare"])
        self._bias_tokens = [p for p in hooks["bias"] if not p.covers_prepended]
        self._bias_all = [p for p in hooks["bias"] if p.covers_prepended]

    # ------------------------------------------------------------------ what the pieces call
    def split_heads(self, t):
        """(B, L, C) -> (B, heads, L, head_dim)."""
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, t):
        """(B, heads, L, head_dim) -> (B, L, C)."""
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], self.heads * self.head_dim)

    def prepare(self, q, k, run):
        for piece in self._prepare:
            q, k = piece.prepare(self, q, k, run)
        return q, k

    def more_keys(self, k, v, run):
        """The `keys` pieces' keys and values, prepended."""
        for piece in self._keys:
            k, v = piece.keys(self, k, v, run)
        return k, v

    def score_bias(self, run, bias=None):
        """`bias` (a core's own terms over the tokens' keys) plus the pieces' terms: those over the
        tokens' keys, zero-padded for the prepended keys, then those over every key."""
        for piece in self._bias_tokens:
            term = piece.bias(self, run)
            if term is not None:
                bias = term if bias is None else bias + term
        if bias is not None and run.prepended:
            bias = F.pad(bias, (run.prepended, 0))
        for piece in self._bias_all:
            term = piece.bias(self, run)
            if term is not None:
                bias = term if bias is None else bias + term
        return bias

    def scores(self, q, k, bias):
        a = (q * self.qk_scale) @ k.transpose(-2, -1)
        return a if bias is None else a + bias

    def attend(self, q, k, v, bias):
        if (bias is not None and not q.is_cuda) or q.dim() != 4 or self.explicit:
            # an additive bias on the CPU: SDPA's float-mask path re-checks the mask every call and is
            # slower than the plain product (timm's Swin does the same); few queries (first(n)): plain
            # matmuls, as the references, which FLOP counters also see
            return self.scores(q, k, bias).softmax(dim=-1) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)

    def dense(self, q, k, v, run):
        """Every query against every key of its group (the default core): tokens in, tokens out."""
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        q, k = self.prepare(q, k, run)
        k, v = self.more_keys(k, v, run)
        if run.extra is not None:  # extra keys from a source: more keys, the same softmax
            k, v = torch.cat([k, run.extra[0]], 2), torch.cat([v, run.extra[1]], 2)
        bias = self.score_bias(run)
        bw, nw = q.shape[0], q.shape[2]
        if run.mask is not None:  # the windows' mask (nW, 1, N, N): q, k, v grouped per window
            nwin = run.mask.shape[0]
            q, k, v = (t.reshape(t.shape[0] // nwin, nwin, self.heads, t.shape[2], self.head_dim)
                       for t in (q, k, v))
        y = self.attend(q, k, v, bias).reshape(bw, self.heads, nw, self.head_dim)
        return self.merge_heads(y)

    # ------------------------------------------------------------------ forward
    def forward(self, x, *args, grids=None):
        """`forward(x, grid)` or `forward(x, *tensors, grids=...)`: `tensors` are the tensors given by
        name (the queries of `q = NAME`) on the tokens' grid; the grid (or the first of `grids`) is
        the tokens' grid at run time (the build grid when not given). Only the configurations the
        op's `runtime_grid` admits get another grid."""
        if grids is not None:
            grid, tensors = grids[0], args
        elif args and not isinstance(args[0], torch.Tensor):
            grid, tensors = args[0], ()
        else:
            grid, tensors = None, args
        run = Run(self.grid if grid is None else tuple(grid), x, tensors)
        for piece in self._enter:
            x = piece.enter(self, x, run)
        q, k, v = self._project.project(self, x, run)
        run.v = v
        for piece in self._extra:
            piece.extra(self, x, run)
        y = self.dense(q, k, v, run) if self._core is None else self._core.core(self, q, k, v, run)
        for piece in self._finish:
            y = piece.finish(self, y, run)
        for piece in reversed(self._enter):
            y = piece.leave(self, y, run)
        return self._output.output(self, y, run)
