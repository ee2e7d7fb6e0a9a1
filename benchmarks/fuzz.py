"""Fuzz `composer check` with mutated zoo blueprints; count the outcomes.

Run: python benchmarks/fuzz.py N [--seed S] [--jobs J] [--keep DIR] [--case I ...]

N cases (benchmarks/fuzz_cases.py makes them: token, line and hostile mutations of every zoo
file and its YAML twin), each checked as `composer check FILE` does, and counted as one of:

  accepted      exit 0
  located       exit 2 with a `file:line:col: error:` line
  unlocated     exit 2 without one
  exit 3        an internal error (any other status, or a crashed checker)
  over 1 s      the check took over 1 s of CPU (or was killed at --hard-limit s of wall time)
  over 300 MB   the check needed more than 300 MB over what the checker held before it
                (RLIMIT_AS: a MemoryError)

The target (issue 15): zero in the last four columns. The run is deterministic given the seed;
`--case I` runs only case I (again), and `--keep DIR` writes every failing case to DIR/case-I/
with the command that replays it (DIR/case-I/command).

The checks run in J worker processes (default 1: the machine's cores are shared), each checking
its cases in-process (torch is never imported) and replaced every 200 cases, after any failing
case (a memory error or the CPU timer's exception can leave its interpreter broken), or when
killed for time.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from multiprocessing.connection import wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_cases import OUTCOMES, REPO, Corpus, classify, make_case  # noqa: E402

COLUMNS = {"accepted": "accepted", "located": "located exit 2", "unlocated": "unlocated exit 2",
           "exit3": "exit 3", "slow": "over 1 s", "memory": "over 300 MB"}
TIME_LIMIT_S = 1.0
MEMORY_LIMIT = 300 * 2**20
CHUNK = 200  # cases per worker process
CLEAN = ("accepted", "located")  # after any other outcome the worker is replaced


class CaseTimeout(BaseException):
    """Raised by the CPU timer inside a case (a BaseException: composer's handlers let it through)."""


def _vm_size() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _forget(folder: Path) -> None:
    """Drop what composer cached about the files of a finished case (its caches are per path)."""
    import composer.loader as loader
    import composer.source as source

    prefix = str(folder)
    loader.forget(prefix)
    for key in [k for k in source.SOURCES if k.startswith(prefix)]:
        del source.SOURCES[key]


def _out_of_time(signum, frame):
    raise CaseTimeout()


def check_case(case, folder: Path, hard_cpu: float) -> dict:
    """Check one case in this process, as `composer check FILE`, under the memory limit."""
    from composer import cli

    target = case.write(folder)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    out, err = io.StringIO(), io.StringIO()
    signal.signal(signal.SIGVTALRM, _out_of_time)
    c0, t0 = time.process_time(), time.perf_counter()
    rc = None
    try:
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + MEMORY_LIMIT, hard))
        signal.setitimer(signal.ITIMER_VIRTUAL, hard_cpu)
        with redirect_stdout(out), redirect_stderr(err):
            rc = cli.main(["--debug", "check", str(target)])  # --debug: the traceback of an exit 3
    except CaseTimeout:
        rc = "timeout"
    except MemoryError:
        rc = "memory"
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    text = err.getvalue()
    if rc == "memory" or (rc == 3 and "MemoryError" in text):
        outcome = "memory"
    elif rc == "timeout" or cpu > TIME_LIMIT_S:
        outcome = "slow"
    else:
        outcome = classify(rc, text)
    _forget(folder)
    return {"index": case.index, "label": case.label, "rc": rc, "outcome": outcome, "cpu": cpu, "wall": wall,
            "stderr": text[-2000:]}


def _worker(conn, corpus, seed: int, hard_cpu: float, scratch: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    done = 0
    while done < CHUNK:
        index = conn.recv()
        if index is None:
            return
        folder = Path(scratch) / f"case-{index}"
        result = check_case(make_case(corpus, seed, index), folder, hard_cpu)
        shutil.rmtree(folder, ignore_errors=True)
        conn.send(result)
        done += 1
        if result["outcome"] not in CLEAN:
            return  # a memory error or a timer's exception inside C code can leave it broken: replace it


class Pool:
    """J workers, each fed one case at a time; a worker over the wall limit is killed and replaced."""

    def __init__(self, jobs, corpus, seed, hard_limit, scratch):
        self.ctx = mp.get_context("fork")
        self.args = (corpus, seed, hard_limit, scratch)
        self.hard_limit = hard_limit
        self.slots = [self._start() for _ in range(jobs)]

    def _start(self):
        mine, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(theirs, *self.args), daemon=True)
        proc.start()
        theirs.close()
        return {"proc": proc, "conn": mine, "index": None, "since": 0.0, "done": 0}

    def _restart(self, s, kill=False):
        if kill:
            s["proc"].kill()
        s["proc"].join()
        s.update(self._start())

    def run(self, indices, report):
        todo = list(indices)[::-1]
        while todo or any(s["index"] is not None for s in self.slots):
            for s in self.slots:
                if s["index"] is None and todo:
                    s["index"], s["since"] = todo.pop(), time.perf_counter()
                    s["conn"].send(s["index"])
            busy = [s for s in self.slots if s["index"] is not None]
            ready = wait([s["conn"] for s in busy] + [s["proc"].sentinel for s in busy], timeout=0.2)
            for s in busy:
                result = None
                if s["conn"] in ready:
                    try:
                        result = s["conn"].recv()
                    except (EOFError, OSError):  # the worker died in the case: reported below
                        s["proc"].join(1)
                if result is not None:
                    report(result)
                    s["index"], s["done"] = None, s["done"] + 1
                    if s["done"] >= CHUNK or result["outcome"] not in CLEAN:  # the worker ends: replace it
                        self._restart(s)
                    continue
                late = time.perf_counter() - s["since"] > self.hard_limit
                if late or not s["proc"].is_alive():
                    if not late:
                        s["proc"].join(1)
                    code = s["proc"].exitcode
                    report({"index": s["index"], "label": None, "rc": None, "cpu": None,
                            "wall": time.perf_counter() - s["since"],
                            "outcome": "slow" if late else "exit3",
                            "stderr": f"killed after {self.hard_limit} s" if late else
                            f"the checker died (exit status {code})"})
                    self._restart(s, kill=True)

    def close(self):
        for s in self.slots:
            if s["proc"].is_alive():
                try:
                    s["conn"].send(None)
                except OSError:
                    pass
                s["proc"].join(2)
                if s["proc"].is_alive():
                    s["proc"].kill()


FRAME = re.compile(r'File "[^"]*?(composer/[^"]+)", line (\d+), in (\w+)')


def summary(result: dict) -> tuple[str, str]:
    """The first error line of a failing case, and its class: the outcome, the error with its
    numbers left out, and for a traceback the innermost frame in composer."""
    lines = result["stderr"].splitlines()
    first = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else f"(exit {result['rc']})")
    what = re.sub(r"\d+", "N", first.split("error: ", 1)[-1].split(" (please report")[0])[:80]
    frames = FRAME.findall(result["stderr"])
    where = f" at {frames[-1][0]}:{frames[-1][2]}" if frames else ""
    return first, f"{COLUMNS[result['outcome']]}: {what}{where}"


def keep_case(case, result: dict, keep: Path) -> None:
    folder = keep / f"case-{case.index}"
    shutil.rmtree(folder, ignore_errors=True)
    target = case.write(folder)
    command = f"PYTHONPATH={REPO} {sys.executable} -m composer check {target}"
    (folder / "command").write_text(command + "\n")
    (folder / "result.txt").write_text(f"{case.label}\noutcome: {result['outcome']}  rc: {result['rc']}  "
                                       f"cpu: {result['cpu']}  wall: {result['wall']:.2f}\n\n{result['stderr']}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, help="number of cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--keep", type=Path, help="write each failing case (files, command, result) here")
    ap.add_argument("--case", type=int, action="append", help="run only this case (repeatable)")
    ap.add_argument("--hard-limit", type=float, default=10.0,
                    help="kill a check after this many seconds (wall clock and CPU; default 10)")
    ap.add_argument("--quiet", action="store_true", help="no line per failing case")
    ap.add_argument("--progress", type=int, default=0, metavar="K", help="print the counts every K cases")
    args = ap.parse_args(argv)
    sys.modules.setdefault("torch", None)  # the check path never needs torch: prove it
    os.chdir(REPO)
    corpus = Corpus()
    import composer.cli  # noqa: F401  (imported and the library parsed once, before the workers fork)
    import composer.loader

    for lib in sorted((REPO / "blueprints" / "lib").glob("*.arch")):
        composer.loader.load(lib)
    indices = args.case or range(args.n)
    counts = dict.fromkeys(OUTCOMES, 0)
    classes: dict[str, int] = {}
    t0 = time.perf_counter()

    def line() -> str:
        return "  ".join(f"{COLUMNS[k]}: {counts[k]}" for k in OUTCOMES)

    def report(result):
        counts[result["outcome"]] += 1
        done = sum(counts.values())
        if args.progress and done % args.progress == 0:
            print(f"[{done} cases, {time.perf_counter() - t0:.0f} s] {line()}", flush=True)
        if result["outcome"] in ("accepted", "located"):
            return
        case = make_case(corpus, args.seed, result["index"])
        first, key = summary(result)
        classes[key] = classes.get(key, 0) + 1
        if not args.quiet:
            print(f"case {result['index']}: {COLUMNS[result['outcome']]}: {case.label[:150]}\n    {first[:200]}",
                  flush=True)
        if args.keep:
            keep_case(case, result, args.keep)

    with tempfile.TemporaryDirectory(prefix="composer-fuzz-") as scratch:
        pool = Pool(max(1, args.jobs), corpus, args.seed, args.hard_limit, scratch)
        interrupted = False
        try:
            pool.run(indices, report)
        except KeyboardInterrupt:  # Ctrl-C: the counts of the cases done so far
            interrupted = True
        finally:
            pool.close()
    total = sum(counts.values())
    print(f"\n{total} cases{' (interrupted)' if interrupted else ''}, seed {args.seed}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(line())
    if classes:
        print("failures by first error line:")
        for key, n in sorted(classes.items(), key=lambda kv: -kv[1]):
            print(f"  {n:5d}  {key}")
    return 1 if any(counts[k] for k in ("unlocated", "exit3", "slow", "memory")) else 0


if __name__ == "__main__":
    sys.exit(main())
