"""A built model as one standalone PyTorch file: `composer export NAME --to python`.

The file holds composer's own layer classes the model uses (their source, composer/codegen_sources.py),
one class per distinct block structure with a flat forward (composer/codegen_body.py writes it from
the Sequence's program), a class per distinct stage, and the model class. It imports torch and the
standard library only, its state_dict keys are the built model's, and it computes the same function
at every input size the built model admits (grids are re-derived at run time, as the builder's
interpreter does).

Instances of one structure share a class: their literals (channel counts, drop-path rates, grids)
that differ become constructor parameters, named after the arguments they feed; the others stay
literals in the class."""

from __future__ import annotations

import functools
import inspect
import math
import re

from torch import nn

from .builder import Sequence, StageModule, build_module
from .codegen_body import Body, DropPath, Slot, Temp, name_temps, short_name
from .codegen_sources import Sources, Unsupported, recording
from .diagnostics import error


_PAIRS = ("kernel_size", "stride", "padding", "dilation", "output_padding")


class _All:
    def __contains__(self, key):
        return True


class Instance:
    """One Sequence (or stage, or the model) as code: its class key, its template pieces (str,
    Slot, DropPath, ChildCall), its signature (needs, gives) and the class it gets."""

    def __init__(self, module, kind, base, key, pieces, needs, gives):
        self.module, self.kind, self.base, self.key, self.pieces = module, kind, base, key, pieces
        self.needs, self.gives = needs, gives
        self.cls = None


class ChildCall:
    """The constructor call of a child Sequence: its class with its parameter values."""

    def __init__(self, inst):
        self.inst = inst


class Writer:
    def __init__(self, model, records):
        self.model, self.records = model, records
        self.sources = Sources()
        self.helpers = set()

    # ------------------------------------------------------------------ analysis
    def analyse(self):
        m = self.model
        self.roles = {id(m.stem): "Stem", id(getattr(m, "head", None)): "Head"}
        for st in m.stages:
            self.roles[id(st.downsample)] = "Downsample"
            self.roles[id(st.norm)] = "StageNorm"
        # first with every state a function sets returned; then only what some function reads from
        # its caller, or reads after a call that set it (the same program: only unread returns go)
        self.live, self.child_reads = _All(), set()
        self.infos, self.instances = {}, []
        self.info(self.model)
        self.live = {k for inst in self.instances for k in inst.needs} | self.child_reads
        self.infos, self.instances = {}, []
        return self.info(self.model)

    def signature(self, module):
        inst = self.info(module)
        return inst.needs, inst.gives, inst

    def info(self, module) -> Instance:
        if id(module) in self.infos:
            return self.infos[id(module)]
        live = self.live
        if isinstance(module, Sequence):
            inst = self.sequence(module, live)
        elif isinstance(module, StageModule):
            inst = self.stage(module, live)
        else:
            inst = self.top(module, live)
        self.infos[id(module)] = inst
        self.instances.append(inst)
        return inst

    def function(self, body, x, out, env, header, top=False):
        needs, gives = body.finish(out, env, top)
        params = [x] + [body.params[k] for k in needs]
        name_temps(params, body.stmts, body.returns)
        pieces = [f"    def {header}(self, " + ", ".join(t.name for t in params) + "):\n"]
        for s in body.stmts:
            pieces.append("        ")
            for p in s.pieces:
                if p.__class__ is Temp:
                    pieces.append(p.name)
                elif p.__class__ is DropPath:
                    pieces.append(DropPath(p.temp.name, p.slot))
                else:
                    pieces.append(p)
            pieces.append("\n")
        pieces.append("        return " + ", ".join(t.name for t in body.returns) + "\n")
        return pieces, needs, gives

    def sequence(self, seq, live) -> Instance:
        body = Body(seq, self.signature, live, self.child_reads)
        x = Temp("x")
        env: dict = {}
        out = body.run(seq.program, x, env)
        forward, needs, gives = self.function(body, x, out, env, "forward")
        init = []
        for name, mod in seq._modules.items():
            init += [f"        self.{name} = "] + self.construct(mod) + ["\n"]
        if "_shared" in seq.__dict__:
            init.append("        self.shared = {}  # modules defined elsewhere in the model (`reuse`), linked by it\n")
        pieces = init + ["\n"] + forward
        base = _camel(seq.call.split("(")[0]) if seq.call else self.roles.get(id(seq), "Block")
        return Instance(seq, "seq", base, _key(pieces), pieces, needs, gives)

    def stage(self, stage, live) -> Instance:
        body = Body(stage, self.signature, live, self.child_reads)
        x = Temp("x")
        env: dict = {}
        y = x
        if stage.downsample is not None and not stage.downsample_last:
            y = body.call_child("self.downsample", stage.downsample, y, env)
        sigs = {(tuple(self.info(b).needs), tuple(self.info(b).gives)) for b in stage.blocks}
        if len(sigs) == 1 and len(stage.blocks) > 1:
            y = body.call_child("", stage.blocks[0], y, env, loop="self.blocks")
        else:
            for i, b in enumerate(stage.blocks):
                y = body.call_child(f"self.blocks[{i}]", b, y, env)
        if stage.downsample is not None and stage.downsample_last:
            y = body.call_child("self.downsample", stage.downsample, y, env)
        if stage.norm is not None:
            y = body.call_child("self.norm", stage.norm, y, env)
        forward, needs, gives = self.function(body, x, y, env, "forward")
        pieces = ["        self.downsample = downsample\n        self.blocks = nn.ModuleList(blocks)\n"
                  "        self.norm = norm\n\n"] + forward
        return Instance(stage, "stage", "Stage", _key(pieces), pieces, needs, gives)

    def top(self, model, live) -> Instance:
        body = Body(model, self.signature, live, self.child_reads)
        x = Temp("x")
        env = {"input": x}
        plan = model.plan
        size = "x".join(map(str, plan.input.spatial))
        body.emit([], "self.check_input(", x, ")")  # the file's own size check (codegen_file.size_check)
        y = body.call_child("self.stem", model.stem, x, env)
        body.stmts[-1].pieces.append(f"  # {torch_shape(plan.stem.y)} at {size}")
        for i, st in enumerate(model.stages):
            y = body.call_child(f"self.stages[{i}]", st, y, env)
            body.stmts[-1].pieces.append(f"  # {torch_shape(plan.stages[i].y)}")
        y = body.call_child("self.head", model.head, y, env)
        body.stmts[-1].pieces.append(f"  # {torch_shape(plan.head.y)}")
        forward, needs, gives = self.function(body, x, y, env, "forward", top=True)
        return Instance(model, "model", "Model", None, forward, [], [])

    # ------------------------------------------------------------------ constructor calls
    def construct(self, mod) -> list:
        if isinstance(mod, Sequence):
            return [ChildCall(self.info(mod))]
        if mod is None:
            return ["None"]
        return self.value(mod, "module")

    def value(self, v, hint) -> list:
        rec = self.records.get(id(v))
        if rec is not None and rec[0] is v:
            return self.call(*rec)
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return [repr(v)]
        if isinstance(v, (int, float)):
            return [Slot(v, hint, "init")]
        if isinstance(v, (tuple, list)) and type(v) in (tuple, list):
            if v and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
                return [Slot(v, hint, "init")]
            items = [p for i, e in enumerate(v) for p in ([", "] if i else []) + self.value(e, hint)]
            if type(v) is tuple:
                return ["("] + items + ([",)"] if len(v) == 1 else [")"])
            return ["["] + items + ["]"]
        if isinstance(v, nn.Module):
            raise Unsupported(f"a {type(v).__name__} module that was not made by a constructor call")
        return [self.sources.literal(v)]

    def call(self, obj, cls, args, kwargs) -> list:
        kwargs = dict(kwargs)
        names = _arg_names(cls, args, kwargs)
        defaults = _defaults(cls)
        args = list(args)
        # the builder decides in-place activations after construction (builder.Sequence._mark)
        if isinstance(getattr(obj, "inplace", None), bool) and "inplace" in names.values():
            args[list(names.values()).index("inplace")] = obj.inplace
        elif isinstance(getattr(obj, "inplace", None), bool) and (obj.inplace or "inplace" in kwargs) \
                and "inplace" in _params(cls):
            kwargs["inplace"] = obj.inplace
        cut = len(args)
        while cut > 1 and names.get(cut - 1) in defaults and _same(defaults[names[cut - 1]], args[cut - 1]):
            cut -= 1
        out = [self.sources.ref(cls), "("]
        items = []
        for i, a in enumerate(args):
            name = names.get(i)
            if i >= cut:
                continue  # trailing arguments at their defaults (`nn.BatchNorm2d(64, 1e-05, 0.1)`)
            if i < 2 or name is None:
                items.append((None, a, name or f"arg{i}"))
            else:
                items.append((name, a, name))
        items += [(k, a, k) for k, a in kwargs.items()]
        first = True
        if cls.__module__.startswith("torch.nn"):  # `kernel_size=(3, 3)` as `kernel_size=3`
            items = [(k, a[0] if k in _PAIRS and isinstance(a, tuple) and a and len(set(a)) == 1 else a, h)
                     for k, a, h in items]
        for key, a, hint in items:
            if key is not None and key in defaults and _same(defaults[key], a):
                continue
            out += ([] if first else [", "]) + ([f"{key}="] if key else []) + self.value(a, hint)
            first = False
        return out + [")"]

    # ------------------------------------------------------------------ classes
    def classes(self) -> list:
        """Group the instances by key, children first; name each class and its parameters."""
        groups: dict = {}
        for inst in self.instances:
            if inst.kind != "model":
                groups.setdefault(inst.key, []).append(inst)
        taken = set(self.sources.names) | {"Model"}
        out = []
        for members in groups.values():
            name, n = members[0].base, 1
            while name in taken:
                n += 1
                name = f"{members[0].base}{n}"
            taken.add(name)
            cls = Class(name, members, self.sources)
            for m in members:
                m.cls = cls
            out.append(cls)
        return out


class Class:
    """A class of the file: its name, its parameters (slots that differ between its instances)
    and, per instance, the parameter values."""

    def __init__(self, name, members, sources):
        self.name, self.members, self.sources = name, members, sources
        vectors = [[] for _ in members]  # per member: its slot values in order
        for m, vec in zip(members, vectors):
            _slots(m.pieces, vec)
        self.params, self.slot_param, self.hints = [], [], []
        by_vector = {}
        for j, slot in enumerate(_slots(members[0].pieces, [])):
            column = tuple(_hashable(vec[j].value) for vec in vectors)
            if len(set(column)) == 1:
                self.slot_param.append(None)
                continue
            if column not in by_vector:
                by_vector[column] = len(self.params)
                self.params.append(_param_name(slot, [p[0] for p in self.params]))
                self.params[-1] = (self.params[-1], column)
            self.slot_param.append(by_vector[column])
        self.values = {id(m): {p: vectors[i][self._first(k)].value for k, (p, _) in enumerate(self.params)}
                       for i, m in enumerate(members)}

    def _first(self, k):
        return self.slot_param.index(k)

    def render(self, writer) -> str:
        m0 = self.members[0]
        counter = iter(range(10 ** 9))
        text = []
        slot_of = {}

        def lit(slot):
            j = next(counter)
            k = self.slot_param[j]
            if k is None:
                return self.sources.literal(slot.value)
            name = self.params[k][0]
            return name if slot.where == "init" else f"self.{name}"

        zero_drop = {}
        flat = _flatten(m0.pieces)
        for j, p in enumerate(flat):
            if p.__class__ is Slot:
                text.append(lit(p))
            elif p.__class__ is DropPath:
                j_slot = next(counter)
                k = self.slot_param[j_slot]
                if k is None and not p.slot.value:
                    text.append(p.temp)
                else:
                    rate = self.sources.literal(p.slot.value) if k is None else f"self.{self.params[k][0]}"
                    writer.helpers.add("drop_path")
                    text.append(f"drop_path({p.temp}, {rate}, self.training)")
            else:
                text.append(p)
        body = "".join(text)
        if "attention_mask(" in body:
            writer.helpers.add("attention_mask")
        if m0.kind == "stage":
            sig = "downsample, blocks, norm"
        else:
            sig = ", ".join(p for p, _ in self.params)
        init_body, _, forward = body.partition("\n\n")
        keep = [f"        self.{p} = {p}\n" for k, (p, _) in enumerate(self.params)
                if any(self.slot_param[j] == k and s.where == "forward" for j, s in enumerate(_slots(m0.pieces, [])))]
        doc = _doc(m0)
        head = f"class {self.name}(nn.Module):\n{doc}    def __init__(self{', ' if sig else ''}{sig}):\n" \
               "        super().__init__()\n"
        return head + init_body + ("\n" if init_body and not init_body.endswith("\n") else "") + "".join(keep) + \
            "\n" + forward

    def call(self, inst) -> str:
        vals = self.values[id(inst)]
        return f"{self.name}(" + ", ".join(f"{p}={self.sources.literal(v)}" for p, v in vals.items()) + ")"


def _doc(inst) -> str:
    seq = inst.module
    if inst.kind == "seq" and getattr(seq, "call", ""):
        return f'    """`{seq.call}` in the blueprint."""\n\n'
    if inst.kind == "stage":
        return '    """A stage: its downsampling, its blocks, its norm."""\n\n'
    return ""


def _slots(pieces, acc):
    for p in _flatten(pieces):
        if p.__class__ is Slot:
            acc.append(p)
        elif p.__class__ is DropPath:
            acc.append(p.slot)
    return acc


def _flatten(pieces):
    """ChildCall pieces expanded into the child's constructor call, its values as slots."""
    out = []
    for p in pieces:
        if p.__class__ is ChildCall:
            cls = p.inst.cls
            vals = cls.values[id(p.inst)]
            out.append(f"{cls.name}(")
            for i, (name, v) in enumerate(vals.items()):
                out += ([", "] if i else []) + [f"{name}=", Slot(v, name, "init")]
            out.append(")")
        else:
            out.append(p)
    return out


def _key(pieces) -> tuple:
    out = []
    for p in pieces:
        cls = p.__class__
        if cls is Slot:
            out.append(("S", p.where, type(p.value).__name__))
        elif cls is DropPath:
            out.append(("D", p.temp))
        elif cls is ChildCall:
            out.append(("C", p.inst.key))
        else:
            out.append(p)
    return tuple(out)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


CHANNELS = {"in_channels", "out_channels", "num_features", "normalized_shape", "in_features", "out_features",
            "channels", "num_channels", "dim", "cin", "cout"}


def _param_name(slot, taken) -> str:
    hint = slot.hint if slot.hint.isidentifier() else "value"
    if hint in CHANNELS and "dim" not in taken:
        hint = "dim"
    elif hint == "drop_path":
        hint = "drop_path_rate"
    name, n = hint, 1
    while name in taken or name in ("self", "nn", "torch", "F"):
        n += 1
        name = f"{hint}{n}"
    return name


def _params(cls) -> list:
    return list(_signature(cls))


@functools.lru_cache(maxsize=None)
def _signature(cls):
    try:
        return inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}


def _defaults(cls) -> dict:
    params = _signature(cls)
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _same(default, value) -> bool:
    if isinstance(default, int) and isinstance(value, tuple) and value and all(v == default for v in value):
        return True  # torch's conv and pooling modules: `stride=(1, 1)` is `stride=1`
    if type(default) is not type(value) and not (isinstance(default, (int, float)) and isinstance(value, (int, float))
                                                 and not isinstance(value, bool) and not isinstance(default, bool)):
        return False
    try:
        return bool(default == value)
    except Exception:  # noqa: BLE001 - a value without a plain equality is written out
        return False


def _arg_names(cls, args, kwargs) -> dict:
    """Positional index -> parameter name of `cls`'s constructor."""
    params = _signature(cls)
    names = []
    for p in params.values():
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            names.append(p.name)
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY:
            names.append(None)
        else:
            break
    return {i: n for i, n in enumerate(names[:len(args)]) if n is not None}


def torch_shape(shape) -> str:
    """A plan shape as the tensor's: (B, C, H, W) for a map, (B, N, C) for tokens, (B, C) a vector."""
    if shape.layout == "vector":
        return f"(B, {shape.channels})"
    if shape.layout == "map":
        return "(B, " + ", ".join(map(str, (shape.channels, *shape.spatial))) + ")"
    n = shape.extra + math.prod(shape.spatial)
    if shape.layout == "heads":
        return f"(B, {shape.heads}, {n}, {shape.channels})"
    return f"(B, {n}, {shape.channels})"


def _camel(name: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in re.split(r"[^0-9A-Za-z]+", name) if w) or "Block"


def generate(plan, *, dynamic_img_size: bool = False) -> str:
    """The standalone Python source of the model `plan` describes."""
    from .codegen_file import assemble

    for _ in range(2):  # again when the build imported a layer class after recording began
        with recording() as records:
            model = build_module(plan, device="meta", seed=None, dynamic_img_size=dynamic_img_size)
        if all(id(m) in records for m in model.modules() if not isinstance(m, (Sequence, StageModule))
               and m is not model):
            break
    try:
        writer = Writer(model, records)
        writer.analyse()
        classes = writer.classes()
        return assemble(writer, classes, plan)
    except Unsupported as exc:
        raise error("export-unsupported", f"cannot write {plan.name} as Python: {exc}", plan.span) from None
