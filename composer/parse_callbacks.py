"""The grammar's callbacks (`Callbacks`): they build the `ast` of a file while Lark's LALR parser
reduces, each value wrapped with the source region of its rule. The parser and its post-lexer are
composer/parse.py's."""

from __future__ import annotations

from lark import Token

from . import ast
from .budget import MAX_DIGITS, MAX_NUMBER, too_big
from .diagnostics import ComposerError, error
from .source import Span


class _V:
    """A value built during parsing with the source region it covers (the region of the rule,
    which for a parenthesised expression or a unary `+` is wider than the value's own span)."""

    __slots__ = ("column", "end_column", "end_line", "line", "v")

    def __init__(self, v, line, column, end_line, end_column):
        self.v, self.line, self.column, self.end_line, self.end_column = v, line, column, end_line, end_column


def _vals(c) -> list:
    """The values among a rule's children (tokens, placeholders and separators dropped)."""
    return [x.v for x in c if x.__class__ is _V]


def _split(c, kind: str) -> tuple[list, list]:
    """A rule's children before and after its first `kind` token (e.g. the '{' of a body).
    Optional parts are found by what they are, not where: the number of placeholders an absent
    `[...]` leaves is Lark's business."""
    for i, x in enumerate(c):
        if x.__class__ is Token and x.type == kind:
            return c[:i], c[i + 1:]
    return c, []


def _after(c, kind: str):
    """The token right after the first `kind` token (`as NAME`, `: NAME`), else None."""
    for i, x in enumerate(c):
        if x.__class__ is Token and x.type == kind:
            return next((y for y in c[i + 1:] if y is not None), None)
    return None


def _first_val(c):
    """The first value among the children (a placeholder or a token is not one), else None."""
    return next((x for x in c if x.__class__ is _V), None)


class Callbacks:
    """Builds the `ast` while Lark's LALR parser reduces (no parse tree is made).

    Methods are named after the grammar's rules (imported expression rules carry an `expr__`
    prefix) and get every child of the rule: the parser runs with `keep_all_tokens`, so punctuation
    and keywords are there too, and an absent optional part is a `None` per symbol. A rule's region
    runs from its first child to its last, exactly as Lark's `propagate_positions` computes it.
    Errors found here are kept and raised after the parse, so a syntax error later in the file
    still wins, as when the tree was transformed after parsing."""

    def __init__(self):
        self.file = "<string>"
        self.error = None
        self.named = []  # every `x as name` list element of this parse
        self.placed = set()  # ids of those that name a layer of a statement

    def _place(self, value) -> None:
        """A statement's value: the `as` elements of its lists name layers. (A block's inline body,
        a tuple of statements, holds none: its statements placed theirs.)"""
        if self.named and value.__class__ is not tuple:
            self.placed.update(map(id, ast.layer_names(value)))

    @staticmethod
    def _region(c) -> tuple[int, int, int, int]:
        """(line, column, end line, end column) of a rule's children, optional (None) ones skipped."""
        first = c[0] if c[0] is not None else next(x for x in c if x is not None)
        last = c[-1] if c[-1] is not None else next(x for x in reversed(c) if x is not None)
        return first.line, first.column, last.end_line, last.end_column

    def _wrap(self, c, value) -> _V:
        return _V(value, *self._region(c))

    def _node(self, c, cls, *args) -> _V:
        """`cls(*args, span)` for this rule, wrapped with its region."""
        region = self._region(c)
        return _V(cls(*args, Span(self.file, *region)), *region)

    def _spanned(self, c, make) -> _V:
        """`make(span)` for this rule (a node whose span is not its last field), wrapped with its region."""
        region = self._region(c)
        return _V(make(Span(self.file, *region)), *region)

    def _fail(self, exc: ComposerError) -> None:
        if self.error is None:
            self.error = exc

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.file, tok.line, tok.column, tok.end_line, tok.end_column)

    def _args(self, arglist) -> tuple[tuple, tuple]:
        args, kwargs, seen_kw = [], [], False
        for item in (arglist.v if arglist is not None else ()):
            if isinstance(item, tuple):
                kwargs.append(item)
                seen_kw = True
            else:
                if seen_kw:
                    self._fail(error("syntax", "positional argument after keyword argument", item.span))
                args.append(item)
        seen = set()
        for kname, _, span in kwargs:
            if kname in seen:
                self._fail(error("duplicate-argument", f"argument '{kname}' given twice", span))
            seen.add(kname)
        return tuple(args), tuple(kwargs)

    # ---- expressions
    def expr__int_lit(self, c):
        digits = str(c[0]).replace("_", "")
        if len(digits) > MAX_DIGITS:  # Python's int() refuses over 4,300 digits: say what is wrong first
            self._fail(error("too-large", f"too large: an integer of {len(digits):,} digits", self._tok_span(c[0]),
                             f"numbers must stay below {MAX_NUMBER:.3g} in magnitude"))
            return self._node(c, ast.Literal, 0)
        return self._literal(c, int(digits))

    def expr__float_lit(self, c):
        return self._literal(c, float(str(c[0]).replace("_", "")))

    def _literal(self, c, value):
        try:
            too_big(value, self._tok_span(c[0]))
        except ComposerError as exc:
            self._fail(exc)
        return self._node(c, ast.Literal, value)

    def expr__str_lit(self, c):
        return self._node(c, ast.Literal, str(c[0])[1:-1])

    def expr__none_lit(self, c):
        return self._node(c, ast.Literal, None)

    def expr__true_lit(self, c):
        return self._node(c, ast.Literal, True)

    def expr__false_lit(self, c):
        return self._node(c, ast.Literal, False)

    def expr__name(self, c):
        return self._node(c, ast.Name, str(c[0]))

    def expr__list_lit(self, c):  # [ "[" expr "," expr ... "]" ]
        return self._node(c, ast.ListExpr, tuple(x for x in _vals(c) if x is not None))

    def expr__list_comp(self, c):  # "[" expr "for" NAME "in" expr "]"
        return self._node(c, ast.ListComp, c[1].v, str(c[3]), c[5].v)

    def expr__atom(self, c):  # "(" expr ")": the value itself, its region widened to the brackets
        inner = c[1]
        return _V(inner.v, c[0].line, c[0].column, c[2].end_line, c[2].end_column)

    def expr__named_item(self, c):  # expr "as" NAME, inside a list literal
        node = self._node(c, ast.Named, c[0].v, str(c[2]))
        self.named.append(node.v)
        return node

    def expr__index(self, c):  # postfix "[" expr "]"
        return self._node(c, ast.Index, c[0].v, c[2].v)

    def expr__call(self, c):  # postfix "(" [arglist] ")"
        args, kwargs = self._args(_first_val(c[1:]))
        return self._node(c, ast.Call, c[0].v, args, kwargs)

    def arglist(self, c):
        return self._wrap(c, _vals(c))

    def expr__kwarg(self, c):  # NAME "=" expr
        return self._wrap(c, (str(c[0]), c[2].v, self._tok_span(c[0])))

    def expr__binop(self, c):  # left OP right
        return self._node(c, ast.BinOp, str(c[1]), c[0].v, c[2].v)

    def expr__neg(self, c):  # ADD unary
        if str(c[0]) == "+":
            return self._wrap(c, c[1].v)
        return self._node(c, ast.UnaryOp, "-", c[1].v)

    def expr__not_op(self, c):  # "not" x
        return self._node(c, ast.UnaryOp, "not", c[1].v)

    def expr__and_op(self, c):
        return self._node(c, ast.BinOp, "and", c[0].v, c[2].v)

    def expr__or_op(self, c):
        return self._node(c, ast.BinOp, "or", c[0].v, c[2].v)

    def expr__conditional(self, c):  # test "?" then ":" orelse
        return self._node(c, ast.Conditional, c[0].v, c[2].v, c[4].v)

    # ---- statements
    def save_stmt(self, c):  # "save" NAME
        return self._node(c, ast.Save, str(c[1]))

    def from_stmt(self, c):  # "from" NAME
        return self._node(c, ast.Load, str(c[1]))

    def bind_stmt(self, c):  # NAME ("," NAME)* "=" (expr ["as" NAME] | seq)
        names = tuple(str(x) for x in c if x.__class__ is Token and x.type == "NAME" and x is not _after(c, "AS"))
        value = next(x.v for x in c if x.__class__ is _V)
        if value.__class__ is tuple:
            return self._node(c, ast.Bind, names, None, None, value)
        alias = _after(c, "AS")
        self._place(value)
        return self._node(c, ast.Bind, names, value, str(alias) if alias is not None else None, None)

    def reuse_stmt(self, c):  # "reuse" MODULE_PATH
        return self._node(c, ast.Reuse, str(c[1]))

    def let_stmt(self, c):  # "let" NAME "=" expr
        return self._node(c, ast.Let, str(c[1]), c[3].v)

    def assign_stmt(self, c):  # NAME "=" expr
        return self._node(c, ast.Assign, str(c[0]), c[2].v)

    def apply_stmt(self, c):  # expr ["as" NAME]
        alias = _after(c, "AS")
        self._place(c[0].v)
        return self._node(c, ast.Apply, c[0].v, str(alias) if alias is not None else None)

    def seq(self, c):  # "{" ... "}"
        return self._wrap(c, tuple(x for x in _vals(c) if x is not None))

    def residual_stmt(self, c):  # "residual" ["(" [arglist] ")"] "{" ... "}"
        head, body = _split(c, "LBRACE")
        args, kwargs = self._args(_first_val(head))
        return self._node(c, ast.Residual, args, kwargs, tuple(x for x in _vals(body) if x is not None))

    def parallel_stmt(self, c):  # "parallel" NAME ["(" [arglist] ")"] "{" branches "}"
        head, body = _split(c, "LBRACE")
        args, kwargs = self._args(_first_val(head))
        for x in body:  # `{}` would be an identity branch no printer can write back: name it
            if x.__class__ is _V and x.v == ():
                self._fail(error("syntax", "an empty parallel branch", Span(self.file, x.line, x.column,
                                                                           x.end_line, x.end_column),
                                 "write `identity` for a branch that passes the input through"))
        branches = tuple(b if isinstance(b, tuple) else (b,) for b in _vals(body) if b is not None)
        return self._node(c, ast.Parallel, str(c[1]), args, kwargs, branches)

    def parallel_for_stmt(self, c):  # "parallel" NAME ["(" [arglist] ")"] "for" NAME "in" expr [".." expr] "{" ... "}"
        head, body = _split(c, "LBRACE")
        before, after = _split(head, "FOR")
        args, kwargs = self._args(_first_val(before))
        bounds = _vals(after)
        items, stop = bounds[0], bounds[1] if len(bounds) > 1 else None
        stmts = tuple(x for x in _vals(body) if x is not None)
        return self._node(c, ast.ParallelFor, str(c[1]), args, kwargs, str(after[0]), items, stop, stmts)

    def _sec(self, kind, c):  # KEYWORD section
        body = c[1].v
        return self._node(c, ast.Section, kind, body if isinstance(body, tuple) else (body,))

    def stem_stmt(self, c):
        return self._sec("stem", c)

    def head_stmt(self, c):
        return self._sec("head", c)

    def downsample_stmt(self, c):
        return self._sec("downsample", c)

    def stage_norm_stmt(self, c):
        return self._sec("norm", c)

    def repeat_stmt(self, c):  # "repeat" expr ["as" NAME] [":"] block
        var = _after(c, "AS")
        self._place(c[-1].v)
        return self._node(c, ast.Repeat, c[1].v, str(var) if var is not None else None, c[-1].v)

    def single_block(self, c):  # "block" block
        self._place(c[1].v)
        return self._node(c, ast.Repeat, None, None, c[1].v)

    def stages_stmt(self, c):  # "stages" "for" NAME "in" expr ".." expr "{" items "}"
        head, rest = _split(c, "LBRACE")
        start, stop = _vals(head)
        items = tuple(x for x in _vals(rest) if x is not None)
        return self._spanned(c, lambda span: ast.Stage(items, span, str(c[2]), start, stop))

    def stage_stmt(self, c):  # "stage" "{" items "}"
        items = tuple(x for x in _vals(c) if x is not None)
        return self._spanned(c, lambda span: ast.Stage(items, span))

    def input_stmt(self, c):  # "input" expr
        return self._node(c, ast.Input, c[1].v)

    def param(self, c):  # NAME ["=" expr]
        default = _first_val(c)
        return self._node(c, ast.Param, str(c[0]), default.v if default is not None else None)

    def params(self, c):  # "(" [param ("," param)* [","]] ")"
        params = tuple(p for p in _vals(c) if p is not None)
        names = [p.name for p in params]
        for i, p in enumerate(params):
            if p.name in names[:i]:
                self._fail(error("duplicate-parameter", f"parameter '{p.name}' declared twice", p.span))
        return self._wrap(c, params)

    def model_def(self, c):  # "model" NAME [params] [":" NAME] "{" ... "}"
        head, rest = _split(c, "LBRACE")
        params, base = _first_val(head), _after(head, "COLON")
        name, params = str(c[1]), params.v if params is not None else ()
        body = tuple(x for x in _vals(rest) if x is not None)
        base = str(base) if base is not None else None
        return self._spanned(c, lambda span: ast.ModelDef(name, params or (), base, body, span, self.file))

    def composite_def(self, c):  # KIND NAME [params] "{" ... "}"
        head, rest = _split(c, "LBRACE")
        params = _first_val(head)
        kind, name, params = str(c[0]), str(c[1]), params.v if params is not None else ()
        body = tuple(x for x in _vals(rest) if x is not None)
        return self._spanned(c, lambda span: ast.CompositeDef(kind, name, params or (), body, span, self.file))

    def import_stmt(self, c):  # "import" STRING
        return self._node(c, ast.Import, str(c[1])[1:-1])

    def start(self, c):
        file = ast.File(self.file)
        for item in _vals(c):
            if isinstance(item, ast.Import):
                file.imports.append(item)
            elif isinstance(item, ast.ModelDef):
                file.models.append(item)
            elif isinstance(item, ast.CompositeDef):
                file.composites.append(item)
        return file


def unwrapped(result):
    """What a parse gave, without the region of its rule (a value wrapped by the callbacks)."""
    if isinstance(result, _V):
        result = result.v
    return result
