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


def test_warning_and_unexpected_error_are_redone_here(monkeypatch, capsys):
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
    several = record(items, 3, monkeypatch, capsys, check)
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
