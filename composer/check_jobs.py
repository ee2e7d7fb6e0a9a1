"""Checking many blueprint files on several cores: `composer check FOLDER` forks processes that
check its files, then prints their output in order, exactly as one process would have printed it.

The files are split into consecutive segments of about equal weight, each worked on by two
processes, one from its first file forward and one from its last file backward, until they meet:
whichever finishes its files sooner takes more of them, so both end at about the same time. The
calling process works forward through the first segment, printing as it goes. Each process
publishes the next file it takes in a shared board; two that reach for the same file at the same
moment may both check it (one result is used) or both leave it (the calling process checks it).

A forked process writes nothing itself: it records what its checks write to stdout and stderr and
sends it back. It stops at the first file whose check does anything a record cannot repeat
faithfully (a Python warning, whose once-only bookkeeping is per process; any exception other
than a located user error). The calling process then checks, in order, every file no process
checked faithfully, so such a file behaves as without forking; a process that dies or sends
nothing leaves its files to it the same way. Used only where `os.fork` exists, with more than one
core, in a process without other threads; `COMPOSER_JOBS=N` sets the number of processes (1:
never fork).
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import sys
import threading
import warnings

MIN_FILES = 8  # fewer files than this are checked in one process unless COMPOSER_JOBS asks otherwise
MAX_JOBS = 4


def jobs(count: int) -> int:
    """How many processes check `count` files."""
    asked = os.environ.get("COMPOSER_JOBS", "").strip()
    if not hasattr(os, "fork") or threading.active_count() > 1 or count < 2:
        return 1
    if asked:
        try:
            return max(1, min(int(asked), count, 64))
        except ValueError:
            return 1
    if count < MIN_FILES:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_JOBS, count))


def run(items: list, check, weights: list[int]) -> int:
    """`sum(check(item) for item in items)`, printed in item order, on `jobs()` processes.
    `check(item)` prints its output and returns how many failures it had; `weights` (e.g. file
    sizes) balance the segments."""
    n = jobs(len(items))
    if n == 1:
        return sum(check(it) for it in items)
    runs = _split(weights, n)  # paired into segments: a forward and a backward worker each
    segments = [(runs[k][0], runs[min(k + 1, len(runs) - 1)][1]) for k in range(0, len(runs), 2)]
    workers = [(seg, backward) for seg in range(len(segments)) for backward in (False, True)][:len(runs)]
    board = _Board(segments)
    sys.stdout.flush()
    sys.stderr.flush()
    children = []  # (pid, pipe) of each forked worker not yet collected
    try:
        for seg, backward in workers[1:]:
            children.append(_fork(items, check, board.claims(seg, backward)))
        failures, here = 0, 0  # the first segment, forward, printed as it goes
        for i in board.claims(0, False):
            failures += check(items[i])
            here = i + 1
        found: dict = {}  # item index -> (events, failures) a forked worker recorded
        while children:
            pid, fd = children[0]
            for i, events, failed in _receive(fd):
                found.setdefault(i, (events, failed))
            _reap(pid, fd, kill=False)
            children.pop(0)
        for i in range(here, len(items)):  # the rest in order: recorded, or checked here
            if i in found:
                events, failed = found[i]
                for stream, text in events:
                    (sys.stdout if stream == 1 else sys.stderr).write(text)
                failures += failed
            else:
                failures += check(items[i])
        return failures
    finally:
        for pid, fd in children:  # an error or Ctrl-C here: the others are stopped
            _reap(pid, fd, kill=True)


class _Board:
    """The progress of every segment's two workers, in memory shared with the forked processes:
    the next index the forward worker takes (one past what it has taken) and the last index the
    backward worker has taken. Each number has one writer; a worker takes an index, then stops if
    the other has taken it too (both may, at the same moment: a file checked twice or by neither,
    which `run` handles)."""

    def __init__(self, segments: list[tuple[int, int]]):
        self.segments = segments
        self._mem = mmap.mmap(-1, 16 * len(segments))  # anonymous and shared: seen after fork
        self.marks = memoryview(self._mem).cast("q")
        for k, (lo, hi) in enumerate(segments):
            self.marks[2 * k], self.marks[2 * k + 1] = lo, hi

    def claims(self, seg: int, backward: bool):
        """The indices a worker of segment `seg` checks, taken one at a time."""
        lo, hi = self.segments[seg]
        marks, mine, theirs = self.marks, 2 * seg + backward, 2 * seg + (not backward)
        if backward:
            for j in range(hi - 1, lo - 1, -1):
                marks[mine] = j
                if j < marks[theirs]:
                    return
                yield j
        else:
            for i in range(lo, hi):
                marks[mine] = i + 1
                if i >= marks[theirs]:
                    return
                yield i


def _split(weights: list[int], n: int) -> list[tuple[int, int]]:
    """`n` consecutive runs of about equal total weight, each of at least one item."""
    total = sum(weights) or 1
    bounds, acc, k = [0], 0, 1
    for i, w in enumerate(weights):
        acc += w
        if k < n and acc >= total * k / n and i + 1 < len(weights) - (n - k - 1):
            bounds.append(i + 1)
            k += 1
    while len(bounds) < n:  # fewer weights than runs asked (cannot happen: n <= len(items))
        bounds.append(bounds[-1])
    bounds.append(len(weights))
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class _Recorder:
    """A stand-in for stdout or stderr that keeps what is written, in order, in `events`."""

    def __init__(self, stream: int, real, events: list):
        self.stream, self.real, self.events = stream, real, events

    def write(self, text: str) -> int:
        self.events.append((self.stream, text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.real.isatty()

    def __getattr__(self, name):  # encoding, errors, fileno ...: the real stream's
        return getattr(self.real, name)


def _fork(items: list, check, claims) -> tuple[int, int]:
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        return pid, read
    status = 1
    try:  # the child: never returns, never runs the parent's exit handlers
        os.close(read)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: the parent reports it
        done = []
        events: list = []
        tainted = []
        sys.stdout = _Recorder(1, sys.stdout, events)
        sys.stderr = _Recorder(2, sys.stderr, events)
        warnings.showwarning = lambda *a, **k: tainted.append(True)
        for i in claims:
            try:
                failed = check(items[i])
            except BaseException:  # noqa: BLE001 - the caller checks this item again and sees it
                break
            if tainted:
                break
            done.append((i, list(events), failed))
            events.clear()
        with os.fdopen(write, "wb") as fh:
            pickle.dump(done, fh, protocol=pickle.HIGHEST_PROTOCOL)
        status = 0
    finally:
        os._exit(status)


def _receive(fd: int) -> list:
    """What a forked worker sent: (index, events, failures) for the files it checked; [] if nothing came."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        done = pickle.loads(b"".join(chunks))
        return done if isinstance(done, list) else []
    except Exception:  # noqa: BLE001 - a process that died half way: its run is checked here
        return []


def _reap(pid: int, fd: int, kill: bool) -> None:
    """Close the pipe and wait for the process (stopped first when `kill`)."""
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        if kill:
            os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except OSError:
        pass
