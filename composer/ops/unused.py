"""`unused`: an op built for its parameters only, the input passed through unchanged."""


from typing import Optional

from ..shapes import Shape, ShapeError
from .registry import Op, Pos, op


@op("unused", category="misc")
class Unused(Op):
    """Build `op` and keep it as a submodule (`unused.op`) without calling it: the input passes
    through unchanged. For parity with a reference implementation that defines a layer its forward
    never calls (the parameters still count and appear in the state_dict, so weights port and the
    count matches). `op` is built for an input with the running tensor's layout and grid and
    `channels` channels (default: the input's). Parameters: those of `op`, frozen
    (`requires_grad=False`: nothing trains them, and plain DDP accepts the model); no MACs."""

    op: Op
    channels: Optional[Pos] = None

    def inner(self, x: Shape) -> tuple[Shape, Shape]:
        if self.channels is not None and self.channels < 1:
            raise ShapeError(f"unused channels must be positive, got {self.channels}")
        xi = x.with_(channels=self.channels) if self.channels is not None else x
        if self.op.layout not in ("any", xi.layout):
            raise ShapeError(f"unused: {self.op.name} needs a {self.op.layout}, the input is a {xi.layout} {xi}")
        return xi, self.op.infer(xi)

    def infer(self, x: Shape) -> Shape:
        self.inner(x)
        return x

    def params(self, x: Shape, y: Shape) -> int:
        return self.op.params(*self.inner(x))

    def build(self, x, y):
        from ..layers.unused import Unused as Module

        return Module(self.op.build(*self.inner(x)))
