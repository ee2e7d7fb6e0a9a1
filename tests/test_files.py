"""The one atomic writer every command uses (graph, fmt, convert, build -o, port -o)."""

from __future__ import annotations

import os
import stat

import pytest

from composer import files
from composer.diagnostics import ComposerError


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(ComposerError, match="cannot write .*m.svg: disk full"):  # a user error, exit 2
        files.write_atomic(tmp_path / "m.svg", "<svg/>")
    assert os.listdir(tmp_path) == []


def test_an_interrupted_writer_leaves_nothing(tmp_path):
    def writer(tmp):
        open(tmp, "wb").write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(tmp_path / "w.safetensors", writer=writer)
    assert os.listdir(tmp_path) == []


def test_new_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        files.write_atomic(tmp_path / "a.arch", "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.arch").st_mode) == 0o640  # 0o666 less the umask
    assert (tmp_path / "a.arch").read_bytes() == b"x\n"


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "b.arch"
    target.write_text("old")
    os.chmod(target, 0o604)
    files.write_atomic(target, "new\r\n")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o604
    assert target.read_bytes() == b"new\r\n"  # newlines written as given


def test_bytes_and_missing_folders(tmp_path):
    files.write_atomic(tmp_path / "sub" / "c.bin", b"\x00\x01")
    assert (tmp_path / "sub" / "c.bin").read_bytes() == b"\x00\x01"
