"""`member_attention`: parameter-free multi-head attention inside small sets stored along the
channels, one set per position (a learned query attending to the steps of its patch)."""


from typing import Optional

from ..shapes import Shape, ShapeError
from .registry import Op, Pos, PosFloat, op


@op("member_attention", category="attention")
class MemberAttention(Op):
    """Attention inside a set of `members` vectors of C channels held at every position of a map
    (or every token): the input's channels are three blocks of `members` * C, the members
    themselves, their keys and their values (member-major: member j's channels are j*C ... j*C + C - 1
    in each block). Member 0 is the query, as it is (no projection); heads split C into `heads`
    contiguous groups; scores q . k_j are scaled by `scale` (default (C / heads)^-0.5) and
    softmax-ed over the members; the output is the weighted sum of the values, C channels, heads
    concatenated. The other members' own channels are not read: they are carried so that the keys
    and values can be computed from them by the ops before (a `parallel concat` of identity and
    the projections). Pathformer's intra-patch attention: a per-patch learned query and the
    patch's steps are the members, with per-variable key/value weights (`indexed_linear`).
    No parameters; MACs 2 * members * C per position."""

    heads: Pos = 1
    members: Pos = 2
    scale: Optional[PosFloat] = None

    def width(self, x: Shape) -> int:
        if self.members < 1:
            raise ShapeError(f"member_attention members must be 1 or more, got {self.members}")
        if x.channels % (3 * self.members):
            raise ShapeError(f"member_attention: {x.channels} channels are not 3 blocks of {self.members} members",
                             "the channels are [members | keys | values], each members * C")
        c = x.channels // (3 * self.members)
        if self.heads < 1 or c % self.heads:
            raise ShapeError(f"{self.heads} heads do not divide the {c} channels of a member")
        return c

    def infer(self, x: Shape) -> Shape:
        if x.layout == "vector":
            raise ShapeError("member_attention needs a map or tokens (one set per position)")
        return x.with_(channels=self.width(x))

    def macs(self, x: Shape, y: Shape) -> int:
        return x.tokens * 2 * self.members * y.channels

    def build(self, x, y):
        from ..layers.member_attention import MemberAttention as Module

        return Module(self.members, y.channels, self.heads, self.scale, channel_first=x.layout == "map")
