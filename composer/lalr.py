"""A faster copy of Lark's LALR parse loop and contextual lexer, for the parse of `composer check`.

Lark's own loop hashes grammar rules per action and calls a function per token and per match;
`_Driver` runs over a flattened copy of the parse tables (one lookup per action, no call for a
rule that only passes its single child on) fed by `_lex` (the contextual lexer in one loop).
The parse-state bookkeeping and every error are still Lark's. It is written against Lark's
internals: `driver` gives None where they differ (the caller then uses Lark's own loop), and
`FAST = False` switches it off (tests/test_speed_invariants.py proves both give the same AST).
"""

from __future__ import annotations

FAST = True  # False: Lark's own loop and lexer (slower, same results)
_DRIVERS: dict = {}  # id(Lark parser) -> (parser, its `_Driver` or None)


def driver(parser):
    """The fast driver for this Lark parser, or None (switched off, or another Lark)."""
    if not FAST:
        return None
    known = _DRIVERS.get(id(parser))
    if known is None or known[0] is not parser:
        try:
            made = _Driver(parser)
        except Exception:  # noqa: BLE001 - another Lark than the one this was written against: its own loop then
            made = None
        known = _DRIVERS[id(parser)] = (parser, made)
    return known[1]


class _Driver:
    """Lark's LALR loop over a flattened copy of its tables: one lookup per action instead of
    hashing grammar rules, and no call for a rule that only passes its single child on (most of
    the expression precedence chain), fed by `_lex` (Lark's contextual lexer in one tight loop).
    The parse-state bookkeeping and every error are Lark's own: on a token the table has no action
    for, Lark's loop takes over and raises; on text no terminal matches, Lark's lexer does."""

    def __init__(self, parser):
        from lark.parse_tree_builder import ExpandSingleChild
        from lark.parsers.lalr_analysis import Shift
        from lark.parsers.lalr_parser_state import ParseConf, ParserState

        self.frontend = parser.parser
        self.core = self.frontend.parser.parser
        callbacks = self.core.callbacks
        if any(isinstance(k, str) for k in callbacks):  # terminal callbacks: not handled here
            raise TypeError("terminal callbacks")
        states = self.core.parse_table.states

        class Actions(dict):
            """state -> its row of the table, flattened when the parser first reaches the state
            (flattening every state took about 20 ms of every start)."""

            def __missing__(self, state):
                flat = {}
                for sym, (action, arg) in states[state].items():
                    if action is Shift:
                        flat[sym] = (True, arg)
                    else:
                        size, callback = len(arg.expansion), callbacks[arg]
                        single = size == 1 and isinstance(callback, ExpandSingleChild)
                        flat[sym] = (False, size, callback, arg.origin.name, single)
                self[state] = flat
                return flat

        actions = Actions()
        self.conf = ParseConf
        self.state_class = _fast_state(ParserState, actions)
        self.thread_class = _lexer_thread(self.frontend.lexer)

    def parse(self, text: str, start: str):
        conf = self.conf(self.core.parse_table, self.core.callbacks, start)
        state = self.state_class(conf, self.thread_class.from_text(self.frontend.lexer, text))
        return self.core.parse_from_state(state)


def _lexer_thread(connector):
    """Lark's LexerThread, lexing with `_lex` instead of `ContextualLexer.lex` (then the post-lexer)."""
    from lark.lexer import ContextualLexer, LexerThread
    from lark.parser_frontends import PostLexConnector

    if not (isinstance(connector, PostLexConnector) and type(connector.lexer) is ContextualLexer):
        raise TypeError("another lexer than this was written against")
    contextual, postlex = connector.lexer, connector.postlexer

    class FastThread(LexerThread):
        def lex(self, parser_state):
            return postlex.process(_lex(contextual, self.state, parser_state))

    return FastThread


def _lex(contextual, lexer_state, parser_state):
    """`ContextualLexer.lex` in one loop: the same terminal regexes (Lark's scanner of the parser
    state's lexer), ignored terminals, keyword callbacks, line counting and tokens, without a call
    per token and per match. Where no terminal matches, Lark's own lexer takes over from the same
    position and raises its error."""
    from lark.lexer import Token

    new_token = Token._future_new  # Token(...) without the check for the deprecated `type_` keyword
    text, end = lexer_state.text.text, lexer_state.text.end
    counter = lexer_state.line_ctr
    nl = counter.newline_char
    lexers, tables = contextual.lexers, {}
    pos, line, start = counter.char_pos, counter.line, counter.line_start_pos
    while pos < end:
        basic = lexers[parser_state.position]
        table = tables.get(id(basic))
        if table is None:
            table = tables[id(basic)] = (basic.scanner._mres, basic.ignore_types, basic.newline_types,
                                         basic.callback)
        mres, ignore, newline_types, callbacks = table
        for mre in mres:
            m = mre.match(text, pos, end)
            if m:
                break
        else:
            yield from contextual.lex(lexer_state, parser_state)  # raises UnexpectedCharacters/Token
            return
        value, kind = m.group(0), m.lastgroup
        begin, first_line, column = pos, line, pos - start + 1
        if kind in newline_types:  # counted as LineCounter.feed counts
            newlines = value.count(nl)
            if newlines:
                line += newlines
                start = pos + value.rindex(nl) + 1
        pos += len(value)
        counter.char_pos, counter.line, counter.line_start_pos = pos, line, start
        counter.column = pos - start + 1
        callback = callbacks.get(kind)
        if kind in ignore and callback is None:  # whitespace, comments
            continue
        tok = new_token(kind, value, begin, first_line, column, line, counter.column, pos)
        if callback is not None:  # a keyword lexed as a name gets its own type
            tok = callback(tok)
        if kind not in ignore:
            lexer_state.last_token = tok
            yield tok


def _fast_state(base, actions):
    chains = {}  # (state below, top state, token kind) -> the top state after the pass-through reductions

    def chain(below, top, kind):
        """Reductions of a rule that passes its single child on only change the top state, and
        the next one depends on the state below it (unchanged) and the lookahead: follow them."""
        state = top
        while True:
            act = actions[state].get(kind)
            if act is None or act[0] or not act[4]:
                break
            state = actions[below][act[3]][1]
        chains[below, top, kind] = state
        return state

    class FastState(base):
        __slots__ = ()

        def feed_token(self, token, is_end=False):
            state_stack, value_stack = self.state_stack, self.value_stack
            end_state, kind = self.parse_conf.end_state, token.type
            while True:
                try:
                    act = actions[state_stack[-1]][kind]
                except KeyError:
                    return base.feed_token(self, token, is_end)  # Lark raises its UnexpectedToken
                if act[0]:
                    state_stack.append(act[1])
                    value_stack.append(token)
                    return None
                _, size, callback, origin, single = act
                if single:
                    if is_end:  # one at a time: the end state may come up on the way
                        state_stack[-1] = actions[state_stack[-2]][origin][1]
                    else:
                        below, top = state_stack[-2], state_stack[-1]
                        state = chains.get((below, top, kind))
                        state_stack[-1] = chain(below, top, kind) if state is None else state
                        continue
                else:
                    if size:
                        children = value_stack[-size:]
                        del state_stack[-size:]
                        del value_stack[-size:]
                    else:
                        children = []
                    value_stack.append(callback(children))
                    state_stack.append(actions[state_stack[-1]][origin][1])
                if is_end and state_stack[-1] == end_state:
                    return value_stack[-1]

    return FastState
