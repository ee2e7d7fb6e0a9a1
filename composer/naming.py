"""Module names inside one scope of a resolved blueprint (a block, a section, a composite body):
aliases as written, else the op's name, numbered from 1 where it occurs more than once. These
names are the state_dict keys, so the rules here are part of the file format."""

from __future__ import annotations

from .diagnostics import error
from .source import Span


# Names a layer cannot take: the attributes of the torch module that holds it (an `nn.Module`, and
# the builder's Sequence: `call`, `program`), which `add_module` refuses. Kept here without torch,
# so `check` refuses them; tests/test_ranges.py checks the list against torch's own. Names starting
# with `_` (`_modules`, `_parameters`) are refused too: they are Python's and torch's private ones.
RESERVED = frozenset("""
    T_destination add_module apply bfloat16 buffers call call_super_init children compile cpu cuda
    double dump_patches eval extra_repr float forward get_buffer get_extra_state get_parameter
    get_submodule half ipu load_state_dict modules mtia named_buffers named_children named_modules
    named_parameters parameters program register_backward_hook register_buffer register_forward_hook
    register_forward_pre_hook register_full_backward_hook register_full_backward_pre_hook
    register_load_state_dict_post_hook register_load_state_dict_pre_hook register_module
    register_parameter register_state_dict_post_hook register_state_dict_pre_hook requires_grad_
    set_extra_state set_submodule share_memory state_dict to to_empty train training type xpu zero_grad
""".split())


def check_layer_name(name: str, explicit: bool, span: Span) -> None:
    """A located error when `name` would clash with an attribute of the module holding the layer."""
    if name in RESERVED or name.startswith("_"):
        what = "starts with '_'" if name.startswith("_") else \
            "names an attribute of the torch module that holds the layer"
        how = f"rename it: `as {name.lstrip('_') or 'layer'}_`" if explicit else \
            f"name the layer with `as NAME` (e.g. `as {name.lstrip('_') or 'layer'}_`)"
        raise error("name", f"the layer name '{name}' cannot be used: it {what}", span, how)


class Names:
    """Assigns module names in one scope: aliases as written, else the op's name, numbered from 1
    when it occurs more than once (`norm1`, `norm2`)."""

    def __init__(self):
        self.entries = []

    def add(self, node, base: str, explicit: bool, span: Span):
        self.entries.append((node, base, explicit, span))

    def finish(self):
        explicit = {}
        for node, base, is_explicit, span in self.entries:
            check_layer_name(base, is_explicit, span)
            if is_explicit:
                if base in explicit:
                    raise error("redefinition", f"the name '{base}' is used twice in this block", span)
                explicit[base] = node
        counts: dict[str, int] = {}
        for _, base, is_explicit, _ in self.entries:
            if not is_explicit:
                counts[base] = counts.get(base, 0) + 1
        seen: dict[str, int] = {}
        taken = set(explicit)
        for node, base, is_explicit, _ in self.entries:
            if is_explicit:
                node.name = base
                continue
            if counts[base] == 1 and base not in taken:
                node.name = base
            else:
                seen[base] = seen.get(base, 0) + 1
                while f"{base}{seen[base]}" in taken:
                    seen[base] += 1
                node.name = f"{base}{seen[base]}"
            taken.add(node.name)


class Numbered:
    """The names of a `parallel ... for` body: made once per value, so an explicit `as dilate` is
    numbered like a repeated name (`dilate1`, `dilate2`) in the enclosing scope."""

    def __init__(self, names):
        self.names = names

    def add(self, node, base: str, explicit: bool, span: Span):
        self.names.add(node, base, False, span)
