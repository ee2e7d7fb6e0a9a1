"""Time `composer check` over every blueprint in the repository, in a process without torch, and
the start-up of the command line: whole processes of `composer check blueprints`,
`composer check blueprints/swin.arch` and `composer info swin_t`.

Run: python benchmarks/check_speed.py [--runs N] [--repo PATH] [--against PATH] [--no-bytecode-cache]
Targets: the zoo's check under 0.6 s as a whole process; `composer info swin_t` at most 1.5 x
`composer check blueprints/swin.arch`.

The in-process part (3 fresh processes, the best reported) splits import from checking. The
whole-process part runs each command N times (default 7, after one warm-up run) and reports the
median and the minimum of wall-clock time and of the process's CPU time (user + system), which a
busy shared machine disturbs less: compare before/after changes in the same conditions, on the
same machine. `--repo` times another checkout with this script; `--against PATH` times a second
checkout (e.g. the main branch's) in turns with it, run for run: the fair before/after. Python writes its bytecode caches as an installed package has them (the warm-up run writes
them); `--no-bytecode-cache` keeps PYTHONDONTWRITEBYTECODE as the environment sets it, so that a
checkout without caches compiles every module at every start.

The parsed-file cache (composer/parse_cache.py) and the check-result cache (composer/check_cache.py)
are timed several ways for the zoo's check: warm (the entries the warm-up run wrote: every result
printed again), one file edited (a copy of blueprints/ whose swin.arch changes before every run:
that file checked, the others printed again), no kept results (the warm parsed-file cache, an
empty result cache: every file checked, as before the result cache), cold (both empty: parse and
write every file) and off (COMPOSER_NO_CACHE=1); the other commands run warm, and `info swin_t`
is compared with a check of swin.arch that checks it (no kept results). `check blueprints` checks its
files on the machine's cores (composer/check_jobs.py); the `one process` row sets COMPOSER_JOBS=1.
Every run gets a cache folder of its own under a temporary folder, never the user's.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CODE = textwrap.dedent("""
    import sys, time
    sys.modules["torch"] = None               # prove the check path never needs torch
    t0, c0 = time.perf_counter(), time.process_time()
    import composer, composer.resolve as R
    from composer.api import zoo_files
    from pathlib import Path
    t1, c1 = time.perf_counter(), time.process_time()
    files = sorted(Path("blueprints").rglob("*.arch")) + sorted(Path("examples").rglob("*.arch"))
    models = 0
    for f in files:
        for m in R.load(f).file.models:
            composer.load(f"{f}:{m.name}")
            models += 1
    t2, c2 = time.perf_counter(), time.process_time()
    print(f"{len(files)} files, {models} models")
    print(f"import: {t1 - t0:.3f} s   check (parse, resolve, infer shapes): {t2 - t1:.3f} s")
    print(f"cpu: import {c1 - c0:.3f} s   check {c2 - c1:.3f} s   total {c2 - c0:.3f} s")
    print(f"total in process: {t2 - t0:.3f} s")
""")

# (label, argv, extra environment, the caches at every run: "warm" as the warm-up run left them;
# "cold" empty; "results" the warm parsed-file cache but no kept results: every file checked;
# "edited" warm, in a copy of blueprints/ whose swin.arch gets a new comment line before each run)
COMMANDS = [
    ("check blueprints", ["check", "blueprints"], {}, "warm"),
    ("check blueprints (one file edited)", ["check", "{copy}"], {}, "edited"),
    ("check blueprints (no kept results)", ["check", "blueprints"], {}, "results"),
    ("check blueprints (cold caches)", ["check", "blueprints"], {}, "cold"),
    ("check blueprints (caches off)", ["check", "blueprints"], {"COMPOSER_NO_CACHE": "1"}, "warm"),
    ("check blueprints (no kept results, one process)", ["check", "blueprints"], {"COMPOSER_JOBS": "1"}, "results"),
    ("check blueprints/swin.arch", ["check", "blueprints/swin.arch"], {}, "warm"),
    ("check blueprints/swin.arch (no kept results)", ["check", "blueprints/swin.arch"], {}, "results"),
    ("info swin_t", ["info", "swin_t"], {}, "warm"),
    ("list ops", ["list", "ops"], {}, "warm"),
]


def in_process(repo: Path, env: dict) -> None:
    best = None
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", CODE], cwd=repo, capture_output=True, text=True, check=True,
                             env=env)
        total = float(out.stdout.strip().splitlines()[-1].split()[-2])
        if best is None or total < best[0]:
            best = (total, out.stdout)
    print(best[1].rstrip())
    print(f"best of 3: {best[0]:.3f} s")


def whole_process(repos: list[Path], envs: list[dict], argv: list[str], runs: int, mode: str,
                  scratch: Path) -> list[tuple[float, float, float, float]]:
    """(median wall, min wall, median cpu, min cpu) of `python -m composer ARGV` run `runs` times in
    each checkout of `repos`, their runs taking turns (so that a change of the machine's load
    falls on all of them alike)."""
    copies = []
    for i, repo in enumerate(repos):  # "edited": a copy of the checkout's blueprints
        copy = scratch / f"blueprints-{i}"
        if mode == "edited" and not copy.exists():
            shutil.copytree(repo / "blueprints", copy)
        copies.append(copy)
    cmds = [[sys.executable, "-m", "composer", *(str(c) if a == "{copy}" else a for a in argv)] for c in copies]
    for cmd, repo, env in zip(cmds, repos, envs):  # warm-up: bytecode caches, the warm caches
        subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = [[] for _ in repos]
    cpu = [[] for _ in repos]
    for k in range(runs):
        for i, (cmd, repo, env) in enumerate(zip(cmds, repos, envs)):
            if mode in ("cold", "results"):
                run_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-{i}-", dir=scratch))
                if mode == "results" and (Path(env["COMPOSER_CACHE_DIR"]) / "parse").is_dir():
                    shutil.copytree(Path(env["COMPOSER_CACHE_DIR"]) / "parse", run_dir / "parse")
                env = dict(env, COMPOSER_CACHE_DIR=str(run_dir))
            if mode == "edited":
                with open(copies[i] / "swin.arch", "a") as fh:
                    fh.write(f"# run {k}\n")
            before, t = os.times(), time.perf_counter()
            done = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
            wall[i].append(time.perf_counter() - t)
            after = os.times()
            cpu[i].append(after.children_user - before.children_user + after.children_system - before.children_system)
            if done.returncode != 0:
                raise SystemExit(f"composer {' '.join(argv)} failed in {repo}:\n{done.stderr}")
    return [(statistics.median(w), min(w), statistics.median(c), min(c)) for w, c in zip(wall, cpu)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout to time (default: this one)")
    ap.add_argument("--against", type=Path, default=None,
                    help="another checkout (e.g. the main branch's) timed in turns with --repo: a before/after")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="keep PYTHONDONTWRITEBYTECODE from the environment (every module compiled at start)")
    ap.add_argument("--no-in-process", action="store_true", help="only the whole processes")
    args = ap.parse_args()
    repos = [args.repo.resolve()] + ([args.against.resolve()] if args.against else [])
    scratch = Path(tempfile.mkdtemp(prefix="check_speed."))
    envs = []
    for i, repo in enumerate(repos):
        env = dict(os.environ, PYTHONPATH=str(repo), COMPOSER_CACHE_DIR=str(scratch / f"warm-{i}"))
        if not args.no_bytecode_cache:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        envs.append(env)
    print(f"bytecode caches: {'off' if envs[0].get('PYTHONDONTWRITEBYTECODE') else 'on'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if not args.no_in_process:
        for repo, env in zip(repos, envs):
            print(f"\nin process, {repo}:")
            in_process(repo, env)
    print(f"\nwhole processes, {args.runs} runs each: wall median / min, cpu median / min (s)")
    results = {}
    try:
        for label, argv, extra, mode in COMMANDS:
            rows = whole_process(repos, [dict(env, **extra) for env in envs], argv, args.runs, mode, scratch)
            results[label] = rows[0]
            for repo, r in zip(repos, rows):
                where = f"  [{repo.name}]" if len(repos) > 1 else ""
                print(f"  composer {label:<48} wall {r[0]:.3f} / {r[1]:.3f}   cpu {r[2]:.3f} / {r[3]:.3f}{where}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    info, check = results["info swin_t"], results["check blueprints/swin.arch (no kept results)"]
    print(f"{repos[0].name}: info swin_t / check swin.arch (each checked, no kept results): cpu median "
          f"{info[2] / check[2]:.2f}, wall median {info[0] / check[0]:.2f} (target <= 1.5)")
    for label in ("check blueprints", "check blueprints (one file edited)", "check blueprints (no kept results)"):
        zoo = results[label]
        print(f"{repos[0].name}: {label}: wall median {zoo[0]:.3f} s, cpu median {zoo[2]:.3f} s (target <= 0.6 s)")


if __name__ == "__main__":
    main()
