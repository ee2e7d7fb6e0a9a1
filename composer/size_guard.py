"""A built model's input size check, kept before `forward` also when the model is compiled.

`ComposedModel.check_input` refuses an input size the architecture does not admit. It is pure
Python over the plan, so it cannot run inside a compiled graph: traced by torch's compiler, the
sizes may be symbolic (a second size recompiles with dynamic shapes) and the check returns early.
A model compiled as a whole (`torch.compile(model)`, `model.compile()`) then ran silently at any
size: vit_ti built at 64, compiled, ignored the last row and column of a 65x65 image.

So the check also runs as a forward pre-hook (`check_before_forward`). Torch calls a module's
hooks from `Module._call_impl`, outside the graph it compiles for `forward`, but its compiler
still takes up every Python function they call as a frame of its own; this one's frames are
marked to run as plain Python instead (`_run_uncompiled`), so the check sees the input's real
sizes at every call and `forward` still compiles to one graph. Inside a larger function that is
compiled (`torch.compile(lambda x: model(x))`), the hook is traced inline with that function and
the check is skipped, as it is under `torch.export` (whose dynamic dimensions are its own
contract): compile the model itself to keep it.
"""

from __future__ import annotations

import torch


def check_before_forward(model, args) -> None:
    """The forward pre-hook: `model.check_input(x)` on the real input, before `forward` runs."""
    if args and not torch.compiler.is_compiling():
        model.check_input(args[0])


def _run_uncompiled(fn):
    """Mark `fn`'s frames, and those of every function they call, to run as plain Python whenever
    torch's compiler meets one as a frame of its own (what `torch.compiler.disable` does). Set
    through the switch in torch's C extension, so that importing torch's compiler (about 1 s) is
    left to the programs that compile. A torch without that switch keeps the old behaviour (no
    check under compile); tests/test_compile.py proves the installed one has it."""
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy

        set_code_exec_strategy(fn.__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))
        fn.runs_uncompiled = True
    except (ImportError, AttributeError, TypeError, RuntimeError):
        fn.runs_uncompiled = False
    return fn


_run_uncompiled(check_before_forward)
