"""Every example in the documentation works.

Fenced blocks are collected from `docs/*.md` and `README.md`:

- ```arch          a complete blueprint: every model in it resolves and shape-checks
                   (`composer.load`), and the small ones are built and run once;
- ```arch error    a blueprint that must fail with a located `ComposerError`; a ```text expected-error
                   block right after it, if any, is the exact rendered message;
- ```arch fragment not run;
- ```python        executed, in order, in one namespace per document, in a folder that holds the
                   document's named blueprints.

An info string may name the file a block is written to (```arch file=tiny.arch), so that later
blocks can import it and Python blocks can load it by path.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import composer
from composer import resolve

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO / "docs").glob("*.md")) + ([REPO / "README.md"] if (REPO / "README.md").is_file() else [])

BUILD_MAX_PARAMS = 2_000_000  # build (and run) models up to this size; larger ones are only checked
BUILD_MAX_MACS = 300_000_000

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    flags: tuple
    file: str | None
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc.name}:{self.line}"


def _blocks(doc: Path) -> list[Block]:
    text = doc.read_text()
    out = []
    for m in FENCE.finditer(text):
        words = m.group("info").split()
        if not words:
            continue
        lang, rest = words[0], words[1:]
        file = next((w.split("=", 1)[1] for w in rest if w.startswith("file=")), None)
        flags = tuple(w for w in rest if not w.startswith("file="))
        line = text.count("\n", 0, m.start()) + 1
        body = "\n".join(line_[len(m.group("indent")):] for line_ in m.group("body").splitlines()) + "\n"
        out.append(Block(doc, line, lang, flags, file, body))
    return out


ALL = {doc: _blocks(doc) for doc in DOCS}
ARCH = [b for blocks in ALL.values() for b in blocks if b.lang == "arch" and "fragment" not in b.flags]
PYTHON_DOCS = [doc for doc, blocks in ALL.items() if any(b.lang == "python" for b in blocks)]


def _write_named(doc: Path, folder: Path) -> None:
    """Write every named arch block of `doc` (so that imports and Python blocks find them)."""
    for b in ALL[doc]:
        if b.lang == "arch" and b.file:
            (folder / b.file).write_text(b.text)


def _arch_path(block: Block, folder: Path) -> Path:
    _write_named(block.doc, folder)
    path = folder / (block.file or f"block_{block.line}.arch")
    path.write_text(block.text)
    return path


def _models(path: Path) -> list[str]:
    return [m.name for m in resolve.load(path).file.models]


def test_docs_exist():
    assert (REPO / "docs" / "language.md").is_file()
    assert sum(len(v) for v in ALL.values()) > 20


def test_language_guide_has_examples_of_every_kind():
    blocks = ALL[REPO / "docs" / "language.md"]
    kinds = {(b.lang, "error" in b.flags, "fragment" in b.flags) for b in blocks}
    assert ("arch", False, False) in kinds
    assert ("arch", True, False) in kinds
    assert ("python", False, False) in kinds


@pytest.mark.parametrize("block", [b for b in ARCH if "error" not in b.flags], ids=lambda b: b.id)
def test_arch_block_checks_and_builds(block, tmp_path):
    path = _arch_path(block, tmp_path)
    names = _models(path)
    for name in names:
        plan = composer.load(f"{path}:{name}")
        assert plan.params >= 0
        if plan.params <= BUILD_MAX_PARAMS and plan.macs <= BUILD_MAX_MACS:
            import torch

            model = composer.build(f"{path}:{name}")
            model.eval()
            x = torch.randn(1, plan.input.channels, *plan.input.spatial)
            with torch.no_grad():
                y = model(x)
            assert y.shape[0] == 1, f"{block.id}: {name}"


@pytest.mark.parametrize("block", [b for b in ARCH if "error" in b.flags], ids=lambda b: b.id)
def test_arch_error_block_fails(block, tmp_path):
    path = _arch_path(block, tmp_path)
    with pytest.raises(composer.ComposerError) as info:
        for name in _models(path):
            composer.load(f"{path}:{name}")
        pytest.fail(f"{block.id}: expected a ComposerError, but every model checked")
    rendered = info.value.render()
    assert "error:" in rendered and info.value.diagnostics[0].span is not None, rendered
    blocks = ALL[block.doc]
    after = blocks[blocks.index(block) + 1] if blocks.index(block) + 1 < len(blocks) else None
    if after is not None and after.lang == "text" and "expected-error" in after.flags:
        shown = rendered.replace(str(tmp_path) + os.sep, "")
        assert shown.strip() == after.text.strip(), f"{block.id}: the shown error differs from the real one"


@pytest.mark.parametrize("doc", PYTHON_DOCS, ids=lambda d: d.name)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    _write_named(doc, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python` run in that folder: files written there import
    namespace: dict = {"__name__": "__doc_example__"}
    for b in ALL[doc]:
        if b.lang != "python":
            continue
        code = compile(b.text, f"{doc.name}:{b.line}", "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
