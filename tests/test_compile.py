"""torch.compile (issue 18, item 4): built models trace into one graph, with no graph break.

`torch._dynamo.explain` runs dynamo alone (no backend compiles anything) on one model of every zoo
family (tests/helpers.py's FAMILY_SAMPLE: the smallest variant, made small through its own
blueprint parameters: img_size 64, one block per stage), in eval mode at batch 1. The sample also
covers every instruction of the builder's interpreter and every merge of parallel branches
(checked below). Tracing costs about 10 ms of CPU per module: about 100 s for the 64 families.
COMPOSER_ALL_COMPILE=1 adds the models that complete the coverage of every composer layer class
in the zoo (rotary and Fourier positions, cached position scores, ...).
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
from composer.api import zoo_index
from composer.builder import Sequence
from composer.program import Parallel, Residual
from helpers import FAMILY_SAMPLE

ONE = [1, 1, 1, 1]
SAMPLE = dict(FAMILY_SAMPLE.values())  # model -> its small arguments
# with SAMPLE: every composer layer class found in the zoo's models at these small settings (a greedy
# cover by module count, computed when this test was written)
REST = {
    "mvitv2_base": {"img_size": 64, "depths": ONE},
    "conformer_speech_l": {"img_size": 64, "depth": 1},
    "smt_b": {"img_size": 64, "depths": ONE},
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
MODELS = {**(REST if os.environ.get("COMPOSER_ALL_COMPILE") else {}), **SAMPLE}


def test_sample_has_one_model_of_every_family():
    families = {path.stem for path in zoo_index().values()}
    assert set(FAMILY_SAMPLE) == families
    index = zoo_index()
    for family, (name, _) in FAMILY_SAMPLE.items():
        assert index[name].stem == family, name


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


# ---- the input size check under compile (composer/size_guard.py) -----------------------------------


@pytest.mark.parametrize("how", ["torch.compile", "model.compile", "fullgraph"])
def test_a_compiled_model_refuses_the_sizes_eager_refuses(how):
    """Compiled, the model checks the input's real size at every call, the first (static) one and
    those after a recompile with dynamic sizes: vit_ti built at 64 runs at 64 and refuses 65 (its
    patch size 16 does not divide it) and 48 (its position table is built for a 4x4 grid), as the
    uncompiled model does; at 64 the logits are the uncompiled model's."""
    torch._dynamo.reset()
    model = composer.build("vit_ti", img_size=64, depth=1).eval()
    if how == "model.compile":
        compiled = model
        compiled.compile(backend="eager")
    else:
        compiled = torch.compile(model, backend="eager", fullgraph=how == "fullgraph")
    eager = composer.build("vit_ti", img_size=64, depth=1).eval()
    eager.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for size in (65, 48):
            with pytest.raises(composer.InputSizeError, match=f"cannot run at {size}x{size}"):
                eager(torch.randn(2, 3, size, size))
        for size in (65, 64, 48, 64, 65):  # the first call traces at 65; 48 after a recompile at 64
            if size == 64:
                assert torch.equal(compiled(x), eager(x))
            else:
                with pytest.raises(composer.InputSizeError, match=f"cannot run at {size}x{size}"):
                    compiled(torch.randn(2, 3, size, size))


def test_the_size_check_adds_no_graph_and_no_break():
    """The hook runs outside the compiled graph, and skipped inline inside a larger compiled
    function (as under torch.export): one graph either way, no break."""
    torch._dynamo.reset()
    model = composer.build("vit_ti", img_size=64, depth=1).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for fn in (model, lambda t: model(t) * 2):
            out = torch._dynamo.explain(fn)(x)
            assert (out.graph_count, out.graph_break_count) == (1, 0)


def test_building_and_running_a_model_leaves_the_compiler_unimported():
    """The hook is marked through torch's C extension: a program that never compiles does not pay
    for importing torch's compiler (about 1 s)."""
    import subprocess
    import sys

    code = ("import sys, torch, composer\n"
            "m = composer.build('resnet18', img_size=64).eval()\n"
            "m(torch.randn(1, 3, 64, 64))\n"
            "from composer.size_guard import check_before_forward\n"
            "print(check_before_forward.runs_uncompiled, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
