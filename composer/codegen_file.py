"""The standalone Python file put together (composer/codegen.py makes its parts): a header naming
the blueprint and settings, the imports, composer's layer classes the model uses, the two helpers
the builder's interpreter applies (drop path, attention masks), the block and stage classes, and
the model class."""

from __future__ import annotations

import ast

from . import __version__ as VERSION
from .sizes import axis_rules, rule_text, runs

HELPERS = {
    "drop_path": '''
def drop_path(x, p: float, training: bool):
    """Stochastic depth: in training, zero each sample's branch with probability p (rescaled)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)
''',
    "attention_mask": '''
def attention_mask(q, *terms):
    """The additive score terms summed (None: a term that adds nothing here), in q's dtype; a term
    with one entry per window of an image is repeated over the images of the batch."""
    mask = None
    for term in terms:
        if term is not None:
            mask = term if mask is None else mask + term
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    if mask is not None and mask.ndim == 4 and mask.shape[0] not in (1, q.shape[0]):
        mask = mask.repeat(q.shape[0] // mask.shape[0], 1, 1, 1)
    return mask
''',
}


def assemble(writer, classes, plan) -> str:
    settings = ", ".join(f"{k}={_setting(v)}" for k, v in plan.arguments.items())
    settings = f", with {settings}" if settings else ""
    model_cls = _camel_model(plan.name, {c.name for c in classes} | set(writer.sources.names))
    model_text = _model(writer, plan, model_cls)
    class_text = "\n\n".join(c.render(writer) for c in classes)
    layers = writer.sources.render_definitions()
    imports = ["import torch", "import torch.nn.functional as F", "from torch import nn"]
    for line in writer.sources.imports:
        if line not in imports:
            imports.append(line)
    imports = sorted(set(imports), key=lambda s: (not s.startswith("import"), s))
    helpers = "".join(HELPERS[h] for h in sorted(writer.helpers))
    import textwrap

    shape = ", ".join(map(str, (plan.input.channels, *plan.input.spatial)))
    lines = [f"{plan.name}: a standalone PyTorch model, written by composer {VERSION} "
             f"(`composer export {plan.name} --to python`).", "",
             *textwrap.wrap(f"Blueprint: {_rel(plan.file)}, model `{plan.name}`{settings}.", 99),
             *textwrap.wrap(f"Input: (B, {shape}) as built; every other size the blueprint admits runs too "
                            "(grids follow the input, as in the built model).", 99),
             *textwrap.wrap(f"Parameters: {plan.params:,}. The state_dict keys are those of the model composer "
                            "builds, so its weights load with `model.load_state_dict(state_dict)`. It needs "
                            "torch only.", 99)]
    head = '"""' + "\n".join(lines) + '\n"""\n\nfrom __future__ import annotations\n\n'
    parts = [head + "\n".join(imports) + "\n"]
    if layers:
        parts.append("# " + "-" * 40 + " layers (composer's layer classes this model uses)\n\n" + layers)
    if helpers:
        parts.append("# " + "-" * 40 + " helpers\n" + helpers)
    parts.append("# " + "-" * 40 + " blocks\n\n" + class_text)
    parts.append(model_text)
    text = "\n\n".join(p.rstrip() + "\n" for p in parts)
    ast.parse(text)  # a syntax error here is composer's bug: fail before anything is written
    return text


def _model(writer, plan, name) -> str:
    model = writer.model
    info = writer.infos
    lines = [f"class {name}(nn.Module):",
             f'    """{plan.name} ({plan.doc.strip().splitlines()[0]})."""' if plan.doc.strip()
             else f'    """{plan.name}."""', "",
             "    def __init__(self):", "        super().__init__()"]
    ind = "        "
    tie = "tie_owner" in writer.sources.names
    if tie:
        from .layers.core import tie_scope

        writer.sources.need(tie_scope)
    if tie:
        lines.append(ind + "with tie_scope():  # attention tables declared as one are one parameter")
        ind += "    "
    lines.append(f"{ind}self.stem = {info[id(model.stem)].cls.call(info[id(model.stem)])}")
    lines.append(f"{ind}self.stages = nn.ModuleList([")
    for st in model.stages:
        s = info[id(st)]
        down = info[id(st.downsample)].cls.call(info[id(st.downsample)]) if st.downsample is not None else "None"
        norm = info[id(st.norm)].cls.call(info[id(st.norm)]) if st.norm is not None else "None"
        blocks = [info[id(b)].cls.call(info[id(b)]) for b in st.blocks]
        lines.append(f"{ind}    {s.cls.name}(")
        lines.append(f"{ind}        {down},")
        lines.append(f"{ind}        [")
        lines += [f"{ind}            {b}," for b in blocks]
        lines.append(f"{ind}        ],")
        lines.append(f"{ind}        {norm},")
        lines.append(f"{ind}    ),")
    lines.append(f"{ind}])")
    lines.append(f"{ind}self.head = {info[id(model.head)].cls.call(info[id(model.head)])}")
    paths = {id(m): p for p, m in model.named_modules()}
    for p, m in model.named_modules():
        for target in (m.__dict__.get("_shared") or {}):
            lines.append(f"{ind}self.get_submodule({p!r}).shared[{target!r}] = self.get_submodule({target!r})")
    del paths
    top = writer.infos[id(model)]
    forward = "".join(x if isinstance(x, str) else "" for x in top.pieces)
    return "\n".join(lines) + "\n\n" + size_check(plan, model.dynamic_img_size) + "\n" + forward


def size_check(plan, dynamic: bool) -> str:
    """The model's `check_input` method: the input sizes it admits, each axis by its rule
    (`composer.sizes.axis_rules`, probed as `composer info` states them), refused with the built
    model's words. Skipped under torch.export, whose dynamic dimensions are its own contract; under
    torch.compile its comparisons become the compiled graph's guards."""
    rules = axis_rules(plan, dynamic)
    text = rule_text(plan, dynamic, rules)
    built = "x".join(map(str, plan.input.spatial))
    tests = [f"len(size) == {len(rules)}"]  # then a line per axis
    tests += [_axis_test(rule, f"size[{a}]") for a, rule in enumerate(rules)]
    got = "'x'.join(map(str, size))"
    lines = ["    def check_input(self, x):",
             f'        """Refuse an input size the blueprint does not admit ({text})."""',
             "        if torch.compiler.is_exporting():",
             "            return",
             "        channels, *size = x.shape[1:]",
             f"        if channels != {plan.input.channels}:",
             f'            raise ValueError(f"{plan.name} takes {plan.input.channels} input channels, "',
             '                             f"got {channels}")',
             "        if not (" + "\n                and ".join(tests) + "):",
             f'            raise ValueError(f"{plan.name} (built for {built}) cannot run at {{{got}}}. "',
             f'                             "Admitted sizes: {text}")']
    return "\n".join(lines) + "\n"


def _axis_test(rule, n: str) -> str:
    """A Python condition on the size `n` that holds for the sizes `rule` admits; sizes without a
    pattern by their runs up to the probed limit, and every size beyond it."""
    if rule.fixed:
        return f"{n} == {rule.build}"
    if rule.irregular and rule.period:
        window = {s - rule.low for s in rule.irregular}  # the admitted offsets in each period
        return f"{n} >= {rule.low} and ({n} - {rule.low}) % {rule.period} in {window}"
    if rule.irregular:
        spans = ", ".join(f"({a}, {b})" for a, b in runs(rule.irregular))
        return f"({n} > {rule.limit} or any(a <= {n} <= b for a, b in ({spans},)))"
    step = f" and ({n} - {rule.low}) % {rule.step} == 0" if rule.step > 1 else ""
    if rule.high:
        return f"{rule.low} <= {n} <= {rule.high}{step}"
    return f"{n} >= {rule.low}{step}"


def _camel_model(name: str, taken: set) -> str:
    import re

    base = "".join(w[:1].upper() + w[1:] for w in re.split(r"[^0-9A-Za-z]+", name) if w) or "Model"
    if base[0].isdigit():
        base = "Model" + base
    out, n = base, 1
    while out in taken:
        n += 1
        out = f"{base}{n}"
    return out


def _rel(path) -> str:
    from pathlib import Path

    p = Path(str(path))
    try:
        from .locate import BLUEPRINTS_DIR

        return "blueprints/" + str(p.resolve().relative_to(Path(BLUEPRINTS_DIR).resolve()))
    except (ValueError, ImportError):
        return p.name


def _setting(value) -> str:
    """A model argument as the blueprint would write it: numbers, strings, lists; a composite or op
    by its name."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_setting(v) for v in value) + "]"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return str(getattr(value, "name", None) or type(value).__name__)


def load_source(text: str, name: str = "exported"):
    """The model class of a generated file, imported in a fresh module namespace (its last class)."""
    import types

    module = types.ModuleType(f"composer_export_{name}")
    exec(compile(text, f"<{name}.py>", "exec"), module.__dict__)  # noqa: S102 - the file composer just wrote
    last = [n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)][-1]
    return getattr(module, last)
