"""`composer check FOLDER` on several processes (composer/check_jobs.py) prints what one process
prints, in the same order, with the same exit status; a forked run that warns, fails unexpectedly
or dies is checked again by the calling process."""

from __future__ import annotations

import os
import shutil
import sys
import warnings

import pytest

from composer import check_jobs
from composer.cli import main
from composer.diagnostics import ComposerWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_folder_output_equals_one_process(tmp_path, monkeypatch, capsys):
    """Small zoo files, a syntax error and a shape error, in 3 processes and in 1."""
    for name in ("resnet.arch", "convnext.arch", "mlp_mixer.arch", "mobilenetv2.arch"):
        shutil.copy(os.path.join(ROOT, "blueprints", name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "blueprints", "lib"), tmp_path / "lib")
    (tmp_path / "bad_syntax.arch").write_text("model m {\n    stem { conv(8,, }\n}\n")
    (tmp_path / "bad_name.arch").write_text(
        "model m {\n    input image(3, 32)\n    stem { conv(8, 3); no_such_op }\n"
        "    head { global_pool(\"avg\"); classifier(10) }\n}\n")
    monkeypatch.setenv("COMPOSER_NO_CACHE", "1")
    outs = []
    for jobs in ("1", "3"):
        monkeypatch.setenv("COMPOSER_JOBS", jobs)
        code = main(["check", str(tmp_path)])
        outs.append((code, *capsys.readouterr()))
    assert outs[0] == outs[1]
    code, out, err = outs[0]
    assert code == 2 and "bad_syntax.arch:2" in err and "bad_name.arch" in err
    assert out.count("ok  ") == len([ln for ln in out.splitlines() if ln.startswith("ok")]) > 10


def record(items, jobs, monkeypatch, capsys, check):
    monkeypatch.setenv("COMPOSER_JOBS", str(jobs))
    with warnings.catch_warnings():  # a fresh "shown once" registry for each run
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *a, **k: print(message, file=sys.stderr)
        failures = check_jobs.run(items, check, [1] * len(items))
    return failures, *capsys.readouterr()


@pytest.mark.parametrize("jobs", [2, 3, 4])
def test_warning_and_unexpected_error_are_redone_here(jobs, monkeypatch, capsys):
    parent = os.getpid()
    redone = []

    def check(i):
        print(f"item {i}")
        if i in (1, 5):  # the same warning twice: shown once, as in one process
            warnings.warn(ComposerWarning("lib.arch:3:5: warning: deprecated"), stacklevel=1)
        if i == 7:
            if os.getpid() != parent:
                raise RuntimeError("only in the forked process")
            redone.append(i)
        if i == 9 and os.getpid() != parent:
            os._exit(3)  # a forked process that dies: its run is checked here
        print(f"error {i}", file=sys.stderr) if i % 3 == 0 else None
        return int(i % 3 == 0)

    items = list(range(12))
    one = record(items, 1, monkeypatch, capsys, check)
    redone.clear()
    several = record(items, jobs, monkeypatch, capsys, check)
    assert several == one
    assert one[0] == 4 and one[2].count("deprecated") == 1
    assert redone == [7]


@pytest.mark.parametrize("weights, n, runs", [
    ([1] * 6, 3, [(0, 2), (2, 4), (4, 6)]),
    ([10, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2, [(0, 1), (1, 10)]),
    ([1, 1], 2, [(0, 1), (1, 2)]),
])
def test_split(weights, n, runs):
    assert check_jobs._split(weights, n) == runs


def test_board_hands_out_each_index_once():
    """The forward and backward workers of a segment, taking turns: every index once, in the
    forward worker's order from the start and the backward one's from the end."""
    board = check_jobs._Board([(0, 7), (7, 10)])
    for seg, (lo, hi) in enumerate(board.segments):
        fwd, back = board.claims(seg, False), board.claims(seg, True)
        took = {False: [], True: []}
        for turn in range(20):
            backward = turn % 3 == 2  # the forward worker twice as fast
            nxt = next(back if backward else fwd, None)
            if nxt is not None:
                took[backward].append(nxt)
        assert took[False] == list(range(lo, lo + len(took[False])))
        assert took[True] == list(range(hi - 1, hi - 1 - len(took[True]), -1))
        assert sorted(took[False] + took[True]) == list(range(lo, hi))


def test_slow_worker_takes_fewer_files(monkeypatch, capsys):
    """The calling process checks slowly: the forked one, working from the other end, takes most
    files, and the output is still in order, each file once."""
    parent = os.getpid()

    def check(i):
        if os.getpid() == parent:
            import time
            time.sleep(0.2)
        print(f"item {i} {'here' if os.getpid() == parent else 'forked'}")
        return 0

    failures, out, _ = record(list(range(12)), 2, monkeypatch, capsys, check)
    lines = out.splitlines()
    assert failures == 0 and [ln.split()[1] for ln in lines] == [str(i) for i in range(12)]
    assert sum(ln.endswith("here") for ln in lines) <= 4  # 6 each with a fixed split


def test_files_no_worker_took_are_checked_here(monkeypatch, capsys):
    """Two workers that reach for the same file at once may both leave it: the calling process
    checks it, in its place."""
    claims = check_jobs._Board.claims

    def leaving_five(self, seg, backward):  # each worker stops where it meets file 5
        for i in claims(self, seg, backward):
            if i == 5:
                return
            yield i

    monkeypatch.setattr(check_jobs._Board, "claims", leaving_five)

    def check(i):
        print(f"item {i}")
        return int(i == 5)

    items = list(range(10))
    one = record(items, 1, monkeypatch, capsys, check)
    assert record(items, 2, monkeypatch, capsys, check) == one
    assert one[0] == 1 and one[1].splitlines() == [f"item {i}" for i in range(10)]
