"""Checking many blueprint files on several cores: `composer check FOLDER` splits its files into
consecutive runs, forks a process per run after the first (which it checks itself), then prints
the others' output in order, exactly as one process would have printed it.

A forked process writes nothing itself: it records what its checks write to stdout and stderr
and sends it back. It stops at the first file whose check does anything a record cannot repeat
faithfully (a Python warning, whose once-only bookkeeping is per process; any exception other
than a located user error) and the calling process checks that file and those after it itself,
so such a file behaves as without forking. A process that dies or sends nothing is redone the
same way. Used only where `os.fork` exists, with more than one core, in a process without other
threads; `COMPOSER_JOBS=N` sets the number of processes (1: never fork).
"""

from __future__ import annotations

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
    """`sum(check(item) for item in items)`, in item order, the runs after the first in forked
    processes. `check(item)` prints its output and returns how many failures it had; `weights`
    (e.g. file sizes) balance the runs."""
    n = jobs(len(items))
    if n == 1:
        return sum(check(it) for it in items)
    runs = _split(weights, n)
    sys.stdout.flush()
    sys.stderr.flush()
    children = []  # (first item, end, pid, pipe) of each forked run not yet collected
    try:
        for lo, hi in runs[1:]:
            children.append((lo, hi, *_fork(items[lo:hi], check)))
        lo, hi = runs[0]
        failures = sum(check(it) for it in items[lo:hi])
        while children:
            lo, hi, pid, fd = children[0]
            done = _receive(fd)
            _reap(pid, fd, kill=False)
            children.pop(0)
            for events, failed in done:
                for stream, text in events:
                    (sys.stdout if stream == 1 else sys.stderr).write(text)
                failures += failed
            failures += sum(check(it) for it in items[lo + len(done):hi])  # what it left: here
        return failures
    finally:
        for _, _, pid, fd in children:  # an error or Ctrl-C here: the others are stopped
            _reap(pid, fd, kill=True)


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


class _Unfaithful(Exception):
    """The check did something the record cannot repeat: it is done again by the caller."""


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


def _fork(items: list, check) -> tuple[int, int]:
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
        for it in items:
            try:
                failed = check(it)
            except BaseException:  # noqa: BLE001 - the caller checks this item again and sees it
                break
            if tainted:
                break
            done.append((list(events), failed))
            events.clear()
        with os.fdopen(write, "wb") as fh:
            pickle.dump(done, fh, protocol=pickle.HIGHEST_PROTOCOL)
        status = 0
    finally:
        os._exit(status)


def _receive(fd: int) -> list:
    """What a forked run sent: (events, failures) for its first files; [] if nothing came."""
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
