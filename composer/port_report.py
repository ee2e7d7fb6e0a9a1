"""The report of a weight port (composer/port.py): what was loaded, how, and what is unaccounted for."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PortReport:
    model: str
    source: str
    matched: list[tuple[str, str]] = field(default_factory=list)            # (ours, reference)
    reshaped: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)  # (ours, ref, from, to)
    split: list[tuple[str, str]] = field(default_factory=list)              # (ours, fused reference key)
    joined: list[tuple[str, list[str]]] = field(default_factory=list)       # (ours, the reference keys joined)
    adapted: list[tuple[str, str, str]] = field(default_factory=list)       # (ours, ref, how)
    skipped: list[tuple[str, str]] = field(default_factory=list)            # (key, why): left re-initialised
    ignored: list[str] = field(default_factory=list)                        # reference keys the mapping ignores
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)
    reordered: list[tuple[str, str, tuple, tuple, str]] = field(default_factory=list)  # refused: (ours, ref, ours
    # shape, ref shape, the rule to write): equal element counts, but a plain reshape would reorder them
    permuted: list[tuple[str, str, str, tuple, tuple]] = field(default_factory=list)  # (ours, ref, rule, from, to)
    max_difference: float | None = None  # the largest |ours - reference| of the outputs compared
    compared: str = ""  # what was compared (or why not)
    disagrees: bool = False  # the outputs compared differ beyond the tolerance
    missing: list[tuple[str, str]] = field(default_factory=list)            # (ours, the reference key looked for)
    unexpected: list[str] = field(default_factory=list)                     # reference keys nothing used

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.reordered or self.disagrees)

    @property
    def loaded(self) -> int:
        return (len(self.matched) + len(self.reshaped) + len(self.split) + len(self.adapted) + len(self.joined)
                + len(self.permuted))

    def render(self, limit: int = 20) -> str:
        lines = [f"port {self.source} -> {self.model}: {self.loaded} tensors loaded "
                 f"({len(self.matched)} matched, {len(self.reshaped)} reshaped, {len(self.split)} split, "
                 f"{len(self.adapted)} adapted" + (f", {len(self.joined)} joined" if self.joined else "")
                 + (f", {len(self.permuted)} reordered by a rule" if self.permuted else "")
                 + f"), {len(self.skipped)} skipped, {len(self.ignored)} ignored"]

        def section(title, items, fmt):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {fmt(i)}" for i in items[:limit])
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")

        section("joined", self.joined, lambda r: f"{r[0]} <- {' + '.join(r[1])}")
        section("reshaped", self.reshaped, lambda r: f"{r[0]} <- {r[1]}  {list(r[2])} -> {list(r[3])}")
        section("reordered by a rule", self.permuted, lambda r: f"{r[0]} <- {r[1]}  {r[2]}: {list(r[3])} -> {list(r[4])}")
        section("adapted", self.adapted, lambda r: f"{r[0]} <- {r[1]}  ({r[2]})")
        section("skipped", self.skipped, lambda r: f"{r[0]}  ({r[1]})")
        section("shape mismatch", self.mismatched, lambda r: f"{r[0]} {list(r[2])} <- {r[1]} {list(r[3])}")
        section("element order (a reshape would scramble them; write a rule)", self.reordered,
                lambda r: f"{r[0]} {list(r[2])} <- {r[1]} {list(r[3])}: {r[4]}")
        section("missing (ours without source)", self.missing, lambda r: f"{r[0]}  (looked for {r[1]})")
        section("unexpected (source unused)", self.unexpected, lambda r: r)
        if self.ok:
            lines.append("ok: every tensor is accounted for")
        elif self.disagrees and not (self.missing or self.unexpected or self.mismatched or self.reordered):
            lines.append("NOT OK: every tensor is accounted for, but the outputs differ from the reference's")
        else:
            lines.append("NOT OK: some tensors are unaccounted for")
        if self.compared:
            lines.append(self.compared)
        return "\n".join(lines)


