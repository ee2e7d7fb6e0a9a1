"""Per-window prefix tokens (MSG-Transformer's messengers): `window_tokens` adds one learned token
per window ahead of the grid, `attention(partition = window(w, messengers = true))` lets each join
its window, and `shuffle_window_tokens` exchanges channel groups between the tokens of the windows
of a region. The modules are in composer/layers/window_tokens.py."""


from ..shapes import Shape, ShapeError
from .registry import NonNeg, NonNegFloat, Op, Pos, op, prod


def window_grid(grid: tuple[int, ...], size: int, what: str) -> tuple[int, ...]:
    """The grid of `size`-wide windows over `grid` (a window covering the whole grid: one window,
    as the attention's `window` does)."""
    if size <= 0:
        raise ShapeError(f"{what} window size must be positive, got {size}")
    if not grid:
        raise ShapeError(f"{what} needs tokens on a spatial grid")
    w = min(min(grid), size)
    for g in grid:
        if g % w:
            raise ShapeError(f"{what}: window {w} does not divide feature size {g}",
                             f"choose an input size so that the grid ({'x'.join(map(str, grid))}) is a multiple of {w}")
    return tuple(g // w for g in grid)


@op("window_tokens", category="embed", layout="tokens")
class WindowTokens(Op):
    """One learned token per `size`-wide window of the grid, put ahead of the grid tokens in window
    raster order (MSG-Transformer's messenger tokens; `attention(partition = window(size,
    messengers = true))` lets each join its window). With `period = p` only p^d tokens are learned
    and repeated over the window grid with period p per dim (MSG-Transformer shares the 4 x 4
    messengers of one shuffle region across the regions); `period = 0` learns one per window.
    Parameter `tokens` (p^d or windows, channels), trunc-normal(`std`). The input has no prefix
    tokens."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    size: Pos
    period: NonNeg = 0
    std: NonNegFloat = 0.02

    def _count(self, x: Shape) -> int:
        grid = window_grid(x.spatial, self.size, self.name)
        if self.period < 0:
            raise ShapeError(f"window_tokens period must be positive (or 0), got {self.period}")
        if self.period:
            for g in grid:
                if g % self.period:
                    raise ShapeError(f"window_tokens period {self.period} does not divide the window grid "
                                     f"({'x'.join(map(str, grid))})")
            return self.period ** x.ndim
        return prod(grid)

    def infer(self, x: Shape) -> Shape:
        if x.extra:
            raise ShapeError(f"window_tokens needs tokens without prefix tokens, got {x.extra}")
        self._count(x)
        return x.with_(extra=prod(window_grid(x.spatial, self.size, self.name)))

    def params(self, x, y):
        return self._count(x) * x.channels

    def build(self, x, y):
        from ..layers.window_tokens import WindowTokens as Module

        grid = window_grid(x.spatial, self.size, self.name)
        return Module(x.channels, grid, self.period, self.std)


@op("shuffle_window_tokens", category="layout", layout="tokens")
class ShuffleWindowTokens(Op):
    """Exchange channel groups between the prefix tokens of neighbouring windows (MSG-Transformer's
    messenger shuffle): the prefix tokens are one per `size`-wide window in window raster order;
    the window grid is cut into `region`^d blocks of G = region^d windows, and within a block token
    i's channel group j becomes token j's channel group i (a channel shuffle across the windows; G
    must divide the channels). A region at least as wide as the window grid is the whole grid (its
    smaller side). The grid tokens pass unchanged; a fixed index, built once."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    size: Pos
    region: Pos

    def _grid(self, x: Shape) -> tuple[int, ...]:
        grid = window_grid(x.spatial, self.size, self.name)
        if x.extra != prod(grid):
            raise ShapeError(f"shuffle_window_tokens needs one prefix token per window: {prod(grid)} windows, "
                             f"got {x.extra} prefix tokens")
        if self.region <= 0:
            raise ShapeError(f"shuffle region must be positive, got {self.region}")
        region = self.effective(grid)
        for g in grid:
            if g % region:
                raise ShapeError(f"shuffle region {region} does not divide the window grid "
                                 f"({'x'.join(map(str, grid))})")
        if x.channels % region ** x.ndim:
            raise ShapeError(f"shuffle_window_tokens: {region ** x.ndim} windows per region do not divide "
                             f"the {x.channels} channels")
        return grid

    def effective(self, grid: tuple[int, ...]) -> int:
        return min(self.region, min(grid))

    def infer(self, x: Shape) -> Shape:
        self._grid(x)
        return x

    def build(self, x, y):
        from ..layers.window_tokens import ShuffleWindowTokens as Module

        grid = self._grid(x)
        return Module(grid, self.effective(grid))
