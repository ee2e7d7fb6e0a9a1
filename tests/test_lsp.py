"""The language server: driven over stdio by pygls's LanguageClient (`python -m composer lsp` as a
subprocess, every step under a timeout), and its checking, hover, completion, definition and
symbol functions called in-process on small buffers. Expected ranges and shapes are worked out
by hand from the test's own text."""

import asyncio
import os
import sys
from pathlib import Path

from lsprotocol import types as T
from pygls.lsp.client import LanguageClient

from composer.cli import main
from composer.locate import BLUEPRINTS_DIR
from composer.lsp_check import Checker
from composer.lsp_complete import complete
from composer.lsp_facts import definition, hover, symbols
from helpers import REPO

STEP = 20  # seconds any one exchange with the server may take (a loaded machine starts it slowly)

# a 32x32 image; conv 3x3 stride 2 (padding 1): (32 + 2 - 3) // 2 + 1 = 16, so (8, 16x16);
# 8 * 3 * 3 * 3 = 216 weights, no bias; MACs 216 * 16 * 16 = 55,296
TINY = """model tiny {
    input image(3, 32)
    stem {
        conv(8, 3, stride = 2, bias = false)
        relu
    }
    head { global_pool("avg"); classifier(10) }
}
"""
BROKEN = TINY.replace("stride = 2", "strid = 2")
USER = ('import "parts"\nmodel u {\n    input image(3, 8)\n    stem { conv(4, 3); widen(6) }\n'
        '    head { global_pool("avg"); classifier(2) }\n}\n')


def _lsp_session(tmp_path: Path) -> dict:
    uri = (tmp_path / "tiny.arch").as_uri()
    got: dict = {}

    async def run():
        client = LanguageClient("composer-test", "1")
        diagnostics: asyncio.Queue = asyncio.Queue()

        @client.feature(T.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
        def published(params):
            diagnostics.put_nowait(params)

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        await client.start_io(sys.executable, "-m", "composer", "lsp", cwd=str(tmp_path), env=env)
        try:
            init = await asyncio.wait_for(client.initialize_async(T.InitializeParams(
                capabilities=T.ClientCapabilities(), root_uri=tmp_path.as_uri())), STEP)
            got["capabilities"] = init.capabilities
            client.initialized(T.InitializedParams())
            client.text_document_did_open(T.DidOpenTextDocumentParams(
                T.TextDocumentItem(uri=uri, language_id="arch", version=1, text=BROKEN)))
            got["broken"] = await asyncio.wait_for(diagnostics.get(), STEP)
            client.text_document_did_change(T.DidChangeTextDocumentParams(
                T.VersionedTextDocumentIdentifier(version=2, uri=uri),
                [T.TextDocumentContentChangeWholeDocument(text=TINY)]))
            got["fixed"] = await asyncio.wait_for(diagnostics.get(), STEP)
            doc = T.TextDocumentIdentifier(uri=uri)
            got["hover"] = await asyncio.wait_for(client.text_document_hover_async(
                T.HoverParams(doc, T.Position(line=3, character=len("        conv(8, 3, str")))), STEP)
            got["completion"] = await asyncio.wait_for(client.text_document_completion_async(
                T.CompletionParams(doc, T.Position(line=4, character=len("        re")))), STEP)
            # user.arch imports parts.arch, whose file on disk lacks `widen`; opening parts.arch with
            # it in the editor re-checks user.arch against the open text
            (tmp_path / "parts.arch").write_text("# nothing yet\n")
            for name, text in (("user.arch", USER), ("parts.arch", "block widen(n) { conv(n, 1) }\n")):
                client.text_document_did_open(T.DidOpenTextDocumentParams(T.TextDocumentItem(
                    uri=(tmp_path / name).as_uri(), language_id="arch", version=1, text=text)))
            for key in ("user", "parts", "user again"):
                got[key] = await asyncio.wait_for(diagnostics.get(), STEP)
            await asyncio.wait_for(client.shutdown_async(None), STEP)
            client.exit(None)
            await asyncio.wait_for(client.stop(), STEP)
        finally:
            server = getattr(client, "_server", None)  # never leave the subprocess behind
            if server is not None and server.returncode is None:
                server.kill()

    asyncio.run(asyncio.wait_for(run(), 6 * STEP))
    return got


def test_server_over_stdio(tmp_path):
    got = _lsp_session(tmp_path)
    caps = got["capabilities"]
    assert caps.hover_provider and caps.definition_provider and caps.document_symbol_provider
    assert caps.text_document_sync.change == T.TextDocumentSyncKind.Full
    # the error: `strid` on line 4 (0-based 3), from the column where it starts to where it ends
    (d,) = got["broken"].diagnostics
    row = BROKEN.split("\n")[3]
    start = row.index("strid")
    assert (d.range.start.line, d.range.start.character, d.range.end.line, d.range.end.character) == \
        (3, start, 3, start + len("strid"))
    assert d.severity == T.DiagnosticSeverity.Error and "strid" in d.message and "stride" in d.message
    assert got["fixed"].diagnostics == () or list(got["fixed"].diagnostics) == []
    text = got["hover"].contents.value
    assert "`(8, 16x16)`" in text and "216 params" in text and "55.30 K" in text
    labels = {i.label for i in got["completion"].items}
    assert {"conv", "linear", "relu", "attention"} <= labels
    assert got["user"].uri.endswith("user.arch") and [d.code for d in got["user"].diagnostics] == ["unknown-op"]
    assert got["parts"].uri.endswith("parts.arch") and not got["parts"].diagnostics
    assert got["user again"].uri.endswith("user.arch") and not got["user again"].diagnostics


def test_missing_pygls_is_a_user_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pygls.lsp.server", None)  # `import` now raises ImportError
    assert main(["lsp"]) == 2
    err = capsys.readouterr().err
    assert "pygls" in err and "pip install" in err and "[lsp]" in err and "Traceback" not in err


# ---- in-process: the functions the server calls ----------------------------------------------

TWO = """import "lib/metaformer"

model a {
    input image(3, 16)
    stem { conv(8, 4, stride = 4) }
    stage { repeat 2 metaformer(8, pooling(3)) }
    head { global_pool("avg"); classifier(10) }
}

model b : a {
    stem { conv(8, 2, stride = 2) }
}

block twice(dim) {
    linear(dim)
    linear(dim)
}
"""


def test_several_errors_and_the_unsaved_text(tmp_path):
    path = tmp_path / "two.arch"
    path.write_text("model x { }\n")  # on disk: something else; the buffer is what is checked
    text = TWO.replace("conv(8, 4, stride = 4)", "conv(8, 4, stride = 0)").replace(
        "conv(8, 2, stride = 2)", "conv(8, 2, groups = 3)")
    found = Checker().check(str(path), text)
    rows = text.split("\n")
    where = {(p.line, p.character) for p in found.problems}
    # a's stride 0 (out of range: the argument is marked) and b's groups 3 (8 channels are not divisible)
    assert (4, rows[4].index("stride")) in where
    assert any(p.line == 10 for p in found.problems), found.problems
    assert not found.plans and all(p.severity == "error" for p in found.problems)


def test_imports_come_from_open_buffers(tmp_path):
    (tmp_path / "parts.arch").write_text("# nothing yet\n")
    user = tmp_path / "user.arch"
    text = USER
    checker = Checker()
    (p,) = checker.check(str(user), text).problems  # `widen` is not defined on disk
    start = text.split("\n")[3].index("widen")
    assert (p.line, p.character, p.end_character) == (3, start, start + len("widen")) and "widen" in p.message
    checker.open(str(tmp_path / "parts.arch"), "block widen(n) { conv(n, 1) }\n")
    a = checker.check(str(user), text)
    assert a.problems == [] and a.plans["u"].stem.y.channels == 6


def test_a_syntax_error_per_definition(tmp_path):
    """The parser stops at the first syntax error; the checker parses again from the next
    definition, so each broken definition has its error (a missing '}' is found on the next
    definition's first line, which is then parsed again on its own), and a good one gives none."""
    text = ("model a {\n    input image(3, 8)\n    stem conv(4,, 3)\n}\n"  # line 2: `,,`
            "block fine(n) { conv(n, 1) }\n"
            "block open(n) { conv(n, 1)\n"                                   # line 5: no '}'
            "model c {\n    input image(3, 8)\n    stem conv(4 3)\n}\n")  # line 8: no ','
    a = Checker().check(str(tmp_path / "s.arch"), text)
    rows = text.split("\n")
    assert [(p.line, p.character) for p in a.problems] == [
        (2, rows[2].index(",,") + 1), (6, rows[6].index("{")), (8, rows[8].index("3)"))]
    assert all(p.severity == "error" for p in a.problems)
    # an error on a definition's own first line: reported once, then the next definition's
    text = "model a {\n    stem conv(4,, 3)\n}\nmodel b( {\n}\nmodel c {\n    stem conv(4 3)\n}\n"
    a = Checker().check(str(tmp_path / "t.arch"), text)
    assert [(p.line, p.character) for p in a.problems] == [(1, 16), (3, 9), (6, 16)]


def test_an_open_buffer_two_imports_away_is_used(tmp_path):
    """top.arch imports mid.arch (on disk, not open), which imports leaf.arch (open, edited): the
    check of top sees the buffer's text, and top reaches leaf (the server re-checks it on an edit)."""
    (tmp_path / "leaf.arch").write_text("block widen(n) { conv(n, 1) }\n")
    (tmp_path / "mid.arch").write_text('import "leaf"\nblock twice(n) { widen(n); widen(n) }\n')
    top = tmp_path / "top.arch"
    text = 'import "mid"\nmodel t {\n    input image(3, 8)\n    stem twice(4)\n}\n'
    checker = Checker()
    a = checker.check(str(top), text)
    assert a.problems == [] and a.plans["t"].params == (3 * 4 + 4) + (4 * 4 + 4)
    assert {str(tmp_path / "mid.arch"), str(tmp_path / "leaf.arch")} <= a.reaches
    checker.open(str(tmp_path / "leaf.arch"), "block widen(n) { conv(n, 3) }\n")  # unsaved: 3x3 convs
    a = checker.check(str(top), text)
    assert a.problems == [] and a.plans["t"].params == (3 * 4 * 9 + 4) + (4 * 4 * 9 + 4)


def test_error_in_an_import_is_placed_at_the_import(tmp_path):
    (tmp_path / "bad.arch").write_text("block oops( { }\n")
    text = 'import "bad"\nmodel m { input image(3, 8) }\n'
    (p,) = Checker().check(str(tmp_path / "m.arch"), text).problems
    assert (p.line, p.character, p.end_line, p.end_character) == (0, 0, 0, len('import "bad"'))
    assert "bad.arch:1:" in p.message


def test_deprecated_spelling_is_a_warning(tmp_path):
    text = ("model gq {\n input image(8, 4)\n stem { pool(2); save query; from input }\n"
            " stage { block { parallel concat { identity; { from query; tile(2) } }\n"
            "   attention(2, partition = window(2), query = given) as attn } }\n}\n")
    a = Checker().check(str(tmp_path / "gq.arch"), text)
    (w,) = a.problems
    row = text.split("\n")[4]
    assert w.severity == "warning" and "query = given" in w.message and "gq" in a.plans
    assert (w.line, w.character, w.end_character) == (4, row.index("attention"), row.index(" as attn"))


def test_hover_in_a_composite_lists_each_model(tmp_path):
    path = tmp_path / "two.arch"
    a = Checker().check(str(path), TWO)
    assert a.problems == [] and list(a.plans) == ["a", "b"]
    # `stem { conv(8, 4, stride = 4) }` of a: 16 / 4 = 4, so (8, 4x4); b's own stem hides it
    text = hover(a, 4, TWO.split("\n")[4].index("conv") + 1)
    assert "`(8, 4x4)`" in text and "**a**" in text and "**b**" not in text
    # the repeat is in both models: a's stem gives 4x4, b's 16 / 2 = 8x8; two blocks each
    text = hover(a, 5, TWO.split("\n")[5].index("repeat") + 1)
    assert "**a**" in text and "**b**" in text and "stages.0.blocks.1" in text
    assert "`(8, 4x4)` → `(8, 4x4)`" in text and "`(8, 8x8)` → `(8, 8x8)`" in text
    # a model's name: its input and output (a classifier of 10: a vector of 10)
    text = hover(a, 2, len("model a"))
    assert "**model a**" in text and "`(3, 16x16)` → `(10)`" in text
    # an op's and a composite's documentation
    assert "Convolution over the spatial dims" in hover(a, 4, TWO.split("\n")[4].index("conv") + 1)
    doc = hover(a, 5, TWO.split("\n")[5].index("pooling") + 2)
    assert "mixer pooling" in doc and "size = 3" in doc and "lib/metaformer.arch" in doc


def test_completion(tmp_path):
    path = tmp_path / "two.arch"
    (tmp_path / "helpers.arch").write_text("block h(n) { conv(n, 1) }\n")
    a = Checker().check(str(path), TWO)
    labels = lambda items: [i.label for i in items]  # noqa: E731
    # inside conv's call: its parameters, and names (an argument may be an op)
    got = complete("conv(8, ", 0, 8, str(path), a.unit)
    assert {"out", "kernel", "stride", "groups", "bias"} <= set(labels(got)) and "relu" in labels(got)
    assert [i.insert for i in got if i.label == "stride"] == ["stride = "]
    # inside a composite's call, over two lines: its parameters
    got = complete("metaformer(8,\n   ", 1, 3, str(path), a.unit)
    assert {"dim", "token_mixer", "mlp_ratio"} <= set(labels(got))
    # a statement: ops and the composites in sight
    got = labels(complete(TWO, 4, 11, str(path), a.unit))
    assert {"conv", "linear", "metaformer", "pooling", "twice"} <= set(got)
    # import paths: the zoo's and the files beside the document, replacing what is typed
    got = complete('import "lib/me', 0, 14, str(path), a.unit)
    assert "lib/metaformer" in labels(got) and "helpers" in labels(got) and "two" not in labels(got)
    assert {i.replace_from for i in got} == {len('import "')}
    # base models
    assert set(labels(complete("model c : ", 0, 10, str(path), a.unit))) == {"a", "b"}


def test_definition_and_symbols(tmp_path):
    path = tmp_path / "two.arch"
    a = Checker().check(str(path), TWO)
    rows = TWO.split("\n")
    lib = BLUEPRINTS_DIR / "lib" / "metaformer.arch"
    lib_rows = lib.read_text().split("\n")
    line = next(i for i, r in enumerate(lib_rows) if r.startswith("mixer pooling("))
    file, r = definition(a, 5, rows[5].index("pooling") + 1)
    assert Path(file).resolve() == lib.resolve() and r == (line, len("mixer "), line, len("mixer pooling"))
    assert definition(a, 0, 3) == (str(lib.resolve()), (0, 0, 0, 0))  # the import
    file, r = definition(a, 9, rows[9].index(": a") + 2)  # base model a
    assert file == str(path) and r == (2, len("model "), 2, len("model a"))
    syms = symbols(a)
    assert [(s.name, s.kind) for s in syms] == [("a", "model"), ("b", "model"), ("twice", "block")]
    assert [c.name for c in syms[0].children] == ["stem", "stage 0", "head"]
    assert syms[2].range == (13, 0, 16, 1) and syms[2].selection == (13, 6, 13, 11)


def test_unchanged_models_are_not_planned_again(tmp_path):
    path = str(tmp_path / "two.arch")
    checker = Checker()
    first = checker.check(path, TWO)
    # a new stem in b: a is reused as it was, b planned again (16 / 4: a 4x4 grid by hand)
    edited = checker.check(path, TWO.replace("stem { conv(8, 2, stride = 2) }", "stem { conv(8, 4, stride = 4) }"))
    assert edited.plans["a"] is first.plans["a"] and edited.plans["b"].stem.y.spatial == (4, 4)
    # an edit in a composite of the file, or a line added above the models, plans every model again
    edited = checker.check(path, TWO.replace("linear(dim)\n}", "linear(dim * 2)\n}"))
    assert edited.plans["a"] is not first.plans["a"]
    moved = checker.check(path, "\n" + TWO)
    assert moved.plans["a"].stem.steps[0].span.line == first.plans["a"].stem.steps[0].span.line + 1
    # b inherits from a: an edit of a plans b again (three blocks instead of two)
    edited = checker.check(path, TWO.replace("repeat 2", "repeat 3"))
    assert edited.plans["b"] is not first.plans["b"] and len(edited.plans["b"].stages[0].blocks) == 3
