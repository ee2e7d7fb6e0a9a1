"""Hostile files (issue 15, item 1): imports stay inside the importing file's folder tree (or the
standard library), only regular files are read, size-capped, and checking a folder never blocks
or reads outside it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from composer.cli import main
from helpers import REPO

SECRET = "api_token: sk-do-not-print-this\n"
MODEL = 'model m {{\n    input image(3, 8)\n    stem {{ conv(4, 3) }}\n}}\n'


def check(path, capsys):
    status = main(["check", str(path)])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("spec", ["../outside/secret", "/etc/passwd", "sub/../../outside/secret"])
def test_imports_cannot_leave_the_folder(tmp_path, capsys, spec):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.arch").write_text(SECRET)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "sub").mkdir()
    blueprint = tmp_path / "proj" / "m.arch"
    blueprint.write_text(f'import "{spec}"\n' + MODEL.format())
    status, err = check(blueprint, capsys)
    assert status == 2
    assert "m.arch:1:" in err and "bad-import" not in err  # located, in words
    assert "sk-do-not-print-this" not in err


def test_a_symlink_out_of_the_folder_is_refused(tmp_path, capsys):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.arch").write_text(SECRET)
    (tmp_path / "proj").mkdir()
    os.symlink(tmp_path / "outside" / "secret.arch", tmp_path / "proj" / "blocks.arch")
    blueprint = tmp_path / "proj" / "m.arch"
    blueprint.write_text('import "blocks"\n' + MODEL.format())
    status, err = check(blueprint, capsys)
    assert status == 2 and "leads out of" in err
    assert "sk-do-not-print-this" not in err


def test_imports_inside_the_folder_and_the_library_still_work(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blocks.arch").write_text("block unit(c) { conv(c, 1) }\n")
    blueprint = tmp_path / "m.arch"
    blueprint.write_text('import "sub/blocks"\nimport "lib/metaformer"\n'
                         'model m {\n    input image(3, 8)\n    stem { unit(4) }\n}\n')
    status, err = check(blueprint, capsys)
    assert status == 0, err


def test_a_fifo_in_a_checked_folder_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "x.arch")
    code = f"import sys; from composer.cli import main; sys.exit(main(['check', {str(tmp_path)!r}]))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "not a regular file" in run.stderr


def test_a_link_to_a_device_is_not_read(tmp_path, capsys):
    os.symlink("/dev/zero", tmp_path / "zero.arch")
    status, err = check(tmp_path / "zero.arch", capsys)
    assert status == 2 and "not a regular file" in err


def test_a_huge_file_is_refused_before_parsing(tmp_path, capsys):
    big = tmp_path / "big.arch"
    big.write_text("# " + "x" * (5 * 1024 * 1024) + "\n")
    status, err = check(big, capsys)
    assert status == 2 and "limited to" in err


def test_a_folder_without_blueprints_is_an_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    status, err = check(tmp_path, capsys)
    assert status == 2 and "no blueprint in" in err


def test_a_checked_folder_skips_links_that_lead_out(tmp_path, capsys):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "broken.arch").write_text("model {")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "m.arch").write_text(MODEL.format())
    os.symlink(tmp_path / "outside" / "broken.arch", tmp_path / "proj" / "link.arch")
    status, err = check(tmp_path / "proj", capsys)
    assert status == 0, err  # the broken file outside was never read
