"""`composer lsp`: a Language Server for .arch files over stdio, on pygls (the optional extra `lsp`).

It wires the Language Server Protocol to the torch-free modules that know the language:
composer/lsp_check.py checks the text being edited (diagnostics on open and on every change, full
document sync), composer/lsp_facts.py answers hovers, definitions and document symbols,
composer/lsp_complete.py completion. Positions arrive in the client's units (UTF-16 unless the
client and server agree on another) and are turned into code points with pygls's position codec.
"""

from __future__ import annotations

from pathlib import Path

from . import __version__
from .diagnostics import error
from .lsp_check import Analysis, Checker, Problem
from .lsp_complete import complete
from .lsp_facts import definition, hover, symbols
from .source import SOURCES

INSTALL_HINT = "install it with: pip install 'arch-composer[lsp]' (from a checkout: pip install -e \".[lsp]\")"
TRIGGERS = ['"', "/", "(", ",", ":"]


def serve() -> int:
    """Run the server on stdin/stdout until the client says exit."""
    make_server().start_io()
    return 0


def make_server():
    """The pygls LanguageServer with composer's features registered; a missing pygls (or a pygls
    older than 2) is a user error naming the extra to install."""
    try:
        from lsprotocol import types as T
        from pygls.lsp.server import LanguageServer
        from pygls.uris import from_fs_path, to_fs_path
    except ImportError as exc:
        raise error("missing-dependency", f"`composer lsp` needs pygls 2 and lsprotocol ({exc})", None,
                    INSTALL_HINT) from None

    server = LanguageServer("composer", __version__, text_document_sync_kind=T.TextDocumentSyncKind.Full)
    checker = Checker()
    last: dict[str, Analysis] = {}  # uri -> the latest analysis of the open document
    units: dict[str, object] = {}  # uri -> its latest unit that loaded (completion while the text is broken)

    def path_of(uri: str) -> str:
        path = to_fs_path(uri) if uri.startswith("file:") else None
        return str(Path(path).resolve()) if path else str(Path.cwd() / Path(uri.rsplit("/", 1)[-1]).name)

    def to_range(lines, r: tuple):
        codec = server.workspace.position_codec
        return codec.range_to_client_units(lines, T.Range(start=T.Position(line=r[0], character=r[1]),
                                                          end=T.Position(line=r[2], character=r[3])))

    def analyse(uri: str, dependents: bool = True) -> None:
        """Check a document and publish its diagnostics; then the open documents importing it."""
        doc = server.workspace.get_text_document(uri)
        path, text = path_of(uri), doc.source
        checker.open(path, text)
        try:
            a = checker.check(path, text)
        except Exception as exc:  # an internal bug: one diagnostic, as the CLI's one line
            a = Analysis(path, text, problems=[Problem(0, 0, 0, 0, f"composer internal error: {type(exc).__name__}: "
                                                                  f"{exc} (please report)")])
        last[uri] = a
        if a.unit is not None:
            units[uri] = a.unit
        lines = doc.lines
        severity = {"error": T.DiagnosticSeverity.Error, "warning": T.DiagnosticSeverity.Warning}
        server.text_document_publish_diagnostics(T.PublishDiagnosticsParams(uri=uri, version=doc.version, diagnostics=[
            T.Diagnostic(range=to_range(lines, (p.line, p.character, p.end_line, p.end_character)), message=p.message,
                         severity=severity[p.severity], code=p.code or None, source="composer")
            for p in a.problems]))
        if dependents:  # every open document that imports it, directly or through other files
            for other, b in list(last.items()):
                if other != uri and path in b.reaches:
                    analyse(other, dependents=False)

    def position(uri: str, pos) -> tuple[Analysis | None, int, int]:
        a = last.get(uri)
        if a is None:
            return None, 0, 0
        p = server.workspace.position_codec.position_from_client_units(a.text.split("\n"), pos)
        return a, p.line, p.character

    @server.feature(T.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls, params: T.DidOpenTextDocumentParams):
        analyse(params.text_document.uri)

    @server.feature(T.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls, params: T.DidChangeTextDocumentParams):
        analyse(params.text_document.uri)

    @server.feature(T.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls, params: T.DidCloseTextDocumentParams):
        uri = params.text_document.uri
        checker.close(path_of(uri))
        last.pop(uri, None)
        units.pop(uri, None)
        server.text_document_publish_diagnostics(T.PublishDiagnosticsParams(uri=uri, diagnostics=[]))

    @server.feature(T.TEXT_DOCUMENT_HOVER)
    def on_hover(ls, params: T.HoverParams):
        a, line, char = position(params.text_document.uri, params.position)
        text = hover(a, line, char, units.get(params.text_document.uri)) if a is not None else None
        return T.Hover(contents=T.MarkupContent(kind=T.MarkupKind.Markdown, value=text)) if text else None

    @server.feature(T.TEXT_DOCUMENT_COMPLETION, T.CompletionOptions(trigger_characters=TRIGGERS))
    def on_completion(ls, params: T.CompletionParams):
        uri = params.text_document.uri
        a, line, char = position(uri, params.position)
        if a is None:
            return None
        kinds = {"op": T.CompletionItemKind.Function, "loss": T.CompletionItemKind.Function,
                 "part": T.CompletionItemKind.Field, "block": T.CompletionItemKind.Class,
                 "mixer": T.CompletionItemKind.Struct, "parameter": T.CompletionItemKind.Property,
                 "file": T.CompletionItemKind.File, "model": T.CompletionItemKind.Module}
        lines = a.text.split("\n")
        out = []
        for n, item in enumerate(complete(a.text, line, char, a.path, a.unit or units.get(uri))):
            edit = None
            if item.replace_from is not None:
                edit = T.TextEdit(range=to_range(lines, (line, item.replace_from, line, char)), new_text=item.label)
            out.append(T.CompletionItem(
                label=item.label, kind=kinds.get(item.kind), detail=item.detail or None, sort_text=f"{n:05d}",
                documentation=T.MarkupContent(kind=T.MarkupKind.Markdown, value=item.doc) if item.doc else None,
                insert_text=item.insert, text_edit=edit))
        return T.CompletionList(is_incomplete=False, items=out)

    @server.feature(T.TEXT_DOCUMENT_DEFINITION)
    def on_definition(ls, params: T.DefinitionParams):
        uri = params.text_document.uri
        a, line, char = position(uri, params.position)
        found = definition(a, line, char, units.get(uri)) if a is not None else None
        if found is None:
            return None
        file, r = found
        lines = a.text.split("\n") if file == a.path else \
            (SOURCES[file].text.split("\n") if file in SOURCES else [])
        return T.Location(uri=from_fs_path(str(Path(file).resolve())), range=to_range(lines, r))

    @server.feature(T.TEXT_DOCUMENT_DOCUMENT_SYMBOL)
    def on_symbols(ls, params: T.DocumentSymbolParams):
        a = last.get(params.text_document.uri)
        if a is None:
            return None
        kinds = {"model": T.SymbolKind.Class, "block": T.SymbolKind.Struct, "mixer": T.SymbolKind.Function,
                 "section": T.SymbolKind.Namespace, "stage": T.SymbolKind.Package}
        lines = a.text.split("\n")

        def convert(s):
            return T.DocumentSymbol(name=s.name, kind=kinds[s.kind], detail=s.detail or None,
                                    range=to_range(lines, s.range), selection_range=to_range(lines, s.selection),
                                    children=[convert(c) for c in s.children] or None)

        return [convert(s) for s in symbols(a)]

    return server
