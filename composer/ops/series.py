"""Time-series ops along one spatial axis of a map: a multi-scale moving-average trend
(`series_decomposition`), a top-k Fourier season (`fourier_season`), and a reversible instance
normalisation: `moments` computes the statistics as an ordinary tensor, `destandardize` undoes
a normalisation with them."""


from typing import Literal

from ..shapes import Shape, ShapeError
from .registry import NonNeg, NonNegFloat, Op, Pos, op, spatial_axis


@op("series_decomposition", category="series", layout="map")
class SeriesDecomposition(Op):
    """The trend of a series by moving averages along spatial axis `axis` (0: the first spatial axis;
    every channel and every other position is its own series), as in Autoformer's `series_decomp`
    and FEDformer's `series_decomp_multi`. For each kernel k the average has stride 1 and repeats
    the first value k - 1 - (k - 1) // 2 times in front and the last value (k - 1) // 2 times at the
    end (edge padding), so the length is kept. With several kernels the averages are mixed, at
    every element, by softmax_k(w_k x + b_k): a `Linear(1, K)` of the element's own value
    (parameter `layer`, `nn.Linear` init), so the weights are data-dependent while the kernels are
    static. `output = "trend"` gives the mixed average, `"residual"` the input minus it (the
    seasonal part). Parameters: 2K with K > 1 kernels, none with one. MACs: K per element (the
    weights' linear; the averages, like pooling, are not counted)."""

    kernels: list[Pos] = [25]
    axis: NonNeg = 0
    output: Literal["trend", "residual"] = "trend"

    def infer(self, x: Shape) -> Shape:
        spatial_axis("series_decomposition", self.axis, x)
        if not self.kernels or any(k < 1 for k in self.kernels):
            raise ShapeError(f"series_decomposition kernels must be 1 or more, got {self.kernels}")
        return x

    def params(self, x: Shape, y: Shape) -> int:
        return 2 * len(self.kernels) if len(self.kernels) > 1 else 0

    def macs(self, x: Shape, y: Shape) -> int:
        return x.numel * len(self.kernels) if len(self.kernels) > 1 else 0

    def build(self, x, y):
        from ..layers.series import SeriesDecomposition as Module

        return Module(tuple(self.kernels), self.axis, self.output == "residual")


@op("fourier_season", category="series", layout="map")
class FourierSeason(Op):
    """The season of a series: its `k` strongest frequencies along spatial axis `axis`, back in the
    time domain (Autoformer/ETSformer's Fourier layer; Pathformer's router). The rFFT X of each series
    (every channel and every other position on its own) is taken over the T steps; among the bins
    `low` (1: the mean left out) up to the last below the Nyquist bin (T even: T/2 excluded; T odd:
    up to (T - 1)/2), the k with the largest |X_f| are kept (chosen per series, so data-dependent)
    and the rest are zeroed: y_t = sum over kept f of 2 |X_f| / T cos(2 pi f t / T + angle(X_f)), an
    inverse rFFT of the kept bins. No parameters; no MACs (FFTs are not counted, like pooling)."""

    k: Pos = 3
    axis: NonNeg = 0
    low: NonNeg = 1

    def _bins(self, t: int) -> int:
        return t // 2 + 1 - (1 if t % 2 == 0 else 0) - self.low

    def infer(self, x: Shape) -> Shape:
        t = spatial_axis("fourier_season", self.axis, x)
        if self.low < 0 or self.k < 1:
            raise ShapeError(f"fourier_season needs k >= 1 and low >= 0, got k = {self.k}, low = {self.low}")
        if self.k > self._bins(t):
            raise ShapeError(f"fourier_season k = {self.k} is more than the {max(self._bins(t), 0)} frequency "
                             f"bins of a length-{t} axis from bin {self.low}",
                             "lower k or low, or run it on a longer axis")
        return x

    def build(self, x, y):
        from ..layers.series import FourierSeason as Module

        return Module(self.k, self.axis, self.low)


@op("moments", category="series", layout="map")
class Moments(Op):
    """The mean and the standard deviation of each channel along spatial axis `axis`:
    (C, *S) -> (2C, *S with that axis 1), the means in the first C channels, the stds sqrt(var + eps)
    (biased variance) in the last C. With the same `eps` these are the statistics that
    `instancenorm` (no affine) divides by on a 1-D map, so `destandardize` can undo it later: the
    reversible instance normalisation of forecasters (RevIN, affine = false) is `instancenorm` at the
    input and, at the output, `parallel concat { identity; { from input; moments; rearrange(...) } }`
    then `destandardize`. The statistics are a tensor like any other, so they travel with `save`/
    `from`, `rearrange` and `parallel concat` to wherever the output lives (another layout, another
    axis), and no module keeps hidden state between calls. No parameters, no MACs."""

    axis: NonNeg = 0
    eps: NonNegFloat = 1e-5

    def infer(self, x: Shape) -> Shape:
        spatial_axis("moments", self.axis, x)
        spatial = tuple(1 if i == self.axis else s for i, s in enumerate(x.spatial))
        return x.with_(channels=2 * x.channels, spatial=spatial)

    def build(self, x, y):
        from ..layers.series import Moments as Module

        return Module(self.axis, self.eps)


@op("destandardize", category="series", layout="map")
class Destandardize(Op):
    """Undo a standardisation with statistics carried as channels: (C + 2, *S) -> (C, *S), with the
    last two input channels a mean m and a standard deviation s at every position (as `moments`
    gives them, rearranged onto the output's grid), broadcast over the first C channels:
    y = x[:C] * s + m. RevIN's de-normalisation of a forecast (see `moments`). No parameters, no
    MACs."""

    def infer(self, x: Shape) -> Shape:
        if x.layout != "map" or x.channels < 3:
            raise ShapeError(f"destandardize needs a map of C + 2 channels (values, mean, std), got {x}",
                             "append the statistics with `parallel concat { identity; { from ...; moments } }`")
        return x.with_(channels=x.channels - 2)

    def build(self, x, y):
        from ..layers.series import Destandardize as Module

        return Module()
