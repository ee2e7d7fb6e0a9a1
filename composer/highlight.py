"""A Pygments lexer for the .arch language, so that ```arch blocks highlight in Sphinx, MkDocs and
anything else that uses Pygments. It is registered through the `pygments.lexers` entry point
(pyproject.toml), aliases `arch`, files `*.arch`; install the `highlight` extra for Pygments.

The module imports Pygments and nothing of composer: nothing in composer imports it, so Pygments
stays an optional dependency. The keyword sets follow grammar/*.lark (tests/test_highlight.py
reads the grammar and checks that they agree). The states follow the grammar's nesting: only the
top level holds definitions (`model`, `block`, `mixer`), so `block name(...)` inside a stage is a
block statement, not a definition; `{ }` are bodies, `( )` and `[ ]` expressions.
"""

from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, default, include
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Whitespace

__all__ = ["ArchLexer"]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_WORD_END = r"(?![A-Za-z0-9_])"

DECLARATIONS = ("model", "block", "mixer")  # `block` is also a stage's statement
NAMESPACE = ("import",)
STATEMENTS = ("input", "let", "stem", "head", "stages", "stage", "downsample", "after", "repeat", "as", "save",
              "from", "reuse", "residual", "parallel", "for", "in")
OPERATOR_WORDS = ("and", "or", "not")
CONSTANTS = ("none", "true", "false")
KEYWORDS = frozenset(DECLARATIONS + NAMESPACE + STATEMENTS + OPERATOR_WORDS + CONSTANTS)


def _words(words) -> str:
    return r"\b(?:" + "|".join(words) + r")" + _WORD_END


class ArchLexer(RegexLexer):
    """The .arch blueprint language of composer (docs/language.md)."""

    name = "Arch"
    aliases = ["arch"]
    filenames = ["*.arch"]
    mimetypes = ["text/x-arch"]
    KEYWORDS = KEYWORDS  # every keyword of grammar/*.lark (tests/test_highlight.py)

    tokens = {
        "root": [
            include("space"),
            (r"\b(import)" + _WORD_END, Keyword.Namespace),
            (r"\b(model)(\s+)(" + _NAME + ")", bygroups(Keyword.Declaration, Whitespace, Name.Class), "signature"),
            (r"\b(block|mixer)(\s+)(" + _NAME + r")(?=\s*[({])", bygroups(Keyword.Declaration, Whitespace,
                                                                         Name.Function), "signature"),
            # a fragment of a body (documentation shows statements on their own)
            include("statement"),
        ],
        "space": [
            (r"\s+", Whitespace),
            (r"#[^\n]*", Comment.Single),
        ],
        # after `model NAME` or `block NAME`: parameters, the base model, then the body
        "signature": [
            include("space"),
            (r"\(", Punctuation, "params"),
            (r"(:)(\s*)(" + _NAME + ")", bygroups(Punctuation, Whitespace, Name.Class)),
            (r"\{", Punctuation, ("#pop", "body")),
            default("#pop"),
        ],
        "params": [
            include("space"),
            (_NAME, Name.Variable),
            (r"=(?!=)", Operator, "default"),
            (r",", Punctuation),
            (r"\)", Punctuation, "#pop"),
        ],
        # a parameter's default: an expression up to the next `,` or `)` outside brackets
        "default": [
            (r"(?=[,)])", Punctuation, "#pop"),
            include("expression"),
        ],
        "body": [
            (r"\}", Punctuation, "#pop"),
            include("statement"),
        ],
        "statement": [
            include("space"),
            (r"\{", Punctuation, "body"),
            (r"\b(let)(\s+)(" + _NAME + ")", bygroups(Keyword, Whitespace, Name.Variable)),
            (r"\b(as)(\s+)(" + _NAME + ")", bygroups(Keyword, Whitespace, Name.Label)),
            (r"\b(save|from)(\s+)(" + _NAME + ")", bygroups(Keyword, Whitespace, Name.Variable)),
            (r"\b(parallel)(\s+)(" + _NAME + ")", bygroups(Keyword, Whitespace, Name.Builtin)),
            (r"\b(reuse)(\s+)", bygroups(Keyword, Whitespace), "path"),
            (r"\b(block)(?=\s*[^\s=])", Keyword),
            (_words(STATEMENTS), Keyword),
            # `reference = "..."`, `q = linear(64)`: a setting or a binding
            (_NAME + r"(?=\s*=(?!=))", Name.Variable),
            (r"\}", Punctuation),  # a stray brace of a fragment
            (r";", Punctuation),
            include("expression"),
        ],
        # `reuse stages.{i}.blocks.0.cpe`
        "path": [
            (r"\{" + _NAME + r"\}", String.Interpol),
            (r"[A-Za-z0-9_]+", Name.Namespace),
            (r"\.(?=[A-Za-z0-9_{])", Punctuation),
            default("#pop"),
        ],
        "expression": [
            include("space"),
            (r'"[^"\n]*"', String.Double),
            (r"[0-9][0-9_]*\.[0-9]+([eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+", Number.Float),
            (r"[0-9][0-9_]*", Number.Integer),
            (_words(CONSTANTS), Keyword.Constant),
            (_words(OPERATOR_WORDS), Operator.Word),
            (_words(("for", "in", "as")), Keyword),
            (_NAME + r"(?=\s*\()", Name.Function),  # an op, composite or function call
            (_NAME, Name),
            (r"\*\*|//|==|!=|<=|>=|\.\.|[-+*/%<>?:=]", Operator),
            (r",", Punctuation),
            (r"[(\[]", Punctuation, "nested"),
            (r"[)\]]", Punctuation, "#pop"),
        ],
        # inside ( ) or [ ]: keyword arguments, then any expression
        "nested": [
            include("space"),
            (_NAME + r"(?=\s*=(?!=))", Name.Attribute),
            include("expression"),
        ],
    }
