"""Activations and dropout: parameter-free (but StarReLU), shape-preserving, any layout."""


from .registry import Op, Probability, op


def _simple(name: str, torch_name: str, doc: str) -> None:
    def build(self, x, y):
        from torch import nn

        from ..layers import core as modules

        return getattr(nn, torch_name, None)() if hasattr(nn, torch_name) else getattr(modules, torch_name)()

    cls = type(name.title().replace("_", ""), (Op,), {"__doc__": doc, "build": build, "__module__": __name__})
    globals()[cls.__name__] = op(name, category="activation")(cls)  # found by its name: pickle (torch.save)


for _name, _torch, _doc in [
    ("relu", "ReLU", "max(x, 0)."),
    ("relu6", "ReLU6", "min(max(x, 0), 6)."),
    ("gelu", "GELU", "Gaussian error linear unit (exact erf form)."),
    ("quick_gelu", "QuickGELU", "x * sigmoid(1.702 x): the sigmoid approximation of GELU (CLIP, CvT)."),
    ("silu", "SiLU", "x * sigmoid(x), also called swish."),
    ("squared_relu", "SquaredReLU", "relu(x) ** 2."),
    ("hardswish", "Hardswish", "x * relu6(x + 3) / 6."),
    ("sigmoid", "Sigmoid", "1 / (1 + exp(-x))."),
    ("tanh", "Tanh", "Hyperbolic tangent."),
    ("identity", "Identity", "Passes its input through unchanged."),
]:
    _simple(_name, _torch, _doc)


@op("gelu_tanh", category="activation")
class GeluTanh(Op):
    """GELU with the tanh approximation."""

    def build(self, x, y):
        from torch import nn

        return nn.GELU(approximate="tanh")


@op("star_relu", category="activation")
class StarReLU(Op):
    """s * relu(x)**2 + b with learned scalars s and b (MetaFormer baselines)."""

    scale: float = 1.0
    bias: float = 0.0
    learnable: bool = True

    def params(self, x, y):
        return 2 if self.learnable else 0

    def build(self, x, y):
        from ..layers.core import StarReLU as Module

        return Module(self.scale, self.bias, self.learnable)


@op("scale", category="activation")
class Scale(Op):
    """Multiply by a constant `value` (no parameters): a fixed score scale such as head_dim^-0.5
    applied outside an attention op (CloFormer's context branch)."""

    value: float

    def build(self, x, y):
        from ..layers.core import Scale as Module

        return Module(self.value)


@op("dropout", category="activation")
class Dropout(Op):
    """Dropout with probability `p` (training only)."""

    p: Probability = 0.0

    def build(self, x, y):
        from torch import nn

        return nn.Dropout(self.p)
