"""torch.compile (issue 18, item 4): built models trace into one graph, with no graph break.

`torch._dynamo.explain` runs dynamo alone (no backend compiles anything) on a sample of zoo
models made small through their own blueprint parameters (img_size 64, one block per stage), in
eval mode at batch 1. Tracing costs about 10 ms of CPU per module, so the sample is chosen to
cover every instruction of the builder's interpreter (composer/program.py, checked below), every
merge of parallel branches and the layers whose forward has logic of its own (windows and their
masks and tables, cached grids, token selection, clustering, deformable sampling, the time-series
ops) for about 15 s of CPU. COMPOSER_ALL_COMPILE=1 adds the models that complete the coverage of
every composer layer class in the zoo (rotary and Fourier positions, cached position scores, ...;
about 70 s in all).
`python benchmarks/compile_check.py` traces every zoo model (its figures: docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch._dynamo

import composer
from composer import program
from composer.builder import Sequence
from composer.program import Parallel, Residual

ONE = [1, 1, 1, 1]
# model -> blueprint arguments that make it small; the comment: what it adds to the coverage
SAMPLE = {
    "cf_vit_deit_s": {"depth": 1},  # most instructions; top-k token selection, early exit, resize
    "beit_b": {"img_size": 64, "depth": 1},  # Attend (the SDPA chain), TrainCall, relative bias
    "glnet_4g": {"img_size": 64, "depths": ONE},  # MapGrid, soft clustering, conv positions
    "swinv2_cr_tiny": {"img_size": 64, "depths": ONE},  # windows, shifted mask, MLP position bias
    "mvitv2_base": {"img_size": 64, "depths": ONE},  # pooled heads, axis relative logits
    "pathformer_etth1": {"patches": [[16, 12, 8, 32]]},  # series ops, routing, indexed linear
    "conformer_speech_l": {"img_size": 64, "depth": 1},  # 1-D maps, GLU, rearrange
    "deit_s_distilled": {"img_size": 64, "depth": 1},  # merge mean
    "smt_b": {"img_size": 64, "depths": ONE},  # merge mul, channel shuffle
    "poolformer_s12": {"img_size": 64, "depths": ONE},  # merge sub
}
# with SAMPLE: every composer layer class found in the zoo's models at these small settings (a greedy
# cover by module count, computed when this test was written)
REST = {
    "rope_vit_b": {"img_size": 64, "depth": 1},  # rotary positions
    "xcit_nano_12_p16": {"img_size": 64, "depth": 1},  # Fourier features (cached per grid)
    "convit_ti": {"img_size": 64, "depth": 2, "local": 1},  # position scores (cached), blend
    "msg_transformer_s": {"depths": ONE},
    "caformer_s18": {"img_size": 64, "depths": ONE},
    "unireplknet_a": {"img_size": 64, "depths": ONE},
    "mixer_b16": {"img_size": 64, "depth": 1},
    "t2t_vit_14": {"img_size": 64, "depth": 1},
    "vit_adapter_s": {"img_size": 64, "interactions": ONE, "extra_extractors": 0},
    "focal_b": {"depths": ONE},
    "litv2_b": {"img_size": 64, "depths": ONE},
    "cait_xxs24": {"img_size": 64, "depth": 1},
    "cvt_13": {"img_size": 64, "depths": [1, 1, 1]},
    "maxvit_t": {"img_size": 64, "depths": ONE},
    "halonet26t": {},
    "repnext_m0": {"img_size": 64, "depths": ONE},
    "efficientvit_m1": {"img_size": 64, "depths": [1, 1, 1]},
    "mobilevitv2_050": {"img_size": 64},
    "mobile_former_52m": {"img_size": 64},
}
MODELS = {**SAMPLE, **(REST if os.environ.get("COMPOSER_ALL_COMPILE") else {})}


@functools.cache
def _model(name):
    return composer.build(name, **MODELS[name]).eval()


def _instructions(prog, seen: set, merges: set) -> None:
    for ins in prog:
        seen.add(type(ins))
        if type(ins) is Residual:
            _instructions(ins.body, seen, merges)
            _instructions(ins.shortcut, seen, merges)
        elif type(ins) is Parallel:
            merges.add(ins.merge)
            for branch in ins.branches:
                _instructions(branch, seen, merges)


def test_sample_covers_every_instruction_and_merge():
    kinds = {c for c in vars(program).values()
             if isinstance(c, type) and issubclass(c, tuple) and c.__module__ == program.__name__}
    assert len(kinds) >= 15  # Call, GridCall, TensorCall, Attend, Residual, Parallel, ... (program.py)
    seen, merges = set(), set()
    for name in SAMPLE:
        for m in _model(name).modules():
            if isinstance(m, Sequence):
                _instructions(m.program, seen, merges)
    assert kinds - seen == set()
    # the merges Sequence._parallel runs (builder.py)
    assert {"add", "concat", "tokens", "mean", "mul", "sub"} <= merges


@pytest.mark.parametrize("name", MODELS)
def test_traces_without_graph_breaks(name):
    torch._dynamo.reset()
    model = _model(name)
    plan = model.plan
    x = torch.randn(1, plan.input.channels, *plan.input.spatial)
    with torch.no_grad():
        out = torch._dynamo.explain(model)(x)
    reasons = [f"{r.reason} at {r.user_stack[-1] if r.user_stack else '?'}" for r in out.break_reasons]
    assert out.graph_break_count == 0, "\n".join(reasons[:3])
    assert out.graph_count == 1
