"""The memory layout of an optimised model's maps (`model.optimize(layout=...)`,
composer/builder.py; the folds themselves are composer/optimize.py's):

* `channels_first`: as built;
* `channels_last`: conv weights, and so the maps they make, channels-last (`torch.channels_last`);
* `blocked`: whole stages on oneDNN's blocked layout. A stage made only of what that layout
  carries (2-d convs with zero padding; ReLU, GELU, sigmoid, tanh; max and average pools;
  eval-mode batch norms; residual and parallel sums of these; composites made only of these: a
  ResNet's or a RepVGG's) runs as one `layers.blocked.BlockedRun`, converted in and out once,
  not around every conv; a model whose stem and stages all are, its features as one run. Runs
  inside a block, converted around each block, measured slower than no run (docs/benchmarks.md),
  so there are none;
* `fastest`: whichever of these runs an example input fastest, measured here.

Read on the programs, as optimize.py reads them: it never imports the builder. The builder gives
the model's sections in their order (`sections`: the stem, then (stage, its Sequences) per stage).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .layers.blocked import CONV, MODULE, RESIDUAL, SUM, BlockedRun, on_blocked_path
from .layers.conv import PointwiseConv2d
from .program import Call, Parallel, Residual, program_of

LAYOUTS = ("channels_first", "channels_last", "blocked", "fastest")
_CARRIED = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Identity)  # modules whose kernels take a blocked map as they are


def use_layout(model: nn.Module, layout: str, sections: tuple, example=None) -> str:
    """Put the optimised `model` in `layout` (one of LAYOUTS), from whichever it was in; returns
    the layout it is in (for `fastest`, the one measured fastest on `example`, a batch of 1 at
    the size the model was built for by default)."""
    _unblock(model)
    model.to(memory_format=torch.contiguous_format)
    if layout == "fastest":
        return _fastest(model, sections, example)
    if layout == "channels_last":
        model.to(memory_format=torch.channels_last)
    elif layout == "blocked" and not blocked_runs(model, *sections):
        return "channels_first"  # no stage the blocked layout carries: the model is as it was
    return layout


@torch.no_grad()
def _fastest(model, sections, example) -> str:
    if example is None:
        p, shape = next(model.parameters(), None), model.plan.input
        example = torch.randn(1, shape.channels, *shape.spatial, device=p.device if p is not None else None,
                              dtype=p.dtype if p is not None else None)
    wait = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    times = {}
    for layout in LAYOUTS[:-1]:
        if layout == "blocked" and not on_blocked_path(example):
            continue  # the blocked runs would not be taken: the model would run channels-first
        if use_layout(model, layout, sections) != layout:
            continue  # blocked, where no stage is: the same model as channels_first
        model(example)  # the first call packs weights and warms caches
        best = float("inf")
        for _ in range(3):
            wait()
            start = time.perf_counter()
            model(example)
            wait()
            best = min(best, time.perf_counter() - start)
        times[layout] = best
    return use_layout(model, min(times, key=times.get), sections)


# ----------------------------------------------------------------------------- the blocked runs
def blocked_runs(model: nn.Module, stem, stages: list) -> int:
    """A stage whose sections (`stages`: (stage, its Sequences in the order it runs them) each)
    the blocked layout carries whole gets one run of them all (`stage.joined`, which its forward
    runs instead: one conversion in and one out per stage), and a model whose stem and stages all
    are, one run for its features (`model.joined`). Nothing else changes: the sections' own
    programs (which a block's features run) stay as they are. Returns how many stages run so."""
    runs, packed = [], {}
    for stage, seqs in stages:
        stage.__dict__["joined"] = run = _run(seqs, packed)
        runs.append(run)
    stem_run = _run([stem], packed)
    whole = stem_run is not None and all(r is not None for r in runs)
    model.__dict__["joined"] = BlockedRun(stem_run.steps + sum((r.steps for r in runs), ()), packed) if whole else None
    return sum(r is not None for r in runs)


def _unblock(model) -> None:
    for m in model.modules():
        m.__dict__.pop("joined", None)


def _run(seqs: list, packed: dict):
    """One run of the Sequences `seqs` one after the other, or None where a step is not carried or
    no conv is (then the conversions cost more than they save)."""
    steps = ()
    for seq in seqs:
        more = _steps(seq, seq.program)
        if more is None:
            return None
        steps += more
    return BlockedRun(steps, packed) if sum(_convs(s) for s in steps) else None


# ----------------------------------------------------------------------------- what a run carries
def _step(seq, ins):
    """The run's step for instruction `ins` of `seq`'s program, or None where the blocked layout
    cannot carry it."""
    cls = ins.__class__
    if cls is Call:
        return _module_step(seq._modules[ins.name])
    if cls is Residual and not ins.drop_path:
        body, short = _steps(seq, ins.body), _steps(seq, ins.shortcut)
        return None if body is None or short is None else (RESIDUAL, body, short)
    if cls is Parallel and ins.merge == "add" and not ins.split:
        branches = [_steps(seq, b) for b in ins.branches]
        return None if any(b is None for b in branches) else (SUM, branches)
    return None


def _steps(seq, prog: list):
    steps = tuple(_step(seq, ins) for ins in prog)
    return None if any(s is None for s in steps) else steps


def _module_step(m):
    cls = type(m)
    if cls in (nn.Conv2d, PointwiseConv2d):
        return (CONV, m) if m.padding_mode == "zeros" and not isinstance(m.padding, str) else None
    prog = program_of(m)
    if prog is not None:  # a composite: carried whole or not at all
        steps = _steps(m, prog)
        return None if steps is None else (SUM, [steps])  # a sum of one branch: the branch
    return (MODULE, m) if _carried(m) else None


def _carried(m) -> bool:
    cls = type(m)
    if cls in _CARRIED:
        return True
    if cls is nn.GELU:
        return m.approximate == "none"  # oneDNN's GELU is the erf one only
    if cls is nn.MaxPool2d:
        return not m.return_indices and all(d == 1 for d in _pair(m.dilation))
    if cls is nn.AvgPool2d:  # oneDNN counts the padding differently in a window the ceil mode adds
        return m.divisor_override is None and not (m.ceil_mode and m.count_include_pad)
    if cls is nn.AdaptiveAvgPool2d:
        return all(s == 1 for s in _pair(m.output_size))
    if cls is nn.BatchNorm2d:
        return not m.training and m.affine and m.track_running_stats
    return False


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _convs(step) -> int:
    kind = step[0]
    if kind == CONV:
        return 1
    if kind == RESIDUAL:
        return sum(_convs(s) for s in step[1] + step[2])
    if kind == SUM:
        return sum(_convs(s) for b in step[1] for s in b)
    return 0

