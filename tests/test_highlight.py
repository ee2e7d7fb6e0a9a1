"""Highlighting: the Pygments lexer (composer/highlight.py) and the TextMate grammar of the VS Code
extension (editors/vscode/). Both know every keyword of grammar/*.lark (read here, so that a new
keyword cannot be forgotten), lex every zoo and lib file and every ```arch block of the docs
without an error, and name what the parser finds: each model and composite definition."""

from __future__ import annotations

import fnmatch
import importlib
import json
import re

import pytest
from helpers import REPO

from composer.parse import parse_text

pygments = pytest.importorskip("pygments")
from pygments.token import Error, Keyword, Name, Operator  # noqa: E402

from composer.highlight import ArchLexer  # noqa: E402

GRAMMAR = json.loads((REPO / "editors" / "vscode" / "syntaxes" / "arch.tmLanguage.json").read_text())
ZOO = sorted((REPO / "blueprints").glob("*.arch")) + sorted((REPO / "blueprints" / "lib").glob("*.arch"))


def lark_keywords() -> set[str]:
    """The words the grammar writes as literals ("model", "let", "and", ...)."""
    words = set()
    for path in (REPO / "grammar").glob("*.lark"):
        text = re.sub(r"//[^\n]*", "", path.read_text())
        words |= set(re.findall(r'"([A-Za-z_]+)"', text))
    return words


def sources() -> dict[str, str]:
    """Every zoo and lib file, and every ```arch block of README.md and docs/*.md."""
    out = {str(p.relative_to(REPO)): p.read_text() for p in ZOO}
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        fences = re.finditer(r"^([ \t]*)```arch\b[^\n]*\n(.*?)^\1```", md.read_text(), re.S | re.M)
        for i, m in enumerate(fences):
            out[f"{md.name} block {i + 1}"] = "".join(line[len(m.group(1)):] for line in m.group(2).splitlines(True))
    return out


SOURCES = sources()


def test_the_sources_are_found():
    assert len(ZOO) >= 80 and len(SOURCES) >= len(ZOO) + 30  # 63 zoo + 19 lib files, 34 doc blocks today


def test_the_grammar_keywords_are_read():
    # a hand count of grammar/*.lark's keyword literals today (the sets below follow the grammar)
    assert {"model", "block", "mixer", "import", "let", "stages", "parallel", "reuse", "and", "none"} <= lark_keywords()
    assert len(lark_keywords()) == 27


# ---- Pygments --------------------------------------------------------------------------

EVERY_KEYWORD = """import "lib/x"
block b(dim) { residual { layernorm; relu } }
mixer m(dim, heads = 2) {
    let n = dim
    save s
    from s
    parallel add { identity; relu }
    x = [a for a in [1, 2]]
    not true and false or none
}
model a(depth = 2) : base {
    input image(3, 32)
    stem conv(8) as proj
    stages for i in 0..2 { downsample relu; repeat depth as j conv(8); block relu; after layernorm; reuse stages.0 }
    stage { block relu }
    head classifier(10)
}
"""


def test_the_lexer_knows_every_keyword_of_the_grammar():
    assert ArchLexer.KEYWORDS == lark_keywords()
    lexed = {v for t, v in ArchLexer().get_tokens(EVERY_KEYWORD) if t in Keyword or t in Operator.Word}
    assert lexed == lark_keywords()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_source_lexes_without_an_error_token(name):
    text = SOURCES[name]
    tokens = list(ArchLexer().get_tokens_unprocessed(text))
    bad = [(text.count("\n", 0, i) + 1, v) for i, t, v in tokens if t in Error]
    assert not bad, f"{name}: error tokens at (line, text) {bad[:5]}"
    assert "".join(v for _, _, v in tokens) == text


def test_definitions_are_named_as_the_parser_names_them():
    for path in ZOO:
        text = path.read_text()
        file = parse_text(text, str(path))
        tokens = [(t, v) for t, v in ArchLexer().get_tokens(text) if v.strip()]
        defined = {(d, tokens[i + 1]) for i, (t, d) in enumerate(tokens) if t is Keyword.Declaration}
        expected = {("model", (Name.Class, m.name)) for m in file.models} | {
            (c.kind, (Name.Function, c.name)) for c in file.composites}
        assert defined == expected, path


def test_the_entry_point_names_the_lexer():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["pygments.lexers"]["arch"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is ArchLexer
    # pygments is an optional extra, and in the test extra
    extras = project["optional-dependencies"]
    assert any(d.startswith("pygments") for d in extras["highlight"]) and any(
        d.startswith("pygments") for d in extras["test"])
    assert ArchLexer.aliases == ["arch"] and any(fnmatch.fnmatch("swin.arch", p) for p in ArchLexer.filenames)


def test_pygments_finds_the_lexer_through_the_entry_point(tmp_path, monkeypatch):
    """pyproject's entry point, installed as pip would write it (a dist-info folder on the path):
    Pygments' own look-ups find the lexer by name and by file name."""
    tomllib = pytest.importorskip("tomllib")
    from pygments.lexers import get_lexer_by_name, get_lexer_for_filename

    points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["pygments.lexers"]
    info = tmp_path / "arch_composer_probe-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: arch-composer-probe\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[pygments.lexers]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(get_lexer_by_name("arch"), ArchLexer)
    assert isinstance(get_lexer_for_filename("swin.arch"), ArchLexer)


def test_pygments_finds_the_lexer_when_installed():
    from importlib.metadata import entry_points

    from pygments.lexers import get_lexer_by_name, get_lexer_for_filename

    if not any(e.name == "arch" for e in entry_points(group="pygments.lexers")):
        pytest.skip("the installed arch-composer predates the entry point: reinstall (pip install -e .)")
    assert isinstance(get_lexer_by_name("arch"), ArchLexer)
    assert isinstance(get_lexer_for_filename("swin.arch"), ArchLexer)


def test_the_highlight_module_imports_only_pygments():
    text = (REPO / "composer" / "highlight.py").read_text()
    imports = re.findall(r"^\s*(?:from|import) ([\w.]+)", text, re.M)
    assert imports and all(m == "__future__" or m.split(".")[0] == "pygments" for m in imports), imports


# ---- the TextMate grammar --------------------------------------------------------------

def rules(node):
    """Every rule of the grammar (a dict with match, begin or include), nested ones too."""
    if isinstance(node, dict):
        if any(k in node for k in ("match", "begin", "include", "patterns")):
            yield node
        for v in node.values():
            yield from rules(v)
    elif isinstance(node, list):
        for v in node:
            yield from rules(v)


def test_the_textmate_grammar_is_well_formed():
    assert GRAMMAR["scopeName"] == "source.arch"
    for rule in rules(GRAMMAR):
        for key in ("match", "begin", "end"):
            if key in rule:
                re.compile(rule[key])  # no Oniguruma-only syntax: Python's re compiles every pattern
        if "begin" in rule:
            assert "end" in rule, rule
        inc = rule.get("include")
        if inc:
            assert inc in ("$self", "$base") or inc[1:] in GRAMMAR["repository"], inc
        for key in ("captures", "beginCaptures", "endCaptures"):
            for group in rule.get(key, {}):
                assert group.isdigit()
    package = json.loads((REPO / "editors" / "vscode" / "package.json").read_text())
    language = package["contributes"]["languages"][0]
    assert language["id"] == "arch" and language["extensions"] == [".arch"]
    assert package["contributes"]["grammars"][0]["path"] == "./syntaxes/arch.tmLanguage.json"
    config = json.loads((REPO / "editors" / "vscode" / "language-configuration.json").read_text())
    assert config["comments"]["lineComment"] == "#"
    for key in ("increaseIndentPattern", "decreaseIndentPattern"):
        re.compile(config["indentationRules"][key])


def test_the_textmate_keywords_are_the_grammar_keywords():
    words = set()
    for rule in rules(GRAMMAR):
        name = rule.get("name", "")
        m = re.fullmatch(r"\\b\(\?:([a-z|]+)\)\\b", rule.get("match", ""))
        if m and name.startswith(("keyword.", "storage.type.", "constant.language.")):
            words |= set(m.group(1).split("|"))
    assert words == lark_keywords()


class TextMate:
    """A small TextMate tokenizer (match, begin/end, captures, include; the earliest match wins,
    the end pattern on a tie), enough to run the grammar over a file as an editor would."""

    def __init__(self, grammar: dict):
        self.repo = grammar["repository"]
        self.root = grammar["patterns"]
        self.compiled: dict[str, re.Pattern] = {}

    def rx(self, pattern: str) -> re.Pattern:
        if pattern not in self.compiled:
            self.compiled[pattern] = re.compile(pattern)
        return self.compiled[pattern]

    def flat(self, patterns, seen=()) -> list[dict]:
        """The rules a list of patterns tries, includes expanded (a begin rule's own patterns
        only once it has begun)."""
        out = []
        for p in patterns:
            if "include" in p:
                name = p["include"][1:]
                if name not in seen:
                    out += self.flat([self.repo[name]], seen + (name,))
            elif "match" in p or "begin" in p:
                out.append(p)
            else:
                out += self.flat(p["patterns"], seen)
        return out

    def tokens(self, text: str):
        """(scope, text) of every named match and capture; then the depth left open at the end."""
        found, stack = [], [(self.flat(self.root), None)]
        for line in text.split("\n"):
            pos, steps = 0, 0
            while pos <= len(line):
                steps += 1
                assert steps < 10_000, line
                patterns, end = stack[-1]
                best = None
                if end is not None:
                    m = end.search(line, pos)
                    if m:
                        best = (m.start(), 0, m, None)
                for i, rule in enumerate(patterns, 1):
                    m = self.rx(rule.get("match") or rule["begin"]).search(line, pos)
                    if m and (best is None or m.start() < best[0]):
                        best = (m.start(), i, m, rule)
                if best is None:
                    break
                _, _, m, rule = best
                if rule is None:
                    stack.pop()
                elif "begin" in rule:
                    self.record(found, m, rule.get("name"), rule.get("beginCaptures", {}))
                    stack.append((self.flat(rule.get("patterns", [])), self.rx(rule["end"])))
                else:
                    self.record(found, m, rule.get("name"), rule.get("captures", {}))
                if m.end() == pos and rule is not None and "begin" not in rule:
                    pos += 1  # an empty match that changes nothing
                else:
                    pos = m.end()
        return found, len(stack) - 1

    @staticmethod
    def record(found, m, name, captures):
        if name:
            found.append((name, m.group(0)))
        for group, cap in captures.items():
            if m.group(int(group)) is not None and "name" in cap:
                found.append((cap["name"], m.group(int(group))))


def test_the_textmate_grammar_names_every_definition_of_the_zoo():
    engine = TextMate(GRAMMAR)
    for path in ZOO:
        text = path.read_text()
        found, depth = engine.tokens(text)
        assert depth == 0, f"{path}: {depth} scopes left open at the end"
        assert not [t for s, t in found if s.startswith("invalid")], path
        file = parse_text(text, str(path))
        assert {t for s, t in found if s == "entity.name.type.model.arch"} == {m.name for m in file.models}, path
        assert {t for s, t in found if s == "entity.name.function.composite.arch"} == {
            c.name for c in file.composites}, path
        keywords = {t for s, t in found if s.startswith(("keyword.control", "storage.type"))}
        assert keywords <= lark_keywords(), (path, keywords - lark_keywords())


def test_the_textmate_grammar_scopes_a_line_as_expected():
    found, depth = TextMate(GRAMMAR).tokens(EVERY_KEYWORD)
    assert depth == 0
    scopes = {(s, t) for s, t in found}
    assert ("entity.name.type.model.arch", "a") in scopes
    assert ("entity.other.inherited-class.arch", "base") in scopes
    assert ("variable.parameter.arch", "heads") in scopes and ("constant.numeric.integer.arch", "2") in scopes
    assert ("entity.name.function.call.arch", "conv") in scopes
    assert ("string.quoted.double.arch", '"lib/x"') in scopes
    assert ("entity.name.namespace.module-path.arch", "stages.0") in scopes
    assert ("keyword.operator.range.arch", "..") in scopes
    words = {t for s, t in found if s.startswith(("keyword", "storage.type", "constant.language"))}
    assert words >= lark_keywords()
