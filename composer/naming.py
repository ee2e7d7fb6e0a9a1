"""Module names inside one scope of a resolved blueprint (a block, a section, a composite body):
aliases as written, else the op's name, numbered from 1 where it occurs more than once. These
names are the state_dict keys, so the rules here are part of the file format."""

from __future__ import annotations

from .diagnostics import error
from .source import Span


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
