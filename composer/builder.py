"""Build plain PyTorch modules from a `plan.Plan`: the only pipeline stage that imports torch."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .chains import attend, fuse_attention
from .diagnostics import error
from .fuse import fuse_model
from .optimize import optimize_model
from .optimize_layout import LAYOUTS, use_layout
from .layers.blocked import on_blocked_path
from .head_edits import with_global_pool
from .memory import check_memory
from .layers.core import ChannelScale, Scale, tie_scope
from .layers.reparam import RepConv
from .build_steps import (classifier_out, classifier_steps, op_instructions, own_tensors, program_without,
                          reuse_targets)
from .plan import (ConvertStep, LoadStep, OpStep, ParallelStep, Plan, ResidualStep, ReuseStep, SaveStep, SeqStep,
                   Step)
from .size_guard import check_before_forward
from .sizes import check_input
from .timm_api import TimmApi
from .program import (GRID, Attend, Call, Forget, GridCall, Load, MapGrid, Parallel, Residual, Save, Shared, StaticGrid,
                      TensorCall, ToMap, ToTokens, TrainCall)

MAX_PARAMS = 20_000_000_000  # 80 GB of float32: refused before anything is allocated



def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class Sequence(nn.Module):
    """A section or composite instance: named submodules plus the program that wires them
    (residuals, parallel branches, layout conversions)."""

    def __init__(self, steps: list[Step], call: str = ""):
        super().__init__()
        self.call = call
        self.program = self._compile(steps)
        local = own_tensors(steps)
        if local:
            self.program.append(Forget(local))
        self._unmarked = list(self.program)
        self._inplace_activations()

    def _recompile(self) -> None:
        """The program marked again after a module was replaced (an identity that was compiled away
        may now be a layer: `reset_classifier` on a model built with 0 classes)."""
        self.program = list(self._unmarked)
        self._inplace_activations()

    def _compile(self, steps) -> list:
        prog = []
        for s in steps:
            cls = s.__class__
            if cls is OpStep:
                module = s.op.build(s.x, s.y)
                self._add(s, module)
                prog += op_instructions(s, module)
            elif cls is SeqStep:
                self._add(s, Sequence(s.body, s.call))
                prog.append(Call(s.name))
            elif cls is SaveStep:
                prog.append(Save(s.tensor))
            elif cls is LoadStep:
                prog.append(Load(s.tensor))
            elif cls is ReuseStep:  # the module itself is linked by ComposedModel, not registered here
                self.__dict__.setdefault("_shared", {})[s.target] = None
                last = s.reused[-1]
                if last.__class__ is OpStep and last.path == s.target:  # an op: its layout conversion
                    prog += self._compile(s.reused[:-1])
                prog.append(Shared(s.target))
            elif cls is ConvertStep:
                prog.append(ToTokens() if s.name == "to_tokens" else ToMap())
            elif cls is ResidualStep:
                prog.append(Residual(self._compile(s.body), self._compile(s.shortcut), s.drop_path))
            elif cls is ParallelStep:
                # channel axes from the layouts inference knows: tokens (B, N, C) keep channels last;
                # maps of any rank (a 1-D map is 3-D too) and vectors have them at 1
                axes = (1 if s.x.layout in ("map", "vector") else -1, 1 if s.y.layout in ("map", "vector") else -1)
                prog.append(Parallel(s.merge, [self._compile(b) for b in s.branches], s.split, axes))
            else:
                raise AssertionError(f"no instruction for {s!r}")
        return fuse_attention(prog, self._modules)  # an attention chain runs as one call

    # ops whose output is a tensor of their own (never their input, nor memory their input shares)
    # that autograd does not save for the backward pass (a conv, a norm, a linear, `x * scale` keep
    # their inputs, not their output; a RepConv returns a BN's output or a sum of them): the next
    # instruction may overwrite it, as torchvision's in-place ReLU after a batch norm and timm's
    # `x += shortcut` after a block's last norm do
    _FRESH = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear, nn.GroupNorm, nn.LayerNorm,
              ChannelScale, Scale, RepConv)
    _INPLACE = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Hardsigmoid)
    _MERGES = ("concat", "tokens", "add", "sub", "mul", "mean")  # of 2+ branches: a new tensor

    def _fresh(self, prog) -> bool:
        """Whether the last instruction of `prog` leaves a fresh, unsaved tensor (see `_FRESH`): such
        an op, a composite ending in one, a residual (its sum) or a merge of 2+ parallel branches.
        Never a `save`/`from`/`reuse`/layout conversion (a tensor kept, or a view)."""
        if prog and prog[-1].__class__ is Forget:
            prog = prog[:-1]
        if not prog:
            return False
        ins = prog[-1]
        cls = ins.__class__
        if cls is Call:
            mod = self._modules.get(ins.name)
            return mod._fresh(mod.program) if isinstance(mod, Sequence) else isinstance(mod, self._FRESH)
        if cls is Residual:
            return True
        return cls is Parallel and len(ins.branches) > 1 and ins.merge in self._MERGES

    def _inplace_activations(self) -> None:
        """In-place decisions, made once, in every program of this Sequence (residual bodies and
        shortcuts, parallel branches included):
        * an activation runs in place when the instruction before it, in the same program, left a
          fresh tensor (`_fresh`): never the first instruction (its input may be a residual's
          shortcut or shared by parallel branches), never after a `save` (that tensor is kept);
        * a residual adds its shortcut into its body's output (`body += short`, `add_into` True)
          when the body's last instruction left a fresh tensor; at run time only when shapes,
          dtypes and strides agree (a broadcasting gate, autocast's mixed dtypes, a channels-last
          body keep `short + body`, whose result could differ in dtype or memory layout);
        * a parallel instruction's split becomes a tuple of ints (for `Tensor.split_with_sizes`);
        * instructions that do nothing are compiled away: a call of an `nn.Identity` is dropped (the
          module stays registered), a dropout runs only in training mode (`TrainCall`: in eval mode
          it returns its input, so the call is skipped; its `p` is still read at run time)."""
        self.program = self._mark(self.program)

    def _mark(self, prog) -> list:
        out = []
        for ins in prog:
            cls = ins.__class__
            if cls is Residual:
                body = self._mark(ins.body)
                ins = Residual(body, self._mark(ins.shortcut), ins.drop_path, self._fresh(body))
            elif cls is Parallel:
                split = tuple(int(n) for n in ins.split) if ins.split else None  # for Tensor.split_with_sizes
                ins = ins._replace(branches=[self._mark(b) for b in ins.branches], split=split)
            elif cls is Call:
                mod = self._modules[ins.name]
                if type(mod) is nn.Identity:
                    continue
                if isinstance(mod, nn.modules.dropout._DropoutNd):
                    ins = TrainCall(ins.name)
                elif isinstance(mod, self._INPLACE) and self._fresh(out):
                    mod.inplace = True
            out.append(ins)
        return out

    def _add(self, step: Step, module) -> None:
        if hasattr(nn.Module, step.name):  # `as half`, `as to`: nn.Module's own attributes
            raise error("name", f"'{step.name}' cannot name a layer: it is a method of torch's nn.Module", step.span,
                        f"choose another name, e.g. '{step.name}_'")
        self.add_module(step.name, module)

    def _run(self, prog, x, env):
        mods = self._modules
        for ins in prog:
            cls = ins.__class__  # the forward hot path: dispatch on the instruction's class itself
            if cls is Call:
                mod = mods[ins.name]
                x = mod(x, env) if isinstance(mod, Sequence) else mod(x)
            elif cls is GridCall:
                mod, grid = mods[ins.name], env.get(GRID)
                x = mod(x, grid)
                if ins.regrid:
                    env[GRID] = mod.out_grid(grid)
            elif cls is TrainCall:
                if self.training:
                    x = mods[ins.name](x)
            elif cls is Save:
                env[ins.name] = x
                env[GRID + ins.name] = env.get(GRID)
            elif cls is TensorCall:
                mod = mods[ins.name]
                args = [env[k] for k in ins.keys]
                if ins.grids:
                    grids = (env.get(GRID), *[env.get(GRID + k) for k in ins.keys])
                    x = mod(x, *args, grids=grids)
                    if ins.regrid:
                        env[GRID] = mod.out_grid(grids)
                else:
                    x = mod(x, *args)
            elif cls is Attend:
                x = attend(self._modules, ins, x, env, self.training)
            elif cls is Forget:
                for k in ins.keys:
                    env.pop(k, None)
                    env.pop(GRID + k, None)
            elif cls is Shared:  # `reuse`: a module registered elsewhere in the model
                mod = self._shared[ins.name]
                if isinstance(mod, (Sequence, StageModule)):
                    x = mod(x, env)
                else:  # one op: given the grid of its input as where it is defined (a GridCall there)
                    x = mod(x, env.get(GRID)) if getattr(mod, "takes_grid", False) else mod(x)
            elif cls is Load:
                x = env[ins.name]
                env[GRID] = env.get(GRID + ins.name)
            elif cls is ToTokens:
                env[GRID] = x.shape[2:]
                x = x.flatten(2).transpose(1, 2)
            elif cls is ToMap:
                x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *env[GRID])
            elif cls is MapGrid:
                env[GRID] = x.shape[2:]
            elif cls is StaticGrid:
                env[GRID] = ins.grid
            elif cls is Residual:
                grid = env.get(GRID)
                short = self._run(ins.shortcut, x, env) if ins.shortcut else x
                if ins.shortcut:
                    env[GRID] = grid  # the body starts from the input's grid too
                body = self._run(ins.body, x, env)
                if ins.drop_path and self.training:
                    body = _drop_path(body, ins.drop_path, True)
                # `body += short`: the same sums as `short + body` (addition commutes), into the
                # body's fresh output when `_mark` found one (`add_into`; `program_without`'s copy, never),
                # if that gives the tensor `short + body` would: same shape, dtype and memory layout
                if ins.add_into and body is not x and body.dtype == short.dtype \
                        and body.shape == short.shape and body.stride() == short.stride():
                    body += short
                    x = body
                else:
                    x = short + body
            else:
                x = self._parallel(ins, x, env)
        return x

    def _parallel(self, ins: Parallel, x, env):
        merge, branches, split, (split_dim, cat_dim) = ins
        grid = env.get(GRID)  # every branch starts from the input's grid; after a merge the last
        outs = []  # branch's grid stays (`parallel tokens`: the last branch's grid is the grid)
        for b, xi in zip(branches, x.split_with_sizes(split, split_dim) if split else [x] * len(branches)):
            env[GRID] = grid
            outs.append(self._run(b, xi, env))
        if merge == "tokens":  # along the token axis of (B, N, C)
            return torch.cat(outs, dim=1)
        if merge == "concat":
            return torch.cat(outs, dim=cat_dim)
        y = outs[0]
        for o in outs[1:]:
            y = y + o if merge in ("add", "mean") else y * o if merge == "mul" else y - o
        return y / len(outs) if merge == "mean" else y

    def forward(self, x, env: dict | None = None):
        """`env` holds the named tensors (`save`/`from`) shared by the sections of one forward pass."""
        return self._run(self.program, x, {} if env is None else env)

    def extra_repr(self) -> str:
        return self.call


class StageModule(nn.Module):
    joined = None  # after optimize(layout="blocked"): its sections as one run (composer/optimize_layout.py)

    def __init__(self, stage):
        super().__init__()
        self.downsample_last = stage.downsample_last
        self.downsample = Sequence(stage.downsample.steps) if stage.downsample is not None else None
        self.blocks = nn.ModuleList(Sequence(b.steps, b.call) for b in stage.blocks)
        self.norm = Sequence(stage.norm.steps) if stage.norm is not None else None
        self.grad_checkpointing = False

    def sections(self) -> list:
        """Its Sequences in the order it runs them."""
        first, last = (self.downsample, None) if not self.downsample_last else (None, self.downsample)
        return [s for s in (first, *self.blocks, last, self.norm) if s is not None]

    def forward(self, x, env: dict | None = None, after_block=None, last_block: int | None = None):
        """The stage on `x`. For features (timm_api's forward_intermediates): `after_block(k, y)` is
        called with each block's output; `last_block`: stop before the block after it (the rest of
        the stage, its downsample after the blocks and its norm, not run)."""
        if self.joined is not None and after_block is None and on_blocked_path(x):
            return self.joined(x)
        env = {} if env is None else env
        if self.downsample is not None and not self.downsample_last:
            x = self.downsample(x, env)
        for k, block in enumerate(self.blocks):
            if last_block is not None and k > last_block:
                return x
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, env, use_reentrant=False)
            else:
                x = block(x, env)
            if after_block is not None:
                after_block(k, x)
        if self.downsample is not None and self.downsample_last:
            x = self.downsample(x, env)
        if self.norm is not None:
            x = self.norm(x, env)
        return x


class ComposedModel(TimmApi, nn.Module):
    """A model built from a blueprint, with timm's backbone API (composer/timm_api.py)."""

    inference_only = False  # True after `optimize()`
    layout = "channels_first"  # of its maps: `optimize(layout=...)`
    joined = None  # after optimize(layout="blocked"): stem and stages as one run

    def __init__(self, plan: Plan, features_only: bool = False, out_indices=None, dynamic_img_size: bool = False):
        super().__init__()
        self.plan = plan
        self.dynamic_img_size = dynamic_img_size
        self._input = (plan.input.channels, *plan.input.spatial)  # the size built for: no check needed
        self._admitted: set = set()  # other input sizes found admissible (composer.sizes)
        self.stem = Sequence(plan.stem.steps)
        self.stages = nn.ModuleList(StageModule(s) for s in plan.stages)
        self.features_only = features_only
        self.init_feature_points(plan, out_indices)  # timm_api: feature_info, out_indices
        head_steps = plan.head.steps
        self.num_classes = classifier_out(head_steps)
        self.num_features = plan.head.x.channels
        if not features_only or any(t.startswith("head.") for t in reuse_targets(plan)):
            self.head = Sequence(head_steps)
        self._link_shared()
        self.register_forward_pre_hook(check_before_forward)  # the size check also under torch.compile

    def _link_shared(self) -> None:
        """Point every `reuse` at its module. The reference is a plain attribute, so the weights
        are stored once in the state_dict (under the path that defines them) and moved with it."""
        for m in self.modules():
            shared = m.__dict__.get("_shared") if isinstance(m, Sequence) else None
            for path in shared or ():
                shared[path] = target = self.get_submodule(path)
                if isinstance(target, Sequence._INPLACE):  # in place where defined; elsewhere its
                    target.inplace = False  # input may be a kept tensor (a `save`, a shortcut)

    def check_input(self, x) -> None:
        """Refuse, before anything runs, an input whose size the architecture does not admit
        (`composer.sizes.InputSizeError`, naming the model, the size and the admitted sizes). A size
        is checked once (pure-Python shape inference), then remembered. Traced by torch's compiler
        it is skipped; `model(x)` checks first in a hook that compiling leaves as Python
        (composer/size_guard.py)."""
        size = tuple(x.shape[1:])
        if not all(type(d) is int for d in size) or torch.compiler.is_compiling():
            return  # traced with symbolic sizes (torch.export's dynamic shapes): no concrete size
        if size == self._input or size in self._admitted:
            return
        check_input(self.plan, size[1:], size[0], self.dynamic_img_size)
        self._admitted.add(size)

    def forward_features(self, x, env: dict | None = None):
        if env is None:
            self.check_input(x)
            env = {"input": x}
        if self.joined is not None and on_blocked_path(x):
            return self.joined(x)
        x = self.stem(x, env)
        for stage in self.stages:
            x = stage(x, env)
        return x

    def forward_head(self, x, pre_logits: bool = False, env: dict | None = None):
        env = {} if env is None else env
        if not pre_logits:
            return self.head(x, env)
        names = {s.name for s in classifier_steps(self.plan.head.steps)}
        return self.head._run(program_without(self.head.program, names), x, env)

    def forward(self, x):
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        self.check_input(x)
        env = {"input": x}
        return self.forward_head(self.forward_features(x, env), env=env)

    def get_classifier(self):
        """The classifier module (a tuple when the head has several, as DeiT's distilled head)."""
        mods = tuple(getattr(self.head, s.name) for s in classifier_steps(self.plan.head.steps))
        return mods[0] if len(mods) == 1 else mods

    def fuse(self) -> "ComposedModel":
        """Switch to the inference form in place: eval mode, every re-parameterizable op fused into
        one conv (`composer.fuse.fuse_model`). Returns the model."""
        self.eval()
        fuse_model(self)
        self._link_shared()
        return self

    def optimize(self, layout: str | None = None, example=None, channels_last: bool = False) -> "ComposedModel":
        """The inference form, in place (composer/optimize.py: the same eval-mode logits, other
        state_dict keys, `train()` refused), its maps in `layout` (composer/optimize_layout.py:
        channels_first, channels_last, blocked, or fastest: whichever runs `example` fastest; None:
        the one it is in). `channels_last=True` is the old spelling of layout="channels_last"."""
        if channels_last:
            warnings.warn('optimize(channels_last=True) is now optimize(layout="channels_last")',
                          DeprecationWarning, stacklevel=2)
            if layout not in (None, "channels_last"):
                raise error("value", f"optimize(channels_last=True, layout='{layout}'): two layouts", None,
                            "give layout alone")
            layout = "channels_last"
        if layout is not None and layout not in LAYOUTS:
            raise error("value", f"unknown layout '{layout}'", None, f"one of: {', '.join(LAYOUTS)}")
        if not self.inference_only:
            optimize_model(self)
            self._link_shared()
            self.inference_only = True
        if layout is not None:
            sections = (self.stem, [(stage, stage.sections()) for stage in self.stages])
            self.layout = use_layout(self, layout, sections, example)
        return self

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """timm's (composer/timm_api.py); an optimised model's layout is made again for what is left
        (the blocked runs held the stages pruned)."""
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if self.layout == "blocked":
            self.optimize(layout="blocked")
        return take

    def train(self, mode: bool = True) -> "ComposedModel":
        if mode and self.inference_only:
            raise error("usage", f"{self.plan.name} was optimized for inference: it cannot be trained", None,
                        "train a model built without optimize=True, then call model.optimize()")
        return super().train(mode)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's: new classifiers for `num_classes`; `global_pool` (avg, max, token) also sets the
        pooling mode of the head's `global_pool` ops (None: as they are)."""
        if self.inference_only:
            raise error("usage", "reset_classifier on an optimized model", None, "reset first, then optimize()")
        if not hasattr(self, "head"):
            raise error("value", "this model has no head to reset (it was built with features_only)")
        if global_pool is not None:
            self.plan = with_global_pool(self.plan, global_pool)
            for step in (t for s in self.plan.head.steps for t in s.walk()):
                if step.__class__ is OpStep and step.op.name == "global_pool":
                    parent, _, name = step.path.rpartition(".")
                    setattr(self.get_submodule(parent), name, step.op.build(step.x, step.y))
        steps = list(classifier_steps(self.plan.head.steps))
        if not steps:
            raise error("value", "this model's head has no classifier op to reset")
        device = next((p.device for p in self.parameters()), None)
        for step in steps:
            new = step.op.model_copy(update={"num_classes": num_classes})
            module = new.build(step.x, new.infer(step.x))
            setattr(self.head, step.name, module.to(device) if device is not None else module)
        self.head._recompile()
        self.num_classes = num_classes
        cfg = self.__dict__.get("_timm_cfg")  # timm's pretrained_cfg, once read, follows
        if cfg is not None:
            cfg["num_classes"] = num_classes
        self._link_shared()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable


def shared_module(seq: Sequence, path: str):
    """The module a `reuse` instruction of `seq` runs (ComposedModel links it at build time)."""
    return seq._shared[path]


def build_module(plan: Plan, *, seed: int | None = 0, device=None, features_only=False, out_indices=None,
                 dynamic_img_size: bool = False, max_memory=None):
    """Instantiate `plan` as a `ComposedModel`, deterministically when `seed` is given.
    `dynamic_img_size`: absolute position embeddings are resampled to the grid the model gets at
    run time (timm's option of that name); without it other input sizes that change their grid
    are refused. `max_memory` (bytes or a size such as "8G"; None: a fraction of the available
    memory): a model whose parameters, buffers and largest activation at batch 1 would take more
    is refused before anything is allocated (composer.memory)."""
    if plan.params > MAX_PARAMS and str(device) != "meta":
        raise error("too-large", f"the model has {plan.params:,} parameters; refusing to allocate more than "
                    f"{MAX_PARAMS:,}", plan.span, "use `composer info`, which allocates nothing")
    if str(device) != "meta":
        check_memory(plan, max_memory)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device) if device is not None else _null(), tie_scope():
            model = ComposedModel(plan, features_only=features_only, out_indices=out_indices,
                                  dynamic_img_size=dynamic_img_size)
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
