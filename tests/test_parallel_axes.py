"""`parallel concat(split = ...)` splits and joins along the channel axis in every layout: a 1-D map
(B, C, L) is 3-D like a token sequence (B, N, C), so the axis must come from the layout, not the rank."""

import torch

import composer
from helpers import write


def test_one_d_map_split_and_concat_use_channels(tmp_path):
    path = write(tmp_path, """
model m {
    input signal(8, 32)
    stem { parallel concat(split = [4, 4]) { conv(6, 3) as a; conv(2, 5) as b } }
}
""")
    model = composer.build(path).eval()
    a, b = (m for n, m in model.named_modules() if n.split(".")[-1] in ("a", "b"))
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        expected = torch.cat([a(x[:, :4]), b(x[:, 4:])], dim=1)  # channels are axis 1 of (B, C, L)
        assert model.forward_features(x).shape == (2, 8, 32)
        assert torch.allclose(model.forward_features(x), expected)


def test_tokens_in_maps_out_concat_on_channels(tmp_path):
    path = write(tmp_path, """
model m {
    input image(8, 8)
    stem { to_tokens; parallel concat(split = [4, 4]) { to_map; { to_map; conv(4, 3) as c } } }
}
""")
    model = composer.build(path).eval()
    conv = next(m for n, m in model.named_modules() if n.endswith(".c"))
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        tokens = x.flatten(2).transpose(1, 2)  # (B, 64, 8): the split is on the last axis
        left = tokens[..., :4].transpose(1, 2).reshape(2, 4, 8, 8)
        right = conv(tokens[..., 4:].transpose(1, 2).reshape(2, 4, 8, 8))
        assert torch.allclose(model.forward_features(x), torch.cat([left, right], dim=1))
