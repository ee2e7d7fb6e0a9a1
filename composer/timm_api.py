"""timm's model API on a built model (`builder.ComposedModel` inherits `TimmApi`): the feature
points and `feature_info` (a list of dicts with timm's `FeatureInfo` accessors),
`forward_intermediates` and `prune_intermediate_layers` with timm's signatures, `group_matcher`
(stem, every block, head: what timm's layer decay groups by), `no_weight_decay` (position tables,
learned tokens, relative position bias tables), and `pretrained_cfg` / `default_cfg` (input size and
preprocessing, first conv, classifier). Nothing here imports timm: `composer.timm` registers the zoo
in timm's registry; these methods are what timm's functions (and smp, mmdet, HF's wrapper) call."""

from __future__ import annotations

from copy import deepcopy

from .diagnostics import error
from .plan import OpStep, Plan
from .program import GRID

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's PretrainedCfg defaults: a model without weights
IMAGENET_STD = (0.229, 0.224, 0.225)  # has no preprocessing of its own
NORMS = ("layernorm", "batchnorm", "groupnorm", "rmsnorm")
# parameters that timm's models keep out of weight decay: absolute position tables, learned tokens,
# relative position bias tables (by module class: every parameter of it; by name: in any module)
NO_DECAY_MODULES = ("PrefixTokens", "PosEmbed", "WindowTokens", "ShuffleWindowTokens", "LearnedTokens",
                    "RelativePositionBias", "AxisRelativeLogits", "LevelEmbed")
NO_DECAY_NAMES = ("relative_position_bias_table", "relative_position_bias_table_to_neighbors",
                  "relative_position_bias_table_to_windows", "rpe_table", "relative_pos_bias_local", "relative_pos",
                  "attention_biases", "an_bias", "na_bias", "ah_bias", "ha_bias", "aw_bias", "wa_bias",
                  "kv_tokens", "learnable_tokens", "pos_bias_u", "pos_bias_v")
MATCH_PREV = 99999  # timm's MATCH_PREV_GROUP: joins the group before it


class FeatureInfo(list):
    """The feature points a model returns: a list of dicts (`num_chs`, `reduction`, `module`) of the
    selected points (`out_indices`), as before, with timm's `FeatureInfo` accessors: `channels()`,
    `reduction()`, `module_name()` of the selected points, or of the points `idx` (an int or a list,
    indexing every point, as timm's `idx` does); `get(key, idx)`, `get_dicts(keys, idx)`,
    `from_other(out_indices)`. `.info` holds every point, `.out_indices` the selection."""

    def __init__(self, info: list, out_indices):
        self.info = info
        self.out_indices = tuple(out_indices)
        super().__init__(info[i] for i in self.out_indices)

    def get(self, key: str, idx=None):
        if idx is None:
            return [d[key] for d in self]
        if isinstance(idx, (list, tuple)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys=None, idx=None):
        picked = list(self) if idx is None else [self.info[i] for i in idx] if isinstance(idx, (list, tuple)) \
            else self.info[idx]
        if isinstance(picked, dict):
            return picked if keys is None else {k: picked[k] for k in keys}
        return picked if keys is None else [{k: d[k] for k in keys} for d in picked]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def from_other(self, out_indices) -> "FeatureInfo":
        return FeatureInfo(deepcopy(self.info), _as_indices(out_indices, len(self.info)))


def _as_indices(indices, n: int) -> tuple:
    """timm's index forms: None (every point), an int (the last n), or a list (negative from the end);
    a ComposerError for an index the model does not have."""
    if indices is None:
        indices = n
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= n:
            raise error("value", f"the last {indices} feature points asked for: the model has {n}")
        return tuple(range(n - indices, n))
    out = []
    for i in indices:
        j = n + i if isinstance(i, int) and i < 0 else i
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= j < n:
            raise error("value", f"feature index {i!r} is out of range: the model has {n} feature points",
                        None, f"indices from 0 to {n - 1}, or from -{n} to -1 counting from the end" if n else None)
        out.append(j)
    return tuple(out)


class TimmApi:
    """The mixin: timm's backbone API on top of `ComposedModel`'s stem, stages and head."""

    def init_feature_points(self, plan: Plan, out_indices) -> None:
        """Every feature point (each stage's output, each block's with `features = "blocks"`, or the
        model's named `outputs`), the selected ones (`out_indices`) and their `feature_info`."""
        self.named_outputs = list(plan.outputs or [])
        if self.named_outputs:
            shapes = [plan.saved[n] for n in self.named_outputs]
            self.feature_points = [(None, None, y) for y in shapes]
            modules = list(self.named_outputs)
            reductions = _reductions(plan, shapes, chain=False)
        else:
            by_blocks = plan.features == "blocks"
            self.feature_points = [(s.index, k, b.y) for s in plan.stages for k, b in enumerate(s.blocks)] \
                if by_blocks else [(s.index, None, s.y) for s in plan.stages]
            modules = [f"stages.{i}" + (f".blocks.{k}" if k is not None else "") for i, k, _ in self.feature_points]
            reductions = _reductions(plan, [y for _, _, y in self.feature_points])
        n = len(self.feature_points)
        self.out_indices = _as_indices(out_indices, n) if n else ()
        info = [{"num_chs": y.channels, "reduction": r, "module": m}
                for (_, _, y), r, m in zip(self.feature_points, reductions, modules)]
        self.feature_info = FeatureInfo(info, self.out_indices)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's signature: the features at `indices` (None: every feature point; an int: the last
        n; a list, negative from the end) as maps (`NCHW`, tokens without their class tokens) or
        tokens (`NLC`); `norm`: the head's leading norm applied to the features of the head's input
        shape (a ViT's blocks, a last stage); `stop_early`: stop after the last feature wanted.
        Returns the list (`intermediates_only`) or `(final features, list)`."""
        if output_fmt not in ("NCHW", "NLC"):
            raise error("value", f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = _as_indices(indices, len(self.feature_points))
        self.check_input(x)
        env = {"input": x}
        x = self.stem(x, env)
        feats = {}
        if self.named_outputs:
            for stage in self.stages:
                x = stage(x, env)
            for j in take:
                feats[j] = (env[self.named_outputs[j]], env.get(GRID + self.named_outputs[j]))
        else:
            at = {}  # (stage, block) -> (tensor, grid): an index asked for twice is kept once
            x = self._run_to_points(x, env, take, at, stop_early)
            feats = {j: at[self.feature_points[j][:2]] for j in take}
        norms = self._head_norms() if norm else []
        out = []
        for j in take:
            t, grid = feats[j]
            y = self.feature_points[j][2]
            if norms and y == self.plan.head.x:
                for mod in norms:
                    t = mod(t)
            out.append(_formatted(t, grid or y.spatial, y, output_fmt))
        return out if intermediates_only else (x, out)

    def _run_to_points(self, x, env, take, feats, stop_early):
        """Run the stages, keeping (tensor, grid) of each wanted (stage, block) point in `feats`."""
        wanted = {self.feature_points[j][:2] for j in take}
        last_stage = max((self.feature_points[j][0] for j in take), default=-1)
        for i, stage in enumerate(self.stages):
            if stop_early and i > last_stage:
                break
            blocks = [k for (s, k) in wanted if s == i and k is not None]
            if blocks:  # block features: each block's output as it comes

                def keep(k, y, i=i):
                    if (i, k) in wanted:
                        feats[i, k] = (y, env.get(GRID))

                x = stage(x, env, keep, max(blocks) if stop_early and i == last_stage else None)
            else:
                x = stage(x, env)
            if (i, None) in wanted:
                feats[i, None] = (x, env.get(GRID))
        return x

    def _head_norms(self) -> list:
        """The head's leading norm modules (a ViT's final layernorm, before pooling)."""
        head = self._modules.get("head")
        out = []
        for s in self.plan.head.steps:
            if s.__class__ is not OpStep or s.op.name not in NORMS or head is None or s.name not in head._modules:
                break
            out.append(head._modules[s.name])
        return out

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """timm's: drop the stages (and blocks) after the last feature point in `indices`, and the
        head (`prune_head`: `forward` then gives the features; `prune_norm` alone keeps the head,
        whose norm is part of it). Returns the absolute indices."""
        take = _as_indices(indices, len(self.feature_points))
        if not self.named_outputs:
            last = max(take)
            i, k, _ = self.feature_points[last]
            del self.stages[i + 1:]
            if k is not None:
                del self.stages[i].blocks[k + 1:]
            # the points after the last one kept are gone with their layers
            del self.feature_points[last + 1:]
            self.out_indices = tuple(j for j in self.out_indices if j <= last)
            self.feature_info = FeatureInfo(self.feature_info.info[:last + 1], self.out_indices)
        if prune_head:
            self.head = type(self.stem)([])  # an empty program: the identity
            self.num_classes = 0
        return list(take)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups: the stem, then a group per block (a stage's downsample joins
        its first block, or its last when it comes after them; a stage's norm its last block), the
        head last (unmatched: timm's largest ordinal). `coarse`: a group per stage."""
        if coarse:
            return {"stem": r"^stem\.", "blocks": r"^stages\.(\d+)\."}
        blocks = [(r"^stages\.(\d+)\.blocks\.(\d+)\.", None), (r"^stages\.(\d+)\.norm\.", (MATCH_PREV,))]
        blocks += [(rf"^stages\.({i})\.downsample\.", (MATCH_PREV,) if st.downsample_last else (0,))
                   for i, st in enumerate(self.stages) if st.downsample is not None]
        return {"stem": r"^stem\.", "blocks": blocks}

    def no_weight_decay(self) -> set:
        """The parameters timm's recipes keep out of weight decay: position tables, learned tokens,
        relative position bias tables (full names, as timm's `no_weight_decay` gives them)."""
        out = set()
        for path, mod in self.named_modules():
            whole = type(mod).__name__ in NO_DECAY_MODULES
            for name, _ in mod.named_parameters(recurse=False):
                if whole or name in NO_DECAY_NAMES:
                    out.add(f"{path}.{name}" if path else name)
        return out

    @property
    def pretrained_cfg(self) -> dict:
        """timm's `pretrained_cfg`: the input size the model was built for, its preprocessing (the
        blueprint's input_mean, input_std, crop_pct, interpolation; timm's defaults for those it
        does not give: ImageNet mean and std, crop 0.875, bicubic), `num_classes`, `first_conv`, `classifier`, the paper."""
        cfg = self.__dict__.get("_timm_cfg")
        if cfg is None:
            cfg = self.__dict__["_timm_cfg"] = self.composed_cfg()
        return cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, value) -> None:
        self.__dict__["_timm_cfg"] = dict(value) if value is not None else None

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value) -> None:
        self.pretrained_cfg = value

    def composed_cfg(self) -> dict:
        plan = self.plan
        c = plan.input.channels
        given = plan.preprocess  # the blueprint's input_mean, input_std, crop_pct, interpolation
        mean, std = (_per_channel(given.get("mean", IMAGENET_MEAN), c), _per_channel(given.get("std", IMAGENET_STD), c))
        classifiers = [s.path for s in plan.head.steps for s in s.walk() if s.__class__ is OpStep and s.op.classifier]
        first_conv = next((p for p, m in self.named_modules() if type(m).__name__ in ("Conv1d", "Conv2d", "Conv3d")),
                          None)
        return {"architecture": plan.name, "input_size": (c, *plan.input.spatial), "interpolation": given.get("interpolation", "bicubic"),
                "crop_pct": given.get("crop_pct", 0.875), "crop_mode": "center", "mean": mean, "std": std,
                "num_classes": self.num_classes, "first_conv": first_conv,
                "classifier": classifiers[0] if len(classifiers) == 1 else tuple(classifiers) or None,
                "paper_name": plan.paper, "description": plan.doc or None, "license": None}


def _per_channel(values: tuple, channels: int) -> tuple:
    """Per-channel values for `channels` input channels: as given when they match, else their mean
    for every channel (a model built with another `in_chans`)."""
    values = tuple(values)
    return values if len(values) == channels else (round(sum(values) / len(values), 4),) * channels


def _formatted(t, grid, y, fmt: str):
    """A feature as a map (B, C, *grid) or as tokens (B, N, C), class tokens left out."""
    if y.layout == "tokens":
        if fmt == "NCHW" and not grid:  # a plain sequence: as it is
            return t
        t = t[:, y.extra:] if y.extra else t
        return t if fmt == "NLC" else t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)
    if fmt == "NLC" and t.ndim > 2:
        return t.flatten(2).transpose(1, 2)
    return t


def _reductions(plan: Plan, shapes, chain: bool = True) -> list[int]:
    """The cumulative stride of each feature, as timm reports it. Stage outputs (`chain`): from the
    largest grid to the smallest, each grid's reduction is the previous one times the rounded ratio
    of the two grids, so a grid rounded up by padding (224 -> 14 -> 7 -> 4) still reports its
    stride (16, 32, 64), not 224 / 4. Named outputs may come from parallel streams, so each is the
    rounded ratio of input to grid. Vectors have none (0)."""
    if not chain:
        return [round(plan.input.spatial[0] / y.spatial[0]) if y.spatial else 0 for y in shapes]
    out = {}
    prev, red = plan.input.spatial[0] if plan.input.spatial else 0, 1
    for j in sorted(range(len(shapes)), key=lambda j: -shapes[j].spatial[0] if shapes[j].spatial else 0):
        g = shapes[j].spatial[0] if shapes[j].spatial else 0
        if g:
            red, prev = red * max(1, round(prev / g)), g
        out[j] = red if g else 0
    return [out[j] for j in range(len(shapes))]
