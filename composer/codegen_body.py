"""One forward function of a standalone Python file (composer/codegen.py), written from a built
`Sequence`'s program (composer/program.py): one emitter per instruction type.

The program runs on a state: the flowing tensor, the grid its tokens lie on (`program.GRID`), the
named tensors of `save`/`from` and bindings, and their grids. Here each value of that state is a
`Temp` (a local variable to be named), so the function is straight-line code: the state becomes
local variables, read from parameters when the function needs them from its caller (`needs`) and
returned when it changes them for a later function (`gives`). Values nothing reads are dropped,
and the variables are named last (`name_temps`): a binding `q = ...` is `q`, a residual's input
`shortcut`, a parallel branch `x1`, `x2`, ..., the flowing tensor `x`, reusing a name once its value
is dead, as a person writing it would."""

from __future__ import annotations

import keyword

from .builder import Sequence, shared_module
from .program import (GRID, Attend, Call, Forget, GridCall, Load, MapGrid, Parallel, Residual, Save, Shared, StaticGrid,
                      TensorCall, ToMap, ToTokens, TrainCall)

RESERVED = {"self", "torch", "nn", "F", "math", "drop_path", "attention_mask", "super", "input", "range", "len"}


class Temp:
    """A value: `pref` the name it would like, `name` the name it gets."""

    __slots__ = ("pref", "name", "bound")

    def __init__(self, pref: str):
        self.pref, self.name, self.bound = pref, None, False


class Slot:
    """A literal of one instance (a channel count, a drop-path rate, a grid): inlined when every
    instance of the class has the same value, else a constructor parameter (`hint`: its name)."""

    __slots__ = ("value", "hint", "where")

    def __init__(self, value, hint: str, where: str):
        self.value, self.hint, self.where = value, hint, where


class DropPath:
    """`drop_path(temp, rate, self.training)`, or just `temp` when the rate is 0 in every instance."""

    __slots__ = ("temp", "slot")

    def __init__(self, temp, slot):
        self.temp, self.slot = temp, slot


class Stmt:
    __slots__ = ("defs", "pieces", "pure", "ties")

    def __init__(self, defs, pieces, pure=False, ties=()):
        self.defs, self.pieces, self.pure, self.ties = defs, pieces, pure, ties

    def uses(self):
        out = []
        for p in self.pieces:
            if p.__class__ is Temp:
                out.append(p)
            elif p.__class__ is DropPath:
                out.append(p.temp)
        return out


class Need:
    """A state value the function has not set itself: its caller's, a parameter once it is read."""

    __slots__ = ("var",)

    def __init__(self, var):
        self.var = var


def short_name(key: str) -> str:
    """A local variable name for a state key: `attn@2.q` -> `q`, ` grid` -> `grid`."""
    if key.startswith(GRID):
        return "grid" if key == GRID else "grid_" + short_name(key[len(GRID):])
    name = key.lstrip("~").split("#")[0].rsplit(".", 1)[-1].split("@")[0]
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name).strip("_") or "t"
    if name[0].isdigit():
        name = "t" + name
    if name == "input":
        return "inputs"
    return name + "_" if keyword.iskeyword(name) or name in RESERVED else name


class Body:
    """The statements of one function. `signature(child)` gives a called Sequence's (needs, gives)
    and its class; `live`: the state keys some function reads from its caller (returned when set)."""

    def __init__(self, seq, signature, live, child_reads):
        self.seq, self.signature, self.live, self.child_reads = seq, signature, live, child_reads
        self.from_child: dict = {}  # id(Temp) -> the state key a called function returned it as
        self.stmts: list[Stmt] = []
        self.params: dict = {}  # state key -> Temp
        self.pref = "x"
        self.branch = 0

    # ------------------------------------------------------------------ state
    def get(self, env, key):
        value = env.get(key, Need(key))
        if id(value) in self.from_child:
            self.child_reads.add(self.from_child[id(value)])
        if value.__class__ is Need:
            value = self.params.get(value.var) or self.params.setdefault(value.var, Temp(short_name(value.var)))
            env[key] = value
        return value

    def new(self, pref=None):
        return Temp(pref or self.pref)

    def emit(self, defs, *pieces, pure=False, ties=()):
        self.stmts.append(Stmt(list(defs), list(pieces), pure, ties))

    # ------------------------------------------------------------------ the program
    def run(self, prog, x, env):
        for ins in prog:
            x = getattr(self, "on_" + ins.__class__.__name__)(ins, x, env)
        return x

    def module(self, name):
        return self.seq._modules[name]

    def on_Call(self, ins, x, env):
        mod = self.module(ins.name)
        if isinstance(mod, Sequence):
            return self.call_child(f"self.{ins.name}", mod, x, env)
        y = self.new()
        self.emit([y], y, f" = self.{ins.name}(", x, ")")
        return y

    on_TrainCall = on_Call

    def on_GridCall(self, ins, x, env):
        y, grid = self.new(), self.get(env, GRID)
        self.emit([y], y, f" = self.{ins.name}(", x, ", ", grid, ")")
        if ins.regrid:
            g = self.new("grid")
            self.emit([g], g, f" = self.{ins.name}.out_grid(", grid, ")", pure=True)
            env[GRID] = g
        return y

    def on_TensorCall(self, ins, x, env):
        y = self.new()
        args = [x] + [p for k in ins.keys for p in (", ", self.get(env, k))]
        if not ins.grids:
            self.emit([y], y, f" = self.{ins.name}(", *args, ")")
            return y
        grids = self.grids_tuple(env, ins.keys)
        self.emit([y], y, f" = self.{ins.name}(", *args, ", grids=", *grids, ")")
        if ins.regrid:
            g = self.new("grid")
            self.emit([g], g, f" = self.{ins.name}.out_grid(", *grids, ")", pure=True)
            env[GRID] = g
        return y

    def grids_tuple(self, env, keys):
        out = ["(", self.get(env, GRID)]
        for k in keys:
            out += [", ", self.get(env, GRID + k)]
        return out + ([")"] if keys else [",)"])

    def on_Attend(self, ins, x, env):
        k, v = self.get(env, ins.k), self.get(env, ins.v)
        scores = self.module(ins.scores)
        args = [x, ", ", k, ", ", v]
        if ins.biases:
            terms = []
            for name, takes, keys in ins.biases:
                grid = [f"self.{ins.scores}.out_grid(", *self.grids_tuple(env, (ins.k,)), ")"] if takes else ["None"]
                terms += [", ", f"self.{name}.score_bias(", *grid, *[p for t in keys for p in (", ", self.get(env, t))],
                          ")"]
            args += [", attn_mask=attention_mask(", x, *terms, ")"]
        if ins.dropout is not None:
            args.append(f", dropout_p=self.{ins.dropout}.p if self.training else 0.0")
        args.append(f", scale=self.{ins.scores}.scale")
        if scores.group > 1:
            args.append(", enable_gqa=True")
        y = self.new()
        self.emit([y], y, " = F.scaled_dot_product_attention(", *args, ")")
        return y

    def on_Save(self, ins, x, env):
        env[ins.name] = x
        env[GRID + ins.name] = env.get(GRID, Need(GRID))
        if not ins.name.startswith("~") and not x.bound and x in (s for st in self.stmts for s in st.defs):
            x.pref, x.bound = short_name(ins.name), True
        return x

    def on_Load(self, ins, x, env):
        y = self.get(env, ins.name)
        env[GRID] = env.get(GRID + ins.name, Need(GRID + ins.name))
        return y

    def on_Forget(self, ins, x, env):
        for k in ins.keys:
            env.pop(k, None)
            env.pop(GRID + k, None)
        return x

    def on_Shared(self, ins, x, env):
        target = shared_module(self.seq, ins.name)
        ref = f"self.shared[{ins.name!r}]"
        if hasattr(target, "forward") and (isinstance(target, Sequence) or hasattr(target, "blocks")):
            return self.call_child(ref, target, x, env)
        y = self.new()
        if getattr(target, "takes_grid", False):
            self.emit([y], y, f" = {ref}(", x, ", ", self.get(env, GRID), ")")
        else:
            self.emit([y], y, f" = {ref}(", x, ")")
        return y

    def on_ToTokens(self, ins, x, env):
        g, y = self.new("grid"), self.new()
        self.emit([g], g, " = ", x, ".shape[2:]", pure=True)
        self.emit([y], y, " = ", x, ".flatten(2).transpose(1, 2)  # (B, C, *grid) -> (B, N, C)", pure=True)
        env[GRID] = g
        return y

    def on_ToMap(self, ins, x, env):
        y = self.new()
        self.emit([y], y, " = ", x, ".transpose(1, 2).reshape(", x, ".shape[0], ", x, ".shape[2], *",
                  self.get(env, GRID), ")  # (B, N, C) -> (B, C, *grid)", pure=True)
        return y

    def on_MapGrid(self, ins, x, env):
        g = self.new("grid")
        self.emit([g], g, " = ", x, ".shape[2:]", pure=True)
        env[GRID] = g
        return x

    def on_StaticGrid(self, ins, x, env):
        g = self.new("grid")
        self.emit([g], g, " = ", Slot(tuple(ins.grid), "grid", "forward"), pure=True)
        env[GRID] = g
        return x

    def on_Residual(self, ins, x, env):
        grid = env.get(GRID, Need(GRID))
        outer, self.pref = self.pref, "shortcut"
        short = self.new()
        if ins.shortcut:
            short = self.run(ins.shortcut, x, env)
            env[GRID] = grid
        else:
            self.emit([short], short, " = ", x, pure=True)
        self.pref = outer
        body = self.run(ins.body, x, env)
        y = self.new()
        self.emit([y], y, " = ", short, " + ", DropPath(body, Slot(ins.drop_path, "drop_path", "forward")), pure=True)
        return y

    def on_Parallel(self, ins, x, env):
        merge, branches, split, (split_dim, cat_dim) = ins
        grid = env.get(GRID, Need(GRID))
        outer = self.pref
        base = "x" if outer == "x" else outer + "_"
        if split:
            parts = [self.new(f"{base}{i + 1}") for i in range(len(branches))]
            sizes = Slot(tuple(int(n) for n in split), "split", "forward")
            self.emit(parts, *_commas(parts), " = ", x, ".split_with_sizes(", sizes, f", dim={split_dim})", pure=True)
        else:
            parts = [x] * len(branches)
        outs = []
        for i, (branch, xi) in enumerate(zip(branches, parts)):
            env[GRID] = grid
            self.pref = f"{base}{i + 1}" if len(branches) > 1 else outer
            outs.append(self.run(branch, xi, env))
        self.pref = outer
        y = self.new()
        if merge in ("tokens", "concat"):
            dim = 1 if merge == "tokens" else cat_dim
            self.emit([y], y, " = torch.cat([", *_commas(outs), f"], dim={dim})", pure=True)
        elif len(outs) == 1:
            return outs[0]
        else:
            op = {"add": " + ", "mean": " + ", "mul": " * ", "sub": " - "}[merge]
            pieces = [p for i, o in enumerate(outs) for p in ((op,) if i else ()) + (o,)]
            if merge == "mean":
                pieces = ["("] + pieces + [f") / {len(outs)}"]
            self.emit([y], y, " = ", *pieces, pure=True)
        return y

    # ------------------------------------------------------------------ calls of other functions
    def call_child(self, ref, child, x, env, loop=None):
        """`x, *gives = ref(x, *needs)` for a Sequence or stage whose signature is known."""
        needs, gives, _ = self.signature(child)
        args = [p for k in needs for p in (", ", self.get(env, k))]
        outs = [self.new()] + [self.new(short_name(k)) for k in gives]
        if loop:  # `for block in self.blocks:` with the same variables in and out
            ties = [(outs[0], x)] + [(outs[1 + gives.index(k)], self.get(env, k)) for k in needs if k in gives]
            self.emit(outs, f"for block in {loop}:\n            ", *_commas(outs), " = block(", x, *args, ")",
                      ties=ties)
        else:
            self.emit(outs, *_commas(outs), f" = {ref}(", x, *args, ")")
        for k, t in zip(gives, outs[1:]):
            env[k] = t
            self.from_child[id(t)] = k
        return outs[0]

    def finish(self, x, env, top=False):
        """The function's needs and gives (state keys, in a fixed order), dead values dropped."""
        # a key this function set: to a value of its own, or to one it was given under another key
        # (a `save` keeps the grid it got: ` grid` -> ` gridNAME`)
        gives = [] if top else [k for k in sorted(env, key=_order)
                                if k in self.live and env[k] is not self.params.get(k)
                                and not (env[k].__class__ is Need and env[k].var == k)]
        for k in gives:
            self.get(env, k)
        results = [x] + [env[k] for k in gives]
        self.returns = results
        _drop_dead(self.stmts, results)
        used = {id(t) for s in self.stmts for t in s.uses()} | {id(t) for t in results}
        self.params = {k: t for k, t in self.params.items() if id(t) in used}
        if top:  # nothing calls the model: a state key read before it is set is None, as in the interpreter
            self.stmts[:0] = [Stmt([t], [t, " = None"]) for t in self.params.values()]
            self.params = {}
        return sorted(self.params, key=_order), gives


def _order(key):
    return (key != GRID, key.startswith(GRID), key)


def _commas(items):
    out = []
    for i, it in enumerate(items):
        if i:
            out.append(", ")
        out.append(it)
    return out


def _drop_dead(stmts, results):
    """Remove pure statements whose values nothing reads (backwards, so chains go too)."""
    live = {id(t) for t in results}
    kept = []
    for s in reversed(stmts):
        if s.pure and not any(id(d) in live for d in s.defs):
            continue
        kept.append(s)
        live |= {id(t) for t in s.uses()}
    stmts[:] = reversed(kept)


def name_temps(params: list, stmts: list, results: list) -> None:
    """Give every value a name: its preferred one unless a value still alive holds it (then with a
    number), reusing a name whose value is dead; a loop's variables keep their names."""
    last = {}
    for i, s in enumerate(stmts):
        for t in s.uses():
            last[id(t)] = i
    for t in results:
        last[id(t)] = len(stmts)
    holders: dict = {}  # name -> the Temp holding it

    def alive(t, i):
        return last.get(id(t), -1) > i

    def give(t, i):
        if t.name is not None:
            return
        name, n = t.pref, 1
        while name in holders and holders[name] is not t and alive(holders[name], i):
            n += 1
            name = f"{t.pref}{n}"
        t.name = name
        holders[name] = t

    for t in params:  # distinct, whether or not they are read
        name, n = t.pref, 1
        while name in holders:
            n += 1
            name = f"{t.pref}{n}"
        t.name = name
        holders[name] = t
    for i, s in enumerate(stmts):
        for new, old in s.ties:
            new.name = old.name
            holders[old.name] = new
        for t in s.defs:
            give(t, i)
