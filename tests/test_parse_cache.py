"""The parsed-file cache (composer/parse_cache.py): an entry gives the AST parsing gives; a stale,
corrupt or planted entry is parsed again; a folder that cannot be written, or the cache switched
off, costs nothing but the parse. Every test uses a cache folder of its own (tmp_path)."""

from __future__ import annotations

import ast as pyast
import os
import pickle
from pathlib import Path

import pytest

from composer import disk_cache, parse_cache
from composer.loader import read_blueprint
from composer.parse import parse_text
from composer.source import SOURCES

TEXT = ("# a net\nmodel tiny_net(width = 8) {\n    input image(3, 32)\n    stem { conv(width, 3, stride = 2); relu }\n"
        "    head { global_pool(\"avg\"); classifier(10) }\n}\n")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("COMPOSER_NO_CACHE", raising=False)
    return tmp_path / "cache" / "parse"


def counting():
    calls = []

    def parse(text, name):
        calls.append(name)
        return parse_text(text, name)

    return parse, calls


def test_entry_gives_the_parsed_ast(cache, tmp_path):
    src = tmp_path / "net.arch"
    src.write_text(TEXT)
    parse, calls = counting()
    first = parse_cache.parse_file(TEXT, src, parse)
    assert len(list(cache.glob("*.pickle"))) == 1
    SOURCES.pop(str(src), None)
    again = parse_cache.parse_file(TEXT, src, parse)
    assert calls == [str(src)]  # the second came from the entry
    assert again == first == parse_text(TEXT, str(src))
    assert again.models[0].span.file == str(src) and again.doc == "a net"
    assert SOURCES[str(src)].text == TEXT  # diagnostics can quote the file's lines


def test_spans_name_the_file_read(cache, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in "ab":
        (tmp_path / d / "net.arch").write_text(TEXT)
    a, b = read_blueprint(tmp_path / "a" / "net.arch"), read_blueprint(tmp_path / "b" / "net.arch")
    assert a.models[0].span.file == str(tmp_path / "a" / "net.arch")
    assert b.models[0].span.file == str(tmp_path / "b" / "net.arch")


def test_a_file_read_under_two_names_keeps_an_entry_for_each(cache, tmp_path, monkeypatch):
    # `composer check blueprints` reads blueprints/lib/x.arch by its relative name, and every file
    # importing it reads it by its absolute path: the two entries must not overwrite each other
    src = tmp_path / "net.arch"
    src.write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    parse, calls = counting()
    for _ in range(2):
        for name in (Path("net.arch"), src):
            parse_cache.parse_file(TEXT, name, parse)
    assert calls == ["net.arch", str(src)]  # each name parsed once, then read from its own entry
    assert len(list(cache.glob("*.pickle"))) == 2


def test_stale_entry_is_parsed_again(cache, tmp_path):
    src = tmp_path / "net.arch"
    parse, calls = counting()
    parse_cache.parse_file(TEXT, src, parse)
    edited = TEXT.replace("classifier(10)", "classifier(7)")
    out = parse_cache.parse_file(edited, src, parse)
    assert len(calls) == 2 and out == parse_text(edited, str(src))
    assert parse_cache.parse_file(edited, src, parse) == out and len(calls) == 2  # rewritten: a hit


@pytest.mark.parametrize("damage", ["truncate", "garbage", "planted", "not a file"])
def test_corrupt_or_planted_entry_is_parsed_again(cache, tmp_path, damage):
    src = tmp_path / "net.arch"
    parse, calls = counting()
    parse_cache.parse_file(TEXT, src, parse)
    [entry] = cache.glob("*.pickle")
    data = entry.read_bytes()
    head = len(parse_cache.FORMAT) + 32
    if damage == "truncate":
        entry.write_bytes(data[: head + 40])
    elif damage == "garbage":
        entry.write_bytes(data[:head] + b"\x80\x05garbage" * 10)
    elif damage == "planted":  # a pickle that would make a folder: refused, never run
        entry.write_bytes(data[:head] + pickle.dumps(Planted(str(tmp_path / "planted"))))
    else:
        entry.unlink()
        entry.mkdir()
    out = parse_cache.parse_file(TEXT, src, parse)
    assert len(calls) == 2 and out == parse_text(TEXT, str(src))
    assert not (tmp_path / "planted").exists()


class Planted:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("how", ["folder is a file", "disk full"])
def test_unwritable_cache_costs_only_the_parse(cache, tmp_path, monkeypatch, how):
    src = tmp_path / "net.arch"
    if how == "folder is a file":  # root writes into read-only folders: a file in its place cannot be
        cache.parent.write_text("not a folder")
    else:
        def full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(disk_cache.os, "replace", full)
    parse, calls = counting()
    for _ in range(2):
        assert parse_cache.parse_file(TEXT, src, parse) == parse_text(TEXT, str(src))
    assert len(calls) == 2
    if how == "disk full":
        assert list(cache.iterdir()) == []  # the temporary file is removed


def test_switched_off(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPOSER_NO_CACHE", "1")
    parse, calls = counting()
    for _ in range(2):
        parse_cache.parse_file(TEXT, tmp_path / "net.arch", parse)
    assert len(calls) == 2 and not cache.exists()


def test_syntax_errors_are_not_kept(cache, tmp_path):
    from composer.diagnostics import ComposerError

    for _ in range(2):
        with pytest.raises(ComposerError, match="net.arch:2"):
            parse_cache.parse_file("model m {\n    stem { conv(8,, }\n}\n", tmp_path / "net.arch", parse_text)
    assert not cache.exists() or not list(cache.glob("*.pickle"))


def test_front_end_names_every_module_the_parser_imports():
    """The key hashes the modules in FRONT_END: they must include every composer module that
    composer/parse.py imports, directly or not (else an edit of one would not be a miss)."""
    here = Path(parse_cache.__file__).parent
    seen, todo = set(), ["parse"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in pyast.walk(pyast.parse((here / f"{name}.py").read_text())):
            if isinstance(node, pyast.ImportFrom) and node.level == 1:
                mods = [node.module] if node.module else [a.name for a in node.names]
                todo += [m for m in mods if (here / f"{m}.py").exists()]
    assert seen <= set(parse_cache.FRONT_END), seen - set(parse_cache.FRONT_END)
