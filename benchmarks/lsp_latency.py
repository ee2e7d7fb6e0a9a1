"""How long the language server takes to re-check an edited zoo file (target: <= 50 ms median).

Run: python benchmarks/lsp_latency.py [--repeat 3] [FILE ...]

For every zoo file (blueprints/*.arch, or the files named) the server's checking function
(`composer.lsp_check.Checker.check`, what runs on every didChange) opens the file's text once (its
imports are then loaded and cached), then re-checks it after small edits of two kinds, reported
apart: a comment appended (nothing the models are made of changes: they are reused and only the
parse is paid), and an int literal in the middle of the file changed (plus one, then back: the
models made of that definition are planned again, the others reused). Each re-check is timed
with a monotonic clock (wall) and as the process's CPU time (which a busy shared machine disturbs
less). It prints each file's medians and the medians over the files, and the diagnostics count
after the number edit (a changed number may make a model invalid, which is still a check). No
torch is imported: the check path runs as the server runs it.
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


def number_edits(text: str) -> list[str]:
    """The text with an int literal in the middle of the file changed (plus one), and back."""
    numbers = [m for m in _NUMBER.finditer(text) if not text[:m.start()].rsplit("\n", 1)[-1].lstrip().startswith("#")]
    if not numbers:
        return []
    m = numbers[len(numbers) // 2]  # a width, a depth, a kernel ... of one model or composite
    return [text[:m.start()] + str(int(m.group()) + 1) + text[m.end():], text]


def timed(checker: Checker, path: Path, texts: list[str]) -> tuple[list, list, list]:
    wall, cpu, problems = [], [], []
    for edited in texts:
        t0, c0 = time.perf_counter(), time.process_time()
        a = checker.check(str(path), edited)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        problems.append(len(a.problems))
    return wall, cpu, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="files to edit (default: every blueprints/*.arch)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of edits per file (default 3)")
    args = ap.parse_args(argv)
    files = [Path(f).resolve() for f in args.files] or sorted((REPO / "blueprints").glob("*.arch"))
    checker = Checker()
    rows = []
    print(f"{'file':24} {'models':>6} {'open':>6} | {'comment: wall':>13} {'cpu':>5} | {'number: wall':>12} {'cpu':>5}"
          "  problems after the number edit")
    for path in files:
        text = path.read_text()
        t0 = time.perf_counter()
        first = checker.check(str(path), text)  # open: imports loaded from disk and cached
        opened = (time.perf_counter() - t0) * 1e3
        comments = [text + f"\n# edit {i}\n" for i in range(args.repeat)]
        cw, cc, _ = timed(checker, path, comments)
        nw, nc, problems = timed(checker, path, number_edits(text) * args.repeat)
        row = [statistics.median(v) for v in (cw, cc, nw or [0.0], nc or [0.0])]
        rows.append(row)
        print(f"{path.name:24} {len(first.plans):6d} {opened:6.1f} | {row[0]:13.1f} {row[1]:5.1f} | {row[2]:12.1f} "
              f"{row[3]:5.1f}  {problems[:2]}")
    med = [statistics.median(r[i] for r in rows) for i in range(4)]
    worst = [max(r[i] for r in rows) for i in range(4)]
    print(f"\nmedian over {len(files)} files (ms): comment appended {med[0]:.1f} wall, {med[1]:.1f} CPU; "
          f"number changed {med[2]:.1f} wall, {med[3]:.1f} CPU")
    print(f"worst file (ms): comment {worst[0]:.1f} wall, {worst[1]:.1f} CPU; number {worst[2]:.1f} wall, "
          f"{worst[3]:.1f} CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
