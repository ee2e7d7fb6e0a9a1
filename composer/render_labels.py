"""Labels for composer graph: shapes (`96x56x56`, `197x192 tokens`), ops (`dwconv 7x7`), composite
summaries (`metaformer(attention(3 heads, window 7), mlp)`) and runs of repeated blocks with the
values that vary between them (`shift 0/3`). Pure Python."""

from __future__ import annotations

from .shapes import Shape

# ---- labels ----------------------------------------------------------------------------------


def fmt_shape(s: Shape) -> str:
    """`96x56x56` for a map, `197x192 tokens` for tokens (all tokens x channels), `1000` for a vector."""
    if s.layout == "vector":
        return str(s.channels)
    if s.layout == "map":
        return "x".join(str(v) for v in (s.channels, *s.spatial))
    return f"{s.tokens}x{s.channels} tokens"


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _pair(v) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(str(k) for k in v)
    return f"{v}x{v}"


def _big(v) -> bool:
    return any(k > 1 for k in v) if isinstance(v, (list, tuple)) else v > 1


def op_label(op, x: Shape | None = None) -> str:
    """A short human form of an op: `dwconv 7x7`, `conv 3x3 s2, 64`, `attention(3 heads, window 7)`."""
    n = op.name
    if n in ("conv", "rep_conv", "rep_dwconv"):
        out = getattr(op, "out", None)
        groups = getattr(op, "groups", 1) or 1
        dw = n == "rep_dwconv" or (x is not None and groups == x.channels and groups > 1 and out in (None, groups))
        text = ("dw" if dw else "") + ("rep" if n != "conv" else "") + f"conv {_pair(op.kernel)}"
        stride = getattr(op, "stride", 1)
        if _big(stride):
            text += f" s{stride if not isinstance(stride, (list, tuple)) else _pair(stride)}"
        if groups > 1 and not dw:
            text += f" g{groups}"
        return text if dw or out is None else f"{text}, {out}"
    if n in ("attention", "cascaded_attention"):
        parts = []
        if getattr(op, "heads", None):
            parts.append(f"{op.heads} heads")
        elif getattr(op, "head_dim", None):
            parts.append(f"head dim {op.head_dim}")
        part = getattr(op, "partition", None)
        if part is not None:
            size = getattr(part, "size", None)
            parts.append(f"{part.name} {size}" if size is not None else part.name)
            if getattr(part, "shift", 0):
                parts.append(f"shift {part.shift}")
        kv = getattr(op, "kv", None)
        if kv is not None:
            ratio = getattr(kv, "ratio", None) or getattr(kv, "size", None)
            parts.append(f"kv {kv.name}" + (f" {ratio}" if ratio else ""))
        return f"{n}({', '.join(parts)})" if parts else n
    if n == "linear":
        return f"linear, {op.out}"
    if n == "classifier":
        return f"classifier, {op.num_classes}"
    if n == "patch_embed":
        return f"patch embed {_pair(op.patch)}, {op.out}"
    if n == "patch_merging":
        return f"patch merging, {op.out}"
    if n == "pool":
        text = f"{op.mode} pool {_pair(op.kernel)}"
        return text + (f" s{op.stride}" if op.stride is not None and _big(op.stride) else "")
    if n == "global_pool":
        return f"global {op.mode} pool"
    if n == "squeeze_excite":
        return "squeeze-excite"
    if n == "class_token":
        return "class token" if op.count == 1 else f"{op.count} class tokens"
    if n in ("pos_embed", "conv_pos", "sinusoidal_pos"):
        return n.replace("_", " ")
    if n == "resize":
        return f"resize {_pair(op.size)}"
    if op.category in ("norm", "activation"):
        return n
    return op.describe().removesuffix("()")  # whole: a long label is wrapped over lines, never cut


TRIVIAL = {"norm", "activation", "linear", "layout", "misc"}
PRIORITY = ("attention", "conv", "pool", "gating", "embed", "resample", "head", "linear", "norm", "activation")


def _key(step) -> bool:
    """Ops worth naming in a composite's summary (not norms, activations, pointwise layers)."""
    op = step.op
    if op.category == "conv":
        stride = getattr(op, "stride", 1)
        kernel = getattr(op, "kernel", None)  # conv_transpose's kernel defaults to its stride
        return _big(stride if kernel is None else kernel) or _big(stride)
    return op.category not in TRIVIAL


def _dedupe(parts: list[str]) -> list[str]:
    out: list[list] = []
    for p in parts:
        if out and out[-1][0] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return [p if k == 1 else f"{k} x {p}" for p, k in out]


def summary_parts(steps, depth: int = 0) -> list[str]:
    out = []
    for s in steps:
        if s.kind == "op" and _key(s):
            out.append(op_label(s.op, s.x))
        elif s.kind == "seq":
            inner = summary_parts(s.body, depth + 1) if depth < 1 else []
            name = s.call or s.name
            out.append(f"{name}({', '.join(inner)})" if inner else name)
        elif s.kind == "reuse":
            out.append(f"reuse {s.target}")
        elif s.kind == "residual":
            out += summary_parts(s.body, depth)
        elif s.kind == "parallel":
            if depth == 0:
                lanes = [" > ".join(summary_parts(b, depth + 1)) or _plain(b) for b in s.branches]
                out.append(f"parallel {s.merge}({' | '.join(lanes)})")
            else:
                for b in s.branches:
                    out += summary_parts(b, depth)
    return _dedupe(out)


def _plain(steps) -> str:
    """A branch without key ops: its first op (or identity)."""
    ops = [s for st in steps for s in st.walk() if s.kind == "op"]
    return op_label(ops[0].op, ops[0].x) if ops else "identity"


def summary(call: str, steps) -> str:
    parts = summary_parts(steps)
    return f"{call}({', '.join(parts)})" if parts else call


def category(steps) -> str:
    found = {s.op.category for st in steps for s in st.walk() if s.kind == "op"}
    key = {s.op.category for st in steps for s in st.walk() if s.kind == "op" and _key(s)}
    for cat in PRIORITY:
        if cat in key:
            return cat
    for cat in PRIORITY:
        if cat in found:
            return cat
    return "misc"


# ---- collapsing repeated blocks ---------------------------------------------------------------


def _signature(steps) -> tuple:
    """The structure of a step list: kinds, names, op names and shapes, not the op values (layout
    conversions left out: the first block of a stage may convert what the others receive ready)."""
    return tuple((s.kind, _own(s), s.x, s.y, tuple(_signature(sub) for sub in s.children()))
                 for s in steps if s.kind != "convert")


def _own(s) -> tuple:
    """A step's own structural fields: what it names, its op's name, a parallel's merge and split."""
    if s.kind == "op":
        return s.name, s.op.name
    if s.kind == "seq":
        return (s.name,)
    if s.kind in ("save", "load"):
        return (s.tensor,)
    if s.kind == "reuse":
        return (s.target,)
    return (s.merge, tuple(s.split or ())) if s.kind == "parallel" else ()


def _flat(value, prefix: str, out: dict) -> None:
    from .ops import Op

    if isinstance(value, Op):
        for key in type(value).model_fields:
            _flat(getattr(value, key), f"{prefix}.{key}" if prefix else key, out)
    else:
        out[prefix] = value


def _values(section) -> dict:
    """path.field -> value of every op parameter in a block (nested parts flattened)."""
    out: dict = {}
    for st in section.steps:
        for s in st.walk():
            if s.kind == "op":
                _flat(s.op, s.path, out)
    return out


def runs(blocks) -> list[tuple[list, str]]:
    """Consecutive blocks of one structure -> [(blocks, note)], the note naming every value that
    varies (all of them: a long note is wrapped over lines, never cut)."""
    groups: list[list] = []
    for b in blocks:
        if groups and _signature(groups[-1][0].steps) == _signature(b.steps) and groups[-1][0].call == b.call:
            groups[-1].append(b)
        else:
            groups.append([b])
    out = []
    for g in groups:
        notes = []
        if len(g) > 1:
            first = g[0].path + "."
            vals = [{k[len(first if i == 0 else b.path + "."):]: v for k, v in _values(b).items()}
                    for i, b in enumerate(g)]
            for key in vals[0]:
                seen = []
                for v in vals:
                    if v.get(key) not in seen:
                        seen.append(v.get(key))
                if len(seen) > 1:
                    name = key.rsplit(".", 1)[-1]
                    text = f"{name} {'/'.join(str(s) for s in seen)}"
                    if text not in notes:
                        notes.append(text)
        out.append((g, ", ".join(notes)))
    return out
