"""Composer vs timm on CPU: build time and forward latency of every zoo model whose reference is timm.

Both models run in this one process, on the same thread count, with the same weights (timm's are
ported into ours with `composer.port.from_timm`, so both compute the same function; a model whose
port fails is timed with its own weights and marked). Per model:

* build: `composer.build(name)` vs `timm.create_model(ref, pretrained=False)`, interleaved rounds;
* forward: eval, `torch.no_grad()`, float32, batch 1 and batch 8 at the reference resolution,
  warm-up, then interleaved rounds A/B/A/B (each round a few calls, its mean kept), the median
  round per model; the ratio is composer / timm (above 1: composer is slower);
* at a second size (batch 1, 1.25x the reference resolution rounded to a multiple of 32) for the
  models whose composer model admits it and whose reference runs at it ("-" otherwise).

Models slower than timm by more than 5% are profiled (torch.profiler, batch 1): the ops whose
self CPU time differs most are listed in the report.

Run:  python benchmarks/vs_timm.py            (the whole zoo, writes docs/benchmarks.md)
      python benchmarks/vs_timm.py --quick    (a subset, fewer rounds, prints only)
      python benchmarks/vs_timm.py --models resnet18 vit_ti --rounds 5
      python benchmarks/vs_timm.py --optimize  (model.optimize() vs timm over the parity rows, printed:
                                                benchmarks/vs_timm_optimize.py)
A torchvision reference is benchmarked the same way (created with `torchvision.models.get_model`,
ported with `composer.port.from_torchvision`) when composer/port.py has that function.
docs/benchmarks.md is regenerated above the `<!-- notes -->` marker; the hand-written notes
below it are kept.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import composer  # noqa: E402
from composer import port as _port  # noqa: E402
from composer import resolve as _resolve  # noqa: E402
from composer.api import zoo_files  # noqa: E402

QUICK = ["resnet18", "mobilenetv2_100", "vit_ti", "convnext_atto", "pvt_v2_b0", "mixer_s16"]
MARKER = "<!-- notes -->"
SLOW = 1.05


def zoo_models() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(name, timm reference) of every zoo model with a timm reference, and (name, why) for the
    others. A family file that does not load is reported, not fatal (the zoo is edited concurrently)."""
    timm_models, skipped = [], []
    for path in zoo_files():
        try:
            models = _resolve.load(path).file.models
        except Exception as exc:  # noqa: BLE001 - a broken family file must not stop the benchmark
            skipped.append((path.name, f"does not load: {str(exc).splitlines()[0]}"))
            continue
        for m in models:
            try:
                ref = composer.load(f"{path}:{m.name}").reference or ""
            except Exception as exc:  # noqa: BLE001
                skipped.append((m.name, f"does not resolve: {str(exc).splitlines()[0]}"))
                continue
            source, _, name = ref.partition(":")
            if source == "timm" and name:
                timm_models.append((m.name, ref))
            elif source == "torchvision" and name and hasattr(_port, "from_torchvision"):
                timm_models.append((m.name, ref))
            elif source == "official":
                continue  # official-code rows (Zoo II) have no reference model in this process
            else:
                skipped.append((m.name, f"reference '{ref or '-'}': no `{source or '?'}` source in composer/port.py"))
    return timm_models, skipped


def _median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _wall_time(fn, calls: int) -> float:
    """The mean wall-clock time of `calls` calls of `fn`."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def interleaved(fa, fb, rounds: int, calls: int, timer=_wall_time) -> tuple[float, float]:
    """Median over `rounds` of the mean time of `calls` calls (`timer(fn, calls)`), A and B
    alternating round by round (B first on odd rounds, so neither always runs right after the other)."""
    ta, tb = [], []
    for r in range(rounds):
        order = [(fa, ta), (fb, tb)] if r % 2 == 0 else [(fb, tb), (fa, ta)]
        for fn, out in order:
            out.append(timer(fn, calls))
    return statistics.median(ta), statistics.median(tb)


def _calls_for(seconds: float, budget: float = 0.25) -> int:
    return max(1, min(20, int(budget / max(seconds, 1e-6))))


def _reference_factory(ref: str):
    """(a function creating the reference model without pretrained weights, the port function)."""
    source, _, name = ref.partition(":")
    if source == "torchvision":
        import torchvision

        return (lambda: torchvision.models.get_model(name, weights=None)), _port.from_torchvision
    import timm

    return (lambda: timm.create_model(name, pretrained=False)), _port.from_timm


def bench_model(name: str, ref_name: str, args) -> dict:
    create, port = _reference_factory(ref_name)
    row = {"name": name, "ref": ref_name.removeprefix("timm:")}
    # build time: interleaved, the first (cold) composer build is a warm-up like timm's first
    builds_c, builds_t = [], []
    ours = theirs = None
    for r in range(args.build_rounds + 1):
        for which in (("c", "t") if r % 2 == 0 else ("t", "c")):
            t0 = time.perf_counter()
            if which == "c":
                ours = composer.build(name)
                (builds_c if r else []).append(time.perf_counter() - t0)
            else:
                theirs = create()
                (builds_t if r else []).append(time.perf_counter() - t0)
    row["build_c"], row["build_t"] = statistics.median(builds_c), statistics.median(builds_t)
    row["params_c"] = sum(p.numel() for p in ours.parameters())
    row["params_t"] = sum(p.numel() for p in theirs.parameters())
    ours.eval()
    theirs.eval()
    try:
        port(ours, theirs.state_dict())
        row["ported"] = True
    except Exception as exc:  # noqa: BLE001
        row["ported"] = False
        row["port_error"] = str(exc).splitlines()[0]
    size = tuple(composer.load(name).input.spatial)
    for batch in (1, 8):
        x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if batch == 1 and row["ported"]:
                row["diff"] = (ours(x) - theirs(x)).abs().max().item()
            for _ in range(args.warmup):
                ours(x)
                theirs(x)
            one = min(_median_time(lambda: ours(x), 1), _median_time(lambda: theirs(x), 1))
            calls = _calls_for(one)
            tc, tt = interleaved(lambda: ours(x), lambda: theirs(x), args.rounds, calls)
        row[f"fwd_c{batch}"], row[f"fwd_t{batch}"] = tc, tt
        row[f"ratio{batch}"] = tc / tt
    second = _second_size(name, size)
    if second is not None:
        x = torch.randn(1, 3, *second, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                for _ in range(args.warmup):
                    ours(x)
                    theirs(x)
                calls = _calls_for(min(_median_time(lambda: ours(x), 1), _median_time(lambda: theirs(x), 1)))
                tc, tt = interleaved(lambda: ours(x), lambda: theirs(x), args.rounds, calls)
            row["size2"], row["fwd_c2"], row["fwd_t2"], row["ratio2"] = second, tc, tt, tc / tt
        except Exception:  # noqa: BLE001 - the reference does not run at that size
            pass
    if args.profile and max(row["ratio1"], row["ratio8"]) > SLOW:
        row["profile"] = profile_pair(ours, theirs, size)
    return row


def _second_size(name: str, size: tuple) -> tuple | None:
    """1.25x the reference resolution, a multiple of 32, where the composer model admits it."""
    from composer.sizes import admits

    second = tuple(32 * round(1.25 * g / 32) for g in size)
    return second if admits(composer.load(name), second) is None else None


def _self_times(model, x, calls=3) -> dict[str, tuple[float, int]]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    out = {}
    for e in prof.key_averages():
        out[e.key] = (e.self_cpu_time_total / calls / 1e3, e.count // calls)   # ms per forward, calls per forward
    return out


def profile_pair(ours, theirs, size, top=8) -> list[tuple[str, float, int, float, int]]:
    """The aten ops whose self CPU time per forward (batch 1) differs most: (op, ours ms, ours
    calls, timm ms, timm calls)."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    a, b = _self_times(ours, x), _self_times(theirs, x)
    keys = set(a) | set(b)
    rows = [(k, *a.get(k, (0.0, 0)), *b.get(k, (0.0, 0))) for k in keys]
    rows.sort(key=lambda r: -(r[1] - r[3]))
    total = (sum(v[0] for v in a.values()), sum(v[0] for v in b.values()))
    return [("(total self CPU)", total[0], sum(v[1] for v in a.values()), total[1],
             sum(v[1] for v in b.values()))] + rows[:top]


# --------------------------------------------------------------------------------------------- reporting
def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s >= 0.01 else f"{s * 1e3:.2f}"


def table(rows: list[dict]) -> list[str]:
    out = ["| model | timm reference | build composer / timm (ms) | b1 composer / timm (ms) | ratio b1 | "
           "b8 composer / timm (ms) | ratio b8 | second size: b1 ratio | same params | max logit diff |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = f"{r['diff']:.1e}" if "diff" in r else f"not ported ({r.get('port_error', '')[:60]})"
        same = "yes" if r["params_c"] == r["params_t"] else f"no ({r['params_c']:,} vs {r['params_t']:,})"
        out.append(f"| {r['name']} | {r['ref']} | {_ms(r['build_c'])} / {_ms(r['build_t'])} | "
                   f"{_ms(r['fwd_c1'])} / {_ms(r['fwd_t1'])} | {r['ratio1']:.3f} | "
                   f"{_ms(r['fwd_c8'])} / {_ms(r['fwd_t8'])} | {r['ratio8']:.3f} | "
                   f"{_second(r)} | {same} | {diff} |")
    return out


def _second(r: dict) -> str:
    if "ratio2" not in r:
        return "-"
    return f"{'x'.join(map(str, r['size2']))}: {r['ratio2']:.3f}"


def summary(rows: list[dict]) -> list[str]:
    out = []
    second = [(r["ratio2"], r["name"]) for r in rows if "ratio2" in r]
    if second:
        out.append(f"- batch 1 at a second size ({len(second)} models): median ratio "
                   f"{statistics.median(v for v, _ in second):.3f}, worst {max(second)[0]:.3f} ({max(second)[1]})")
    for key, label in (("ratio1", "batch 1"), ("ratio8", "batch 8"), ("build", "build")):
        vals = [(r["build_c"] / r["build_t"] if key == "build" else r[key], r["name"]) for r in rows]
        worst = max(vals)
        out.append(f"- {label}: median ratio {statistics.median(v for v, _ in vals):.3f}, "
                   f"worst {worst[0]:.3f} ({worst[1]}), best {min(vals)[0]:.3f} ({min(vals)[1]})")
    slow = [r["name"] for r in rows if max(r["ratio1"], r["ratio8"]) > SLOW]
    out.append(f"- slower than timm by more than {round((SLOW - 1) * 100)}% at batch 1 or 8: "
               + (", ".join(slow) if slow else "none"))
    return out


def profiles(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if not r.get("profile"):
            continue
        out += ["", f"#### {r['name']} (ratio b1 {r['ratio1']:.3f}, b8 {r['ratio8']:.3f})", "",
                "| op (self CPU per forward, batch 1) | composer ms | calls | timm ms | calls |", "|---|---|---|---|---|"]
        for op, ca, na, cb, nb in r["profile"]:
            out.append(f"| `{op}` | {ca:.2f} | {na} | {cb:.2f} | {nb} |")
    return out


def machine() -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    return [f"- CPU: {cpu}; {os.cpu_count()} logical cores visible, "
            f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} usable",
            f"- torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), timm {timm.__version__}, "
            f"Python {platform.python_version()}",
            f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}"]


def write_doc(path: Path, rows, skipped, args, seconds) -> None:
    notes = ""
    if path.exists() and MARKER in path.read_text():
        notes = path.read_text().split(MARKER, 1)[1].lstrip("\n")
    lines = ["# Composer vs timm: build time and CPU latency", "",
             "Generated by `python benchmarks/vs_timm.py` (do not edit above the notes marker; the notes below "
             "it are kept). Every zoo model whose reference is timm (or torchvision), timed in one process: `composer.build` vs "
             "`timm.create_model(pretrained=False)`, and the forward pass of both after porting timm's weights "
             "into ours (eval, `no_grad`, float32, CPU, the reference resolution), warm-up then "
             f"{args.rounds} interleaved rounds A/B/A/B, the median round. Ratio = composer / timm: above 1 "
             "composer is slower.", "", "## Machine", "", *machine(),
             f"- run: {seconds / 60:.1f} min, {args.warmup} warm-up calls, {args.rounds} rounds, "
             f"{args.build_rounds} build rounds", "", "## Summary", "", *summary(rows), "",
             "## Per model", "", *table(rows), ""]
    if skipped:
        lines += ["Not benchmarked:", ""] + [f"- {n}: {why}" for n, why in skipped] + [""]
    prof = profiles(rows)
    if prof:
        lines += [f"## Profiles of the models more than {round((SLOW - 1) * 100)}% slower", "",
                  "torch.profiler, self CPU time per forward at batch 1 (3 forwards averaged); the first row is "
                  "the total, then the ops where composer spends the most extra time.", *prof, ""]
    lines += [MARKER, "", notes.rstrip() + "\n" if notes.strip() else ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset of the zoo, fewer rounds, no doc written")
    ap.add_argument("--models", nargs="*", help="only these zoo models")
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--build-rounds", type=int, help="timed builds of each (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: steadier on a shared machine; 0 keeps torch's)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"),
                    help="the report (written by a full run only)")
    ap.add_argument("--optimize", action="store_true",
                    help="the optimised model (model.optimize()) vs timm's (and timm's reparameterize_model copy) "
                    "over the parity rows; prints a table (benchmarks/vs_timm_optimize.py)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="with --optimize: time calls by the thread's CPU time (a loaded machine), not the wall clock")
    ap.add_argument("--layout", default="channels_first",
                    choices=["channels_first", "channels_last", "blocked", "fastest"],
                    help="with --optimize: model.optimize(layout=...) (fastest: chosen per batch size)")
    ap.add_argument("--channels-last", action="store_const", const="channels_last", dest="layout",
                    help="with --optimize: --layout channels_last")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.build_rounds = args.build_rounds or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.optimize:
        from vs_timm_optimize import run

        return run(args, _reference_factory)
    models, skipped = zoo_models()
    if args.models:
        models = [m for m in models if m[0] in args.models]
    elif args.quick:
        models = [m for m in models if m[0] in QUICK]
    t0 = time.perf_counter()
    rows = []
    for name, ref in models:
        try:
            row = bench_model(name, ref, args)
        except Exception as exc:  # noqa: BLE001 - one broken model must not stop the run
            skipped.append((name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            print(f"{name:22s} FAILED {exc}", flush=True)
            continue
        rows.append(row)
        print(f"{name:22s} build {_ms(row['build_c']):>7s} / {_ms(row['build_t']):>7s} ms   "
              f"b1 {_ms(row['fwd_c1']):>7s} / {_ms(row['fwd_t1']):>7s} ms ({row['ratio1']:.3f})   "
              f"b8 {_ms(row['fwd_c8']):>7s} / {_ms(row['fwd_t8']):>7s} ms ({row['ratio8']:.3f})"
              + ("" if row["ported"] else "   NOT PORTED"), flush=True)
    seconds = time.perf_counter() - t0
    if not rows:
        print("nothing benchmarked")
        return
    print("\n".join(["", *summary(rows)]))
    for n, why in skipped:
        print(f"skipped {n}: {why}")
    if not args.quick and not args.models:
        write_doc(Path(args.out), rows, skipped, args, seconds)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
