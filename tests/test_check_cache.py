"""The check-result cache (composer/check_cache.py): an unchanged file's check is printed again
without the op library; an edit of the file, of a file it imports, a file put where an import
looked first, other options or another composer make it checked again; errors and warnings are
never kept; a damaged entry is ignored."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from composer import check_cache, loader
from composer.cli import main

ROOT = Path(__file__).resolve().parent.parent

MAIN = """import "blocks"
model m(width = 4) {
    input image(3, 8)
    stem conv(width, 1)
    stage { block unit(width) }
    head { global_pool("avg"); classifier(2) }
}
"""
BLOCKS = "block unit(dim) {{ conv(dim, {k}, bias = false) }}\n"
# params by hand, width 4: stem 3*4 + 4 = 16; unit 4*4*k*k; classifier 4*2 + 2 = 10
PARAMS = {1: 16 + 16 + 10, 3: 16 + 144 + 10}
WIDE = (3 * 8 + 8) + 8 * 8 + (8 * 2 + 2)  # width 8, k 1


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own; files count as settled as soon as they are written."""
    monkeypatch.setenv("COMPOSER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("COMPOSER_NO_CACHE", raising=False)
    monkeypatch.setattr(loader, "RACY_NS", -10**12)  # the racy rule is tested on its own below
    return tmp_path / "cache" / "check"


def _check(capsys, *args):
    code = main(["check", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _project(tmp_path, k=1):
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    (folder / "main.arch").write_text(MAIN)
    (folder / "blocks.arch").write_text(BLOCKS.format(k=k))
    return folder


def test_an_edited_import_is_checked_again(cache, tmp_path, capsys):
    folder = _project(tmp_path)
    first = _check(capsys, folder)
    assert first[0] == 0 and f"main.arch:m  {PARAMS[1]} params" in first[1]
    assert len(list(cache.glob("*.json"))) == 2  # main.arch and blocks.arch (no models: one line)
    assert _check(capsys, folder) == first
    (folder / "blocks.arch").write_text(BLOCKS.format(k=3))
    again = _check(capsys, folder)
    assert again[0] == 0 and f"main.arch:m  {PARAMS[3]} params" in again[1]


def test_a_file_put_where_an_import_looked_first_is_seen(cache, tmp_path, capsys):
    """`import "lib/mobile"` finds the standard library's file; a lib/mobile.arch put beside the
    blueprint later is imported instead."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "m.arch").write_text(
        'import "lib/mobile"\nmodel m {\n    input image(3, 8)\n    stem conv_bn_act(4, 3)\n'
        '    head { global_pool("avg"); classifier(2) }\n}\n')
    code, out, _ = _check(capsys, folder / "m.arch")
    assert code == 0 and "m.arch:m  126 params" in out  # conv 3*4*9, batch norm 2*4, classifier 10
    (folder / "lib").mkdir()
    (folder / "lib" / "mobile.arch").write_text("block conv_bn_act(out, k) { conv(out, 1) }\n")
    code, out, _ = _check(capsys, folder / "m.arch")
    assert code == 0 and "m.arch:m  26 params" in out  # conv 3*4 + 4, classifier 10


def test_options_and_composer_are_part_of_the_key(cache, tmp_path, capsys, monkeypatch):
    folder = _project(tmp_path)
    plain = _check(capsys, folder / "main.arch")
    wide = _check(capsys, folder / "main.arch", "--set", "width=8")
    assert f"{PARAMS[1]} params" in plain[1] and f"{WIDE} params" in wide[1]
    entries = set(cache.glob("*.json"))
    monkeypatch.setitem(check_cache._state, "composer", b"another composer")
    assert _check(capsys, folder / "main.arch") == plain
    assert len(set(cache.glob("*.json")) - entries) == 1  # a new entry: the old one was not used


def test_errors_and_warnings_are_not_kept(cache, tmp_path, capsys):
    bad = tmp_path / "bad.arch"
    bad.write_text('model m {\n    input image(3, 8)\n    stem conv(4, 1)\n    stage { block nope(4) }\n}\n')
    first = _check(capsys, bad)
    assert first[0] == 2 and "bad.arch:4" in first[2]
    assert _check(capsys, bad) == first
    assert not cache.exists() or not list(cache.glob("*.json"))
    old = tmp_path / "old.arch"  # a deprecated spelling: its note is printed by every check
    old.write_text('model m {\n    input image(3, 8)\n    stem conv(6, 1)\n'
                   '    stage { block { parallel tokens { learned_tokens(6, 2); identity }; dynamic_relu(2) } }\n}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as in a fresh process, each time
        for _ in range(2):
            code, out, err = _check(capsys, old)
            assert code == 0 and "old.arch:4:73: warning: dynamic_relu reading" in err
    assert not cache.exists() or not list(cache.glob("*.json"))


@pytest.mark.parametrize("damage", ["garbage", "truncate", "other key", "bad events"])
def test_a_damaged_entry_is_ignored(cache, tmp_path, capsys, damage):
    folder = _project(tmp_path)
    first = _check(capsys, folder / "main.arch")
    (entry,) = cache.glob("*.json")
    data = entry.read_bytes()
    entry.write_bytes({"garbage": b"\x00\xff not json", "truncate": data[:len(data) // 2],
                       "other key": data[:len(check_cache.FORMAT)] + bytes(32) + data[len(check_cache.FORMAT) + 32:],
                       "bad events": data.replace(b'[[1, "ok', b'[[3, "ok')}[damage])
    assert _check(capsys, folder / "main.arch") == first
    assert entry.read_bytes() == data  # written again


def test_switched_off_and_racy_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMPOSER_CACHE_DIR", str(tmp_path / "cache"))
    folder = _project(tmp_path)
    monkeypatch.setenv("COMPOSER_NO_CACHE", "1")
    assert _check(capsys, folder)[0] == 0
    assert not (tmp_path / "cache" / "check").exists()
    monkeypatch.delenv("COMPOSER_NO_CACHE")
    assert _check(capsys, folder)[0] == 0  # the files were written just now: what was read may change again
    assert not list((tmp_path / "cache" / "check").glob("*.json"))


def test_an_unchanged_zoo_file_is_replayed_without_the_op_library(tmp_path):
    """Whole processes: the second check of a zoo file prints the same and imports neither the op
    library nor torch."""
    env = {**os.environ, "COMPOSER_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("COMPOSER_NO_CACHE", None)
    probe = ("import sys\nfrom composer.cli import main\ncode = main(['check', sys.argv[1]])\n"
             "print('loaded:', sorted(m for m in ('composer.ops', 'composer.resolve', 'torch', 'pydantic', 'lark')"
             " if m in sys.modules))\nsys.exit(code)\n")
    runs = [subprocess.run([sys.executable, "-c", probe, str(ROOT / "blueprints" / "mlp_mixer.arch")], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0]
    first, second = (r.stdout.rpartition("loaded:") for r in runs)
    assert first[0] == second[0] and first[0].count("ok  ") >= 2
    assert "composer.ops" in first[2] and second[2].strip() == "[]"
