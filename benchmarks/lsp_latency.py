"""How long the language server takes to re-check an edited zoo file (target: <= 50 ms median).

Run: python benchmarks/lsp_latency.py [--repeat 5] [FILE ...]

For every zoo file (blueprints/*.arch, or the files named) the server's checking function
(`composer.lsp_check.Checker.check`, what runs on every didChange) opens the file's text once (its
imports are then loaded and cached), then re-checks it after small edits: a comment appended,
then a number changed (the last `repeat` count or int literal of the file, plus one, then back),
each re-check timed with a monotonic clock (wall) and as the process's CPU time (which a busy
shared machine disturbs less). It prints each file's medians and the median over the files; the edit's diagnostics count is printed too (a changed number may make a model invalid,
which is still a check). No torch is imported: the check path runs as the server runs it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.modules["torch"] = None  # the server never needs torch; prove it here too

from composer.lsp_check import Checker  # noqa: E402

_NUMBER = re.compile(r"(?<![\w.])(\d+)(?![\w.])")


def edits(text: str, n: int) -> list[str]:
    """n edited versions of `text`: comments appended, and one int literal changed."""
    out = [text + f"\n# edit {i}\n" for i in range(n)]
    numbers = [m for m in _NUMBER.finditer(text) if not text[:m.start()].rsplit("\n", 1)[-1].lstrip().startswith("#")]
    if numbers:
        m = numbers[len(numbers) // 2]  # a number in the middle of the file (a width, a depth ...)
        out.append(text[:m.start()] + str(int(m.group()) + 1) + text[m.end():])
        out.append(text)  # and back
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="files to edit (default: every blueprints/*.arch)")
    ap.add_argument("--repeat", type=int, default=5, help="comment edits per file (default 5)")
    args = ap.parse_args(argv)
    files = [Path(f).resolve() for f in args.files] or sorted((REPO / "blueprints").glob("*.arch"))
    checker = Checker()
    medians, cpu_medians = [], []
    print(f"{'file':28} {'models':>6} {'first ms':>9} {'median ms':>10} {'max ms':>8} {'cpu ms':>7}  "
          "problems after edits")
    for path in files:
        text = path.read_text()
        t0 = time.perf_counter()
        first = checker.check(str(path), text)  # open: imports loaded from disk and cached
        first_ms = (time.perf_counter() - t0) * 1e3
        times, cpu, problems = [], [], []
        for edited in edits(text, args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            a = checker.check(str(path), edited)
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            problems.append(len(a.problems))
        med = statistics.median(times)
        medians.append(med)
        cpu_medians.append(statistics.median(cpu))
        print(f"{path.name:28} {len(first.plans):6d} {first_ms:9.1f} {med:10.1f} {max(times):8.1f} "
              f"{cpu_medians[-1]:7.1f}  {problems}")
    print(f"\nmedian over {len(files)} files: {statistics.median(medians):.1f} ms wall, "
          f"{statistics.median(cpu_medians):.1f} ms CPU (worst file {max(medians):.1f} ms wall, "
          f"{max(cpu_medians):.1f} ms CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
