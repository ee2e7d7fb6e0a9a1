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
    for target, models in [(str(ROOT / "blueprints" / "mlp_mixer.arch"), 3), ("mixer_s16", 1)]:  # a file, a zoo name
        runs = [subprocess.run([sys.executable, "-c", probe, target], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=120) for _ in range(2)]
        assert [r.returncode for r in runs] == [0, 0]
        first, second = (r.stdout.rpartition("loaded:") for r in runs)
        assert first[0] == second[0] and first[0].count("ok  ") == models
        assert "composer.ops" in first[2] and second[2].strip() == "[]"


def test_a_warning_python_did_not_show_is_not_kept(cache, tmp_path, capsys):
    """Python shows a deprecation note once per place: checking a.arch and b.arch, which both use
    lib.arch's deprecated spelling, shows it for a.arch only. b.arch's check issued it all the
    same, so it is not kept (a process that checks b.arch alone prints the note)."""
    (tmp_path / "lib.arch").write_text(
        "block old(d) { parallel tokens { learned_tokens(d, 2); identity }; dynamic_relu(2) }\n")
    for name in ("a", "b"):
        (tmp_path / f"{name}.arch").write_text(
            'import "lib"\nmodel m {\n    input image(3, 8)\n    stem conv(6, 1)\n    stage { block old(6) }\n}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # once per place and text, as in a fresh process
        code, out, err = _check(capsys, tmp_path / "a.arch", tmp_path / "b.arch")
    assert code == 0 and out.count(":m  36 params") == 2  # conv 3*6 + 6, dynamic_relu 6*2
    assert err.count("lib.arch:1:68: warning: dynamic_relu reading") == 1
    assert not cache.exists() or not list(cache.glob("*.json"))


def test_a_file_edited_between_its_lookup_and_its_check(cache, tmp_path, capsys, monkeypatch):
    """In a long folder's check the entries are looked up first and the files checked later: a
    file edited in between is kept with the text the check read, not the one looked up."""
    model = 'model m {{\n    input image(3, 8)\n    stem conv({w}, 1)\n    head {{ global_pool("avg"); classifier(2) }}\n}}\n'
    params = {w: 3 * w + w + 2 * w + 2 for w in (4, 5, 6)}  # stem conv and classifier, by hand
    f = tmp_path / "m.arch"
    f.write_text(model.format(w=4))
    assert f"{params[4]} params" in _check(capsys, f)[1]  # an entry for width 4
    f.write_text(model.format(w=5))  # looked up as width 5 (the entry is stale) ...
    record = check_cache.CheckCache.record

    def edited_before_the_check(self, target, check):
        f.write_text(model.format(w=6))  # ... and checked as width 6
        return record(self, target, check)

    monkeypatch.setattr(check_cache.CheckCache, "record", edited_before_the_check)
    assert f"{params[6]} params" in _check(capsys, f)[1]
    monkeypatch.setattr(check_cache.CheckCache, "record", record)
    f.write_text(model.format(w=5))
    assert f"{params[5]} params" in _check(capsys, f)[1]


def test_a_file_imported_under_two_names(cache, tmp_path, capsys):
    """main.arch imports a/blocks and b/blocks, b a link to folder a: one file under two names.
    Pointing b at another folder changes what the check reads."""
    folder = tmp_path / "p"
    for sub, k in (("a", 1), ("c", 3)):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "blocks.arch").write_text(BLOCKS.format(k=k))
    try:
        os.symlink("a", folder / "b")
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    (folder / "main.arch").write_text(MAIN.replace('import "blocks"', 'import "a/blocks"\nimport "b/blocks"'))
    assert f"{PARAMS[1]} params" in _check(capsys, folder / "main.arch")[1]
    assert f"{PARAMS[1]} params" in _check(capsys, folder / "main.arch")[1]
    os.unlink(folder / "b")
    os.symlink("c", folder / "b")  # b/blocks (k = 3) is imported last: its `unit` is the one used
    assert f"{PARAMS[3]} params" in _check(capsys, folder / "main.arch")[1]


def test_an_import_closure_follows_an_edited_import(tmp_path, monkeypatch):
    """import_closure reads each file's imports from where its last load found them: lib.arch
    edited to import extra.arch between two calls lists extra.arch in the second."""
    monkeypatch.setattr(loader, "RACY_NS", -10**12)
    for name in ("x", "y"):
        (tmp_path / f"{name}.arch").write_text('import "lib"\n')
    (tmp_path / "lib.arch").write_text("block unit(dim) { conv(dim, 1) }\n")
    (tmp_path / "extra.arch").write_text("block more(dim) { conv(dim, 1) }\n")
    files, _ = loader.import_closure(tmp_path / "x.arch")
    assert [f.name for f, _ in files] == ["x.arch", "lib.arch"]
    (tmp_path / "lib.arch").write_text('import "extra"\nblock unit(dim) { conv(dim, 1) }\n')
    files, absent = loader.import_closure(tmp_path / "y.arch")
    assert [f.name for f, _ in files] == ["y.arch", "lib.arch", "extra.arch"]
    assert [real for _, real in files] == [str((tmp_path / n).resolve()) for n in ("y.arch", "lib.arch", "extra.arch")]
    assert tmp_path / "extra.arch" not in absent


def test_the_front_end_libraries_versions_are_in_the_key():
    """pydantic's version is not in its __init__ but in version.py: that file is hashed too."""
    import pydantic

    files, missing = check_cache.composer_files()
    texts = [f.read_text(errors="replace") for f in files if f.name in ("__init__.py", "version.py")]
    assert "pydantic" not in missing and any(repr(pydantic.VERSION) in t or f'"{pydantic.VERSION}"' in t
                                            for t in texts)


def test_composers_hash_is_kept_with_its_files_stamps(tmp_path, monkeypatch):
    """The hash of composer's code is kept in the cache folder with its files' stamps: used again
    while every stamp is the same (the files not read), taken afresh when one changes, and never
    kept while a file changed lately (the racy rule)."""
    code = tmp_path / "code"
    code.mkdir()
    files = [code / f"m{i}.py" for i in range(3)]
    for i, f in enumerate(files):
        f.write_text(f"x = {i}\n")
    monkeypatch.setattr(check_cache, "composer_files", lambda: (list(files), []))
    monkeypatch.setattr(check_cache, "RACY_NS", -10**12)  # every file settled
    where = tmp_path / "cache"
    hashed = []
    real_hash_files = check_cache.hash_files
    monkeypatch.setattr(check_cache, "hash_files", lambda *a: (hashed.append(True), real_hash_files(*a)))

    def digest(folder=where):
        monkeypatch.setattr(check_cache, "_state", {})  # a new process
        hashed.clear()
        return check_cache._composer(folder), bool(hashed)

    first, read = digest()
    assert read and (where / "composer.stamps").is_file()
    assert digest() == (first, False)  # the kept hash: no file read
    files[1].write_text("x = 10\n")  # one file changed: its stamp too
    changed, read = digest()
    assert read and changed != first
    assert digest() == (changed, False)
    assert digest(None) == (changed, True)  # no cache folder: hashed, the same
    monkeypatch.setattr(check_cache, "RACY_NS", 10**20)  # every file changed lately: nothing trusted
    assert digest() == (changed, True)
