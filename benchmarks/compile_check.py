"""torch.compile on every zoo model: graph breaks found by `torch._dynamo.explain`.

Not part of the test suite (tests/test_compile.py samples one model per family); run it by hand:

    python benchmarks/compile_check.py                      # every zoo model, a table
    python benchmarks/compile_check.py --models vit_ti swin_t
    python benchmarks/compile_check.py --chunk 2/4          # the second quarter of the zoo
    python benchmarks/compile_check.py --compare 6          # also inductor vs eager on 6 models
    python benchmarks/compile_check.py --train --again      # training mode; recompiles on later calls

Per model: built with seed 0 (eval mode) at a small size (`img_size=64` where the blueprint has
the parameter and the model is valid there, as tests/test_zoo.py picks it; otherwise its own size),
then `torch._dynamo.explain(model)(x)` on a batch of 2 under `no_grad` (dynamo only: no backend
compiles anything). Printed: graphs, graph breaks, the first break reasons (with the line of ours
that caused each), and the seconds it took. `torch._dynamo.reset()` between models.
`--train`: the same in training mode (dropout, drop path, batch statistics; gradients on).
`--again`: also compiled with a backend that only counts graphs (no inductor) and called three
times: a model whose later calls compile again (a guard failing on state its forward changed, such
as a cache filled while tracing) is marked `recompiled` (the graphs after the 1st and 3rd call).

`--compare N`: for N models spread over the zoo (or those named with --models), the model compiled
with `torch.compile(dynamic=False)` (inductor, CPU: slow to compile) and its output compared with
eager: max |compiled - eager| / max |eager|.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import composer  # noqa: E402
from composer.api import zoo_index  # noqa: E402


def small_kwargs(name: str) -> dict:
    """img_size=64 where the model takes it and is valid there; else the model as written."""
    try:
        composer.load(name, img_size=64)
        return {"img_size": 64}
    except composer.ComposerError:
        return {}


def build(name: str):
    model = composer.build(name, **small_kwargs(name)).eval()
    plan = model.plan
    torch.manual_seed(1)
    x = torch.randn(2, plan.input.channels, *plan.input.spatial)
    return model, x


def _where(reason) -> str:
    """The innermost frame of composer's own code in a break's user stack."""
    frames = [f for f in (reason.user_stack or []) if "/composer/" in f.filename]
    if not frames:
        frames = list(reason.user_stack or [])
    if not frames:
        return "?"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


def explain(name: str, train: bool = False, again: bool = False) -> dict:
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        model, x = build(name)
        model.train(train)
        with torch.set_grad_enabled(train):
            out = torch._dynamo.explain(model)(x)
            calls = recompiles(model, x) if again else None
    except Exception as exc:  # noqa: BLE001 - one failing model must not stop the run
        return {"name": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "trace": traceback.format_exc(limit=-3), "seconds": time.perf_counter() - t0}
    reasons = []
    for r in out.break_reasons:
        text = f"{_where(r)}: {' '.join(str(r.reason).split())[:160]}"
        if text not in reasons:
            reasons.append(text)
    return {"name": name, "graphs": out.graph_count, "breaks": out.graph_break_count, "reasons": reasons,
            "calls": calls, "seconds": time.perf_counter() - t0}


def recompiles(model, x) -> tuple:
    """Graphs compiled after the first and after the third call of the compiled model."""
    torch._dynamo.reset()
    count = [0]

    def backend(gm, example_inputs):
        count[0] += 1
        return gm.forward

    compiled = torch.compile(model, backend=backend, dynamic=False)
    seen = []
    for _ in range(3):
        compiled(x)
        seen.append(count[0])
    return seen[0], seen[-1]


def compare(name: str) -> float:
    torch._dynamo.reset()
    model, x = build(name)
    with torch.no_grad():
        ref = model(x)
        got = torch.compile(model, dynamic=False)(x)
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="zoo model names (default: the whole zoo)")
    ap.add_argument("--chunk", help="K/N: the K-th of N equal slices of the sorted zoo (1-based)")
    ap.add_argument("--compare", type=int, default=0, help="compile N models with inductor, compare with eager")
    ap.add_argument("--reasons", type=int, default=3, help="break reasons printed per model")
    ap.add_argument("--train", action="store_true", help="trace in training mode")
    ap.add_argument("--again", action="store_true", help="also count recompiles over three calls")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    zoo = zoo_index()
    names = args.models or sorted(zoo)
    if args.chunk:
        k, n = (int(v) for v in args.chunk.split("/"))
        size = -(-len(names) // n)
        names = names[(k - 1) * size:k * size]
    clean = failed = recompiled = 0
    total = time.perf_counter()
    print("| model | graphs | breaks | seconds | first break reasons |\n|---|---|---|---|---|", flush=True)
    for name in names:
        r = explain(name, args.train, args.again)
        if "error" in r:
            failed += 1
            print(f"| {name} | - | error | {r['seconds']:.1f} | {r['error']} |", flush=True)
            print(r["trace"], file=sys.stderr, flush=True)
            continue
        clean += r["breaks"] == 0
        why = "; ".join(r["reasons"][:args.reasons]).replace("|", "/")
        if r["calls"] and r["calls"][0] != r["calls"][1]:
            recompiled += 1
            why = f"recompiled: {r['calls'][0]} -> {r['calls'][1]} graphs; {why}"
        print(f"| {name} | {r['graphs']} | {r['breaks']} | {r['seconds']:.1f} | {why} |", flush=True)
    mode = "training" if args.train else "eval"
    print(f"\nzero graph breaks ({mode}): {clean} / {len(names)} models ({failed} failed to trace"
          + (f", {recompiled} compiled again on a later call" if args.again else "")
          + f"); {time.perf_counter() - total:.0f} s", flush=True)
    if args.compare:
        sample = names if args.models else names[::max(1, len(names) // args.compare)][:args.compare]
        print("\n| model | inductor vs eager: max abs diff / max abs | seconds |\n|---|---|---|", flush=True)
        for name in sample:
            t0 = time.perf_counter()
            try:
                diff = f"{compare(name):.1e}"
            except Exception as exc:  # noqa: BLE001
                diff = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            print(f"| {name} | {diff} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
