"""Composer on a CUDA GPU: every zoo model runs there and agrees with its CPU output, and the timm
parity rows' GPU latency is compared with timm's side by side.

Not part of the test suite (CI has no GPU); run it where one is lent:

    python benchmarks/gpu_check.py                 # both parts, prints markdown
    python benchmarks/gpu_check.py --part zoo      # only CPU/GPU agreement
    python benchmarks/gpu_check.py --part latency --batch 32 --out gpu.md

zoo: each model is built once on the CPU (seed 0), run on a random batch of 2 at its own input
size, moved to the GPU and run again; the report gives max |gpu - cpu| / max |cpu| (TF32 off, so
float32 on both sides). Models with data-dependent token selection (top-k) may pick other tokens
when two scores tie within rounding: they are marked.
latency: timm's model ported into ours (`composer.port`), both in eval mode under `no_grad`,
float32, CUDA events, warm-up, then interleaved rounds A/B/A/B and the median round; ratio =
composer / timm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import composer  # noqa: E402
from composer import resolve as _resolve  # noqa: E402
from composer.api import zoo_files  # noqa: E402

DYNAMIC = ("cf_vit", "stvit", "pathformer")  # data-dependent selection or routing


def _tensors(y):
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, (list, tuple)):
        return [t for item in y for t in _tensors(item)]
    if isinstance(y, dict):
        return [t for item in y.values() for t in _tensors(item)]
    return []


def zoo_names() -> list[str]:
    names = []
    for path in zoo_files():
        names += [f"{path}:{m.name}" for m in _resolve.load(path).file.models]
    return names


def check_zoo(names) -> list[dict]:
    rows = []
    for target in names:
        row = {"name": target.rpartition(":")[2], "file": Path(target.partition(":")[0]).name}
        t0, model = time.perf_counter(), None
        try:
            model = composer.build(target).eval()
            plan = model.plan
            x = torch.randn(2, plan.input.channels, *plan.input.spatial, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                cpu = [t.float() for t in _tensors(model(x))]
                model.cuda()
                gpu = [t.float().cpu() for t in _tensors(model(x.cuda()))]
            scale = max(t.abs().max().item() for t in cpu) or 1.0
            row["diff"] = max((a - b).abs().max().item() for a, b in zip(cpu, gpu)) / scale
            row["shapes_equal"] = [t.shape for t in cpu] == [t.shape for t in gpu]
        except Exception as exc:  # noqa: BLE001 - report every model
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        del model
        torch.cuda.empty_cache()
        print(f"{row['name']:28s} {row.get('diff', row.get('error'))}", flush=True)
    return rows


def _gpu_time(fn, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def latency(batch: int, rounds: int, only=None) -> list[dict]:
    from vs_timm import _reference_factory, interleaved, zoo_models

    rows = []
    pairs, _ = zoo_models()
    for name, ref in pairs:
        if only and name not in only:
            continue
        create, port = _reference_factory(ref)
        ours, theirs = composer.build(name).eval(), create().eval()
        port(ours, theirs.state_dict())
        ours.cuda()
        theirs.cuda()
        size = tuple(composer.load(name).input.spatial)
        x = torch.randn(batch, 3, *size, device="cuda")
        with torch.no_grad():
            diff = (ours(x) - theirs(x)).abs().max().item()
            for _ in range(5):
                ours(x)
                theirs(x)
            torch.cuda.synchronize()
            tc, tt = interleaved(partial(ours, x), partial(theirs, x), rounds, 10, timer=_gpu_time)
        row = {"name": name, "ref": ref, "c": tc, "t": tt, "diff": diff}
        row["ratio"] = row["c"] / row["t"]
        rows.append(row)
        print(f"{name:24s} {row['c']:8.2f} {row['t']:8.2f} {row['ratio']:.3f} diff {diff:.1e}", flush=True)
        del ours, theirs
        torch.cuda.empty_cache()
    return rows


def report(zoo_rows, lat_rows, batch) -> str:
    out = [f"# Composer on a GPU: {torch.cuda.get_device_name()}", "",
           f"torch {torch.__version__}, CUDA {torch.version.cuda}; TF32 off", ""]
    if zoo_rows:
        bad = [r for r in zoo_rows if "error" in r or r["diff"] > 1e-4 or not r["shapes_equal"]]
        out += ["## Every zoo model: GPU vs CPU output", "",
                f"{len(zoo_rows)} models; {sum('error' in r for r in zoo_rows)} failed to run; "
                f"{len(bad)} differ by more than 1e-4 (relative to the largest output) or fail:", ""]
        out += ["| model | file | max rel diff | note |", "|---|---|---|---|"]
        for r in sorted(zoo_rows, key=lambda r: -(r.get("diff") or 1e9)):
            note = r.get("error", "") or ("data-dependent selection" if r["file"].startswith(DYNAMIC) else "")
            out.append(f"| {r['name']} | {r['file']} | {r.get('diff', float('nan')):.1e} | {note} |")
        out.append("")
    if lat_rows:
        ratios = [r["ratio"] for r in lat_rows]
        out += [f"## Latency vs timm, batch {batch}, float32, eval", "",
                f"median ratio {statistics.median(ratios):.3f}, worst {max(ratios):.3f}, best {min(ratios):.3f}", "",
                "| model | reference | composer ms | timm ms | ratio | max logit diff |", "|---|---|---|---|---|---|"]
        for r in lat_rows:
            out.append(f"| {r['name']} | {r['ref']} | {r['c']:.2f} | {r['t']:.2f} | {r['ratio']:.3f} | {r['diff']:.1e} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("zoo", "latency", "both"), default="both")
    ap.add_argument("--models", nargs="*", help="zoo names (latency) or substrings of names (zoo)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="write the markdown report here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    zoo_rows = lat_rows = []
    if args.part in ("zoo", "both"):
        names = zoo_names()
        if args.models:
            names = [n for n in names if any(m in n for m in args.models)]
        zoo_rows = check_zoo(names)
    if args.part in ("latency", "both"):
        lat_rows = latency(args.batch, args.rounds, args.models)
    text = report(zoo_rows, lat_rows, args.batch)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
