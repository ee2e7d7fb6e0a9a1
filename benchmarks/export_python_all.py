"""Every zoo model exported as a standalone Python file (`composer export NAME --to python`), loaded
in a fresh module, given the built model's state_dict (strict: the same keys) and compared with it:
logits in eval at the built size and at a second admitted size (batch 2), largest difference
relative to max(1, max |logit|). Optionally (--time) the forward latency of both, side by side in
one process (1 thread, batch 1, eval, no_grad; interleaved rounds of a few calls each, the median
round; CPU time of this process, which a loaded machine disturbs less than wall time).

Run:  python benchmarks/export_python_all.py                 (the whole zoo)
      python benchmarks/export_python_all.py --models resnet18 vit_ti --time
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import composer  # noqa: E402
from composer.api import zoo_index  # noqa: E402
from composer.codegen import generate  # noqa: E402

TOLERANCE = 1e-5


def load_source(src: str, name: str):
    """The model class of a generated file, imported in a fresh module namespace."""
    mod = types.ModuleType(f"exported_{name}")
    exec(compile(src, f"<{name}.py>", "exec"), mod.__dict__)
    last = [n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)][-1].name
    return getattr(mod, last)


def second_size(plan):
    """Another spatial size the built model admits (a few steps above the built one), or None."""
    from composer.sizes import admits

    spatial = list(plan.input.spatial)
    for d in (32, 16, 64, 8, 4, 1):
        other = [s + d for s in spatial]
        if admits(plan, tuple(other)) is None:
            return other
    return None


def relative(a, b) -> float:
    return ((a - b).abs().max() / max(1.0, a.abs().max().item())).item()


def check(name: str, timing: bool, rounds: int) -> dict:
    model = composer.build(name).eval()
    plan = model.plan
    t = time.perf_counter()
    src = generate(plan)
    row = {"name": name, "gen_s": time.perf_counter() - t, "lines": len(src.splitlines())}
    imports = {a.name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    imports |= {(n.module or "").split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    row["imports_composer"] = "composer" in imports
    exported = load_source(src, name)().eval()
    exported.load_state_dict(model.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(0)
    sizes = [list(plan.input.spatial)]
    other = second_size(plan)
    if other:
        sizes.append(other)
    diffs = []
    with torch.no_grad():
        for s in sizes:
            x = torch.randn(2, plan.input.channels, *s, generator=gen)
            diffs.append(relative(model(x), exported(x)))
    row["sizes"] = ["x".join(map(str, s)) for s in sizes]
    row["diff"] = max(diffs)
    if timing:  # interleaved rounds A/B/A/B, each a few calls (at least ~30 ms), the median round
        x = torch.randn(1, plan.input.channels, *plan.input.spatial, generator=gen)
        a, b = [], []
        with torch.no_grad():
            t = time.process_time()
            for _ in range(2):
                model(x), exported(x)
            calls = max(1, int(0.03 / ((time.process_time() - t) / 4)))
            for _ in range(rounds):
                for fn, acc in ((model, a), (exported, b)):
                    t = time.process_time()
                    for _ in range(calls):
                        fn(x)
                    acc.append((time.process_time() - t) / calls)
        row["interp_ms"], row["python_ms"] = statistics.median(a) * 1e3, statistics.median(b) * 1e3
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--time", action="store_true", help="also time both forwards (1 thread, batch 1)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.models or sorted(zoo_index())
    ok, rows, failed = 0, [], []
    start = time.time()
    for name in names:
        try:
            row = check(name, args.time, args.rounds)
        except Exception as exc:  # noqa: BLE001 - one model's failure is reported, the run goes on
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failed.append((name, f"{type(exc).__name__}: {first}"))
            print(f"FAIL {name}: {failed[-1][1]}", flush=True)
            if len(names) <= 3:
                traceback.print_exc()
            continue
        good = row["diff"] <= TOLERANCE and not row["imports_composer"]
        ok += good
        rows.append(row)
        extra = f"  interpreter {row['interp_ms']:.2f} ms  python {row['python_ms']:.2f} ms  ratio " \
                f"{row['python_ms'] / row['interp_ms']:.3f}" if args.time else ""
        print(f"{'ok  ' if good else 'DIFF'} {name}: {row['lines']} lines, generated in {row['gen_s']:.2f} s, "
              f"sizes {', '.join(row['sizes'])}, diff {row['diff']:.1e}{extra}", flush=True)
    print(f"\n{ok} of {len(names)} models export and match (< {TOLERANCE:g} relative); {len(failed)} fail "
          f"({time.time() - start:.0f} s)")
    for name, why in failed:
        print(f"  {name}: {why}")
    if args.time and rows:
        ratios = [r["python_ms"] / r["interp_ms"] for r in rows]
        print(f"latency python / interpreter: median {statistics.median(ratios):.3f}, worst {max(ratios):.3f}, "
              f"best {min(ratios):.3f} over {len(ratios)} models")
    return 0 if ok == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
