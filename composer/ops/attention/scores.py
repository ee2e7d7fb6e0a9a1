"""The score parts of `attention` (dot, cosine, random-feature linear attention) and agent
attention. See protocol.py for what a part owns."""


from ...shapes import ShapeError
from ..registry import NonNegFloat, Pos, PosFloat, op, prod
from .protocol import Part, rule


class Score(Part):
    """Base of the `score` parts (the op's `score` field takes any of them)."""


@op("dot", kind="part", category="attention part")
class Dot(Score):
    """Scaled dot-product scores q k^T * scale (the default; scale head_dim^-0.5 unless given)."""

    def provides(self, x, role):
        return {"score"}

    def part_runtime_grid(self, att, x, features):
        return True


@op("cosine", kind="part", category="attention part")
class Cosine(Score):
    """Length-scaled cosine scores (TransNeXt): q and k are l2-normalised per head; with
    `query_embedding` a learned per-head vector `query_embedding` (heads, 1, head_dim,
    trunc-normal 0.02) is added to the normalised q; the scores are multiplied by
    softplus(`temperature`) per head (parameter `temperature` (heads, 1, 1), initialised so that
    softplus gives `init`, 1/0.24) and, with `length_scale`, by log(keys seen by the query)
    (buffer `seq_length_scale`; with a masked neighbourhood the count of unpadded keys per query).
    The attention's `scale` is not used."""

    init: PosFloat = 1 / 0.24
    query_embedding: bool = True
    length_scale: bool = True

    def provides(self, x, role):
        return {"score", "cosine"}

    def check_part(self, att, g):
        if self.init <= 0:
            raise ShapeError("cosine init (softplus of the temperature) must be positive")

    def add_params(self, att, g):
        return g.heads + (g.inner if self.query_embedding else 0)

    def layer(self, att, g):
        from ...layers.attention.scores import Cosine as Piece

        return Piece(g.heads, g.head_dim, self.init, self.query_embedding, self.length_scale, g.keys)

    def part_runtime_grid(self, att, x, features):
        return "partition" in features or not self.length_scale


@op("performer", kind="part", category="attention part")
class Performer(Score):
    """Linear attention with positive random features (Performer's FAVOR+, T2T-ViT's T2T layers):
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m) for the un-scaled q and k of every head, W a frozen
    (m = `features`, head_dim) random matrix with orthogonal rows scaled by sqrt(m) (a parameter `w`
    with requires_grad=False, shared by the heads, drawn at build time); the output is
    phi(q) (phi(K)^T V) / (phi(q) . sum_j phi(k_j) + `eps`), never forming the N x M scores.
    The attention's `scale` is not used; no partition, position, extra_kv or agents."""

    features: Pos
    eps: NonNegFloat = 1e-8

    def provides(self, x, role):
        return {"score", "performer"}

    def requirements(self, role):
        return (rule("performer attention takes no partition, position, extra_kv or agents",
                     excludes={"partition", "position", "extra_kv", "agents"}),
                rule("performer with a kv source cannot take class tokens", when={"kv"}, excludes={"prefix"}))

    def check_part(self, att, g):
        if self.features <= 0:
            raise ShapeError(f"performer features must be positive, got {self.features}")

    def add_params(self, att, g):
        return self.features * (g.inner // g.heads)  # the frozen random matrix `w`

    def core_macs(self, att, g):
        f, n, m = self.features, g.tokens, g.kv_tokens
        # phi(q), phi(k), phi(K)^T V, phi(q) (phi(K)^T V) and the normaliser phi(q) . sum phi(k)
        return (2 * n + 2 * m) * f * g.inner + n * f * g.heads

    def layer(self, att, g):
        from ...layers.attention.scores import Performer as Piece

        return Piece(self.features, self.eps, g.head_dim)

    def part_runtime_grid(self, att, x, features):
        return True


@op("agents", kind="part", category="attention part")
class Agents(Part):
    """Agent attention (Han et al.): `count` agent tokens (a square number in 2-D) are the queries
    average-pooled to a sqrt(count)^d grid (`AdaptiveAvgPool`). Two softmaxes: the agents attend to
    the keys (agent aggregation, bias `an_bias` (heads, count, 7, 7) resized bilinearly to the key
    grid plus one per-dim table per grid axis: `ah_bias`, `aw_bias`), then the queries attend to the
    agents, whose values are those aggregates (bias `na_bias` resized to the query grid plus `ha_bias`,
    `wa_bias`). The biases are trunc-normal(0.02). A depthwise `kernel` conv with bias over V as a map
    (`dwc`; V resized to the query grid when keys are reduced) is added before `proj`. 1-D or 2-D;
    works with `kv = reduce(...)` and with unshifted windows."""

    count: Pos
    kernel: Pos = 3
    table: Pos = 7

    def side(self, ndim: int) -> int:
        side = round(self.count ** (1 / ndim)) if ndim else 0
        if side ** ndim != self.count:
            raise ShapeError(f"agents count {self.count} must be a {('square', 'cube')[min(ndim, 3) - 2] if ndim > 1 else 'number'}",
                             "the agents are the queries pooled to a sqrt(count) x sqrt(count) grid")
        return side

    def provides(self, x, role):
        return {"agents"}

    def requirements(self, role):
        return (rule("this attention needs tokens on a spatial grid", needs={"grid"}),
                rule("agents need a 1-D or 2-D grid without class tokens", excludes={"prefix", "grid_3d"}),
                rule("agents work without partition or with unshifted windows, and without position, "
                     "extra_kv, cosine or given queries",
                     excludes={"grid_groups", "neighbourhood", "routed", "shifted", "position", "extra_kv", "cosine",
                               "given"}))

    def check_part(self, att, g):
        self.side(g.ndim)

    def layer(self, att, g):
        from ...layers.attention.scores import Agents as Piece

        return Piece(g.heads, g.inner, self.count, self.kernel, self.table, g.group, g.kv_grid)
        if self.count <= 0 or self.kernel <= 0 or self.kernel % 2 == 0 or self.table <= 0:
            raise ShapeError("agents count, table and (odd) kernel must be positive")

    def key_grid(self, att, g) -> tuple:
        return att.kv.grid(g.x) if "kv" in g.features else g.group

    def add_params(self, att, g):
        h, a, d = g.heads, self.count, g.ndim
        n = 2 * h * a * self.table ** d + h * a * (sum(self.key_grid(att, g)) + sum(g.group))
        return n + g.inner * self.kernel ** d + g.inner

    def core_macs(self, att, g):
        a, n, cd = self.count, g.tokens, g.inner
        groups = n // prod(g.group) if "partition" in g.features else 1
        keys = g.kv_tokens // groups
        total = groups * 2 * a * keys * cd + 2 * n * a * cd  # agents x keys, queries x agents
        return total + n * cd * self.kernel ** g.ndim

