"""Diagnostics: every user mistake gets a located, readable error and exit status 2.

Each `tests/data/diagnostics/<kind>_<case>.arch` (or `.yaml`) sits beside `<same name>.expected`, the
exact text `composer check <file>` prints on stderr (`composer build` when the case's first line is
`# command: build`). Run `pytest tests/test_diagnostics.py --update-goldens` to rewrite the goldens,
then review the diff by eye.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from composer import cli
from composer.locate import BLUEPRINTS_DIR

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "diagnostics"
CASES = sorted([*DATA.glob("*.arch"), *DATA.glob("*.yaml"), *DATA.glob("*.yml")])


def _command(case: Path) -> str:
    first = case.read_text(encoding="utf-8").split("\n", 1)[0]
    return "build" if first.strip() == "# command: build" else "check"


def run_cli(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run the CLI in-process from the repository root; return (exit status, stderr) with stable paths."""
    import composer.loader

    monkeypatch.chdir(ROOT)
    # A fresh file cache: a unit cached by another test under an absolute path would print that path.
    monkeypatch.setattr(composer.loader, "_CACHE", {})
    capsys.readouterr()
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors exit directly
        status = exc.code
    err = capsys.readouterr().err
    return status, err.replace(str(BLUEPRINTS_DIR), "<blueprints>")


def _check_user_error(status: int, err: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    assert err.strip(), "no diagnostic printed"


def test_enough_cases():
    kinds = {c.stem.split("_", 1)[0] for c in CASES}
    assert len(CASES) >= 35, len(CASES)
    assert len(kinds) >= 10, kinds
    for case in CASES:
        assert "_" in case.stem, f"{case.name}: name cases <kind>_<case>"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: Path, capsys, monkeypatch, golden):
    rel = case.relative_to(ROOT).as_posix()
    status, err = run_cli([_command(case), rel], capsys, monkeypatch)
    _check_user_error(status, err)
    golden(case.with_suffix(".expected"), err)


def test_every_expected_has_a_case():
    stems = {c.stem for c in CASES}
    orphans = [e.name for e in DATA.glob("*.expected") if e.stem not in stems]
    assert not orphans


# ---- the most important messages, in full -----------------------------------------


def _write(tmp_dir: Path, name: str, text: str) -> str:
    path = tmp_dir / name
    path.write_text(text, encoding="utf-8")
    return path.relative_to(ROOT).as_posix()


@pytest.fixture
def scratch():
    """A scratch folder inside the repository, so that file names print as short relative paths."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=".scratch_", dir=DATA))
    yield path
    shutil.rmtree(path, ignore_errors=True)


_TINY = """import "lib/metaformer"

model tiny {{
    input image(3, 32)
    stem patch_embed(16, 4)
    stage {{ repeat 2 {block} }}
    head {{ global_pool(); classifier(10) }}
}}
"""


def test_message_unknown_op(scratch, capsys, monkeypatch):
    f = _write(scratch, "t.arch", _TINY.format(block="metaformer(16, attention(2), act = gleu)"))
    status, err = run_cli(["check", f], capsys, monkeypatch)
    _check_user_error(status, err)
    assert err == (
        f"{f}:6:57: error: unknown op 'gleu'\n"
        "   6 |     stage { repeat 2 metaformer(16, attention(2), act = gleu) }\n"
        "                                                               ^^^^\n"
        "  hint: did you mean 'gelu' or 'glu'?\n"
    )


def test_message_window_does_not_divide(scratch, capsys, monkeypatch):
    f = _write(scratch, "t.arch", _TINY.format(block="metaformer(16, attention(2, partition = window(3)))"))
    status, err = run_cli(["check", f], capsys, monkeypatch)
    _check_user_error(status, err)
    assert err == (
        f"{f}:6:37: error: window 3 does not divide feature size 8\n"
        "   6 |     stage { repeat 2 metaformer(16, attention(2, partition = window(3))) }\n"
        "                                           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "  note: at stages.0.blocks.0.token_mixer, input (8x8 tokens, 16)\n"
        "  hint: choose an input size so that the grid (8x8) is a multiple of 3\n"
    )


def test_message_heads_do_not_divide(scratch, capsys, monkeypatch):
    f = _write(scratch, "t.arch", _TINY.format(block="metaformer(16, attention(3))"))
    status, err = run_cli(["check", f], capsys, monkeypatch)
    _check_user_error(status, err)
    assert err == (
        f"{f}:6:37: error: 3 heads do not divide the 16 channels\n"
        "   6 |     stage { repeat 2 metaformer(16, attention(3)) }\n"
        "                                           ^^^^^^^^^^^^\n"
        "  note: at stages.0.blocks.0.token_mixer, input (8x8 tokens, 16)\n"
        "  hint: the channel count must be a multiple of the number of heads\n"
    )


# ---- command-line mistakes ------------------------------------------------------------

_CLI_CASES = {
    "set-unknown-parameter": (
        ["check", "blueprints/swin.arch:swin_t", "--set", "windw=8"],
        "error: --set windw: model 'swin_t' has no parameter 'windw'\n"
        "  hint: did you mean 'win'?\n",
    ),
    "set-syntax": (
        ["check", "blueprints/swin.arch:swin_t", "--set", "win=(8"],
        "--set win:1:3: error: unexpected end of file\n"
        "   1 | (8\n"
        "         ^\n"
        "  hint: the '(' opened on line 1 (`(8`) is never closed\n",
    ),
    "set-not-key-value": (
        ["check", "blueprints/swin.arch:swin_t", "--set", "win"],
        "error: --set expects key=value, got 'win'\n",
    ),
    "unknown-model-in-file": (
        ["check", "tests/data/diagnostics/unknown-model_base.arch:smal"],
        "error: no model 'smal' in tests/data/diagnostics/unknown-model_base.arch\n"
        "  hint: did you mean 'small'?\n",
    ),
    "unknown-model-in-zoo-file": (
        ["check", "blueprints/swin.arch:swin_tt"],
        "error: no model 'swin_tt' in blueprints/swin.arch\n"
        "  hint: did you mean 'swin_t' or 'swin_s' or 'swin_b'?\n",
    ),
    "unknown-zoo-model": (
        ["check", "swin_tt"],
        "error: no zoo model 'swin_tt'\n"
        "  hint: did you mean 'swin_t' or 'swin_s' or 'swin_b'?\n",
    ),
    "missing-file": (
        ["check", "tests/data/diagnostics/no_such_file.arch"],
        "error: no such file: tests/data/diagnostics/no_such_file.arch\n",
    ),
}


@pytest.mark.parametrize("name", sorted(_CLI_CASES))
def test_cli_user_errors(name, capsys, monkeypatch):
    argv, expected = _CLI_CASES[name]
    status, err = run_cli(argv, capsys, monkeypatch)
    _check_user_error(status, err)
    assert err == expected


# ---- internal errors read differently ---------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("simulated bug")


def test_internal_error_is_one_line(capsys, monkeypatch):
    import composer.api

    monkeypatch.setattr(composer.api, "plan", _boom)
    status, err = run_cli(["check", "blueprints/vit.arch:vit_ti"], capsys, monkeypatch)
    assert status == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("composer: internal error"), err
    assert "simulated bug" in lines[0]
    assert "Traceback" not in err


def test_internal_error_traceback_with_debug(capsys, monkeypatch):
    import composer.api

    monkeypatch.setattr(composer.api, "plan", _boom)
    status, err = run_cli(["--debug", "check", "blueprints/vit.arch:vit_ti"], capsys, monkeypatch)
    assert status == 3
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("composer: internal error")


def test_an_error_is_rendered_when_shown_with_its_later_notes():
    """An error renders its text when shown, not when raised (composer.sizes raises and drops
    hundreds per model): a note added after it was raised is in its text, and a copy sent between
    processes (pickled) shows the same."""
    import pickle

    from composer.diagnostics import error

    exc = error("shape", "the body gives (8, 4x4)", None, "keep the shape")
    exc.diagnostics[0].notes.append("applied by `reuse stem` at t.arch:3:5")
    assert str(exc) == ("error: the body gives (8, 4x4)\n  note: applied by `reuse stem` at t.arch:3:5\n"
                        "  hint: keep the shape")
    again = pickle.loads(pickle.dumps(exc))
    assert str(again) == str(exc) and again.code == "shape"
