"""`python benchmarks/vs_timm.py --optimize`: composer's optimised model (`model.optimize()`) against
timm's model on CPU, over the parity rows (the smallest variant of rows 1-19 of shared/MODELS.md,
as in tests/test_parity_rows.py).

Per model, in one process with the same weights (timm's ported into ours, then ours optimised):
composer as built, composer optimised, timm's model, and, where `timm.utils.model.reparameterize_model`
changes timm's model (RepVGG, MobileOne, FastViT ...: it has modules with `fuse()` or
`reparameterize()`), timm's re-parameterised copy. Eval, `torch.no_grad()`, float32, batch 1 and 8
at the reference resolution; warm-up, then interleaved rounds (the order rotates every round), the
median round per variant. Ratios: optimised / timm's best form (the re-parameterised copy where
there is one, else the model), optimised / plain timm, optimised / composer as built.

On a loaded machine, `--cpu-time` times each call by the CPU time of the calling thread
(`time.thread_time`; with `--threads 1`, torch runs every op on it) instead of the wall clock:
time spent waiting for a core other processes hold is then left out.

`--layout L` times `model.optimize(layout=L)` (timm's models as they are): channels_first (the
default), channels_last, blocked, or fastest (chosen per batch size, on that batch: the layout is
printed); `--channels-last` is `--layout channels_last`.

Run:  python benchmarks/vs_timm.py --optimize [--models resnet50 ...] [--rounds 7] [--cpu-time] [--layout L]
Prints the per-model lines, the summary and a markdown table (for docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

import composer

# the smallest variant of every row of shared/MODELS.md 1-19 (tests/test_parity_rows.py's ROWS)
PARITY_ROWS = ["vit_ti", "deit_ti_distilled", "mixer_s16", "resnet50", "mobilenetv2_100", "pvt_v2_b0", "swin_t",
               "mobilevit_xxs", "crossvit_tiny", "convnext_atto", "inception_next_t", "gcvit_xxt",
               "efficientvit_m0", "poolformer_s12", "maxvit_t", "fastvit_t8", "repvgg_a0", "twins_pcpvt_small",
               "shufflenet_v2_x1_0"]


def _timm_reparameterized(model):
    """timm's re-parameterised copy of `model`, or None when timm has nothing to re-parameterise in it."""
    if not any(hasattr(m, "reparameterize") or hasattr(m, "fuse") for m in model.modules()):
        return None
    from timm.utils.model import reparameterize_model

    return reparameterize_model(copy.deepcopy(model)).eval()


def _rotating(fns: list, rounds: int, calls: int, clock=time.perf_counter) -> list[float]:
    """Median over `rounds` of the mean time of `calls` calls of each function; the order rotates
    every round, so none always runs right after another."""
    times = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            t0 = clock()
            for _ in range(calls):
                fns[i]()
            times[i].append((clock() - t0) / calls)
    return [statistics.median(t) for t in times]


def bench(name: str, ref: str, args, create, port) -> dict:
    theirs = create().eval()
    ours = composer.build(name).eval()
    port(ours, theirs.state_dict())
    opt = copy.deepcopy(ours).optimize(layout=args.layout)
    rep = _timm_reparameterized(theirs)
    variants = {"built": ours, "optimized": opt, "timm": theirs}
    if rep is not None:
        variants["timm_rep"] = rep
    row = {"name": name, "ref": ref.removeprefix("timm:"), "rep": rep is not None}
    size = tuple(composer.load(name).input.spatial)
    for batch in (1, 8):
        x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if args.layout == "fastest":
                opt.optimize(layout="fastest", example=x)
            row[f"layout{batch}"] = opt.layout
            if batch == 1:
                want = theirs(x)
                row["diff"] = ((opt(x) - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
            for _ in range(args.warmup):
                for m in variants.values():
                    m(x)
            t0 = time.perf_counter()
            theirs(x)
            calls = max(1, min(20, int(0.25 / max(time.perf_counter() - t0, 1e-6))))
            fns = [(lambda m=m: m(x)) for m in variants.values()]
            clock = time.thread_time if args.cpu_time else time.perf_counter
            for key, t in zip(variants, _rotating(fns, args.rounds, calls, clock)):
                row[f"{key}{batch}"] = t
        best = row.get(f"timm_rep{batch}", row[f"timm{batch}"])
        row[f"best{batch}"] = row[f"optimized{batch}"] / best
        row[f"plain{batch}"] = row[f"optimized{batch}"] / row[f"timm{batch}"]
        row[f"self{batch}"] = row[f"optimized{batch}"] / row[f"built{batch}"]
    return row


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def line(r: dict) -> str:
    parts = [f"{r['name']:20s}"]
    for b in (1, 8):
        rep = f" rep {_ms(r[f'timm_rep{b}'])}" if r["rep"] else ""
        parts.append(f"b{b}: opt ({r[f'layout{b}']}) {_ms(r[f'optimized{b}'])} built {_ms(r[f'built{b}'])} timm {_ms(r[f'timm{b}'])}{rep}"
                     f" ms (vs best {r[f'best{b}']:.3f})")
    return "  ".join(parts) + f"  rel diff {r['diff']:.1e}"


def summary(rows: list[dict]) -> list[str]:
    out = []
    for b in (1, 8):
        for key, label in (("best", "optimised / timm's best form"), ("plain", "optimised / plain timm"),
                           ("self", "optimised / composer as built")):
            vals = sorted((r[f"{key}{b}"], r["name"]) for r in rows)
            out.append(f"- batch {b}, {label}: median {statistics.median(v for v, _ in vals):.3f}, "
                       f"best {vals[0][0]:.3f} ({vals[0][1]}), worst {vals[-1][0]:.3f} ({vals[-1][1]})")
    return out


def table(rows: list[dict]) -> list[str]:
    out = ["| model | timm reference | b1 optimised / built / timm (ms) | b1 ratio vs timm | "
           "b8 optimised / built / timm (ms) | b8 ratio vs timm | max rel. logit diff |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for b in (1, 8):
            timm = _ms(r[f"timm{b}"]) + (f" (reparam. {_ms(r[f'timm_rep{b}'])})" if r["rep"] else "")
            ratio = f"{r[f'best{b}']:.3f}" + (f" (plain {r[f'plain{b}']:.3f})" if r["rep"] else "")
            cells += [f"{_ms(r[f'optimized{b}'])} / {_ms(r[f'built{b}'])} / {timm}", ratio]
        out.append(f"| {r['name']} | {r['ref']} | " + " | ".join(cells) + f" | {r['diff']:.1e} |")
    return out


def run(args, reference_factory) -> None:
    names = args.models or PARITY_ROWS
    rows = []
    for name in names:
        ref = composer.load(name).reference
        create, port = reference_factory(ref)
        try:
            row = bench(name, ref, args, create, port)
        except Exception as exc:  # noqa: BLE001 - one broken model must not stop the run
            print(f"{name:20s} FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append(row)
        print(line(row), flush=True)
    if rows:
        print("\n".join(["", *summary(rows), "", *table(rows)]))
