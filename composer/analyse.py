"""Per-stage summaries of a planned model: output shapes, parameters, MACs, drop-path rates."""

from __future__ import annotations

from dataclasses import dataclass

from .plan import Plan


@dataclass
class Row:
    name: str
    blocks: int
    output: str
    params: int
    macs: int
    drop_path: str


def fmt_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def rows(plan: Plan, counted: dict[str, int] | None = None) -> list[Row]:
    """One row per section (stem, each stage, head). `counted` (path prefix -> parameter count)
    replaces the rule-based counts with those of a built module."""

    def params(path: str, rule: int) -> int:
        return counted.get(path, rule) if counted is not None else rule

    out = [Row("stem", 0, str(plan.stem.y), params("stem", plan.stem.params), plan.stem.macs, "")]
    for st in plan.stages:
        secs = [s for s in (st.downsample, *st.blocks, st.norm) if s is not None]
        rates = [b.drop_path for b in st.blocks]
        dp = f"{min(rates):.3f} .. {max(rates):.3f}" if rates and max(rates) > 0 else ""
        rule = sum(s.params for s in secs)
        out.append(Row(f"stages.{st.index}", len(st.blocks), str(st.y), params(f"stages.{st.index}", rule),
                       sum(s.macs for s in secs), dp))
    out.append(Row("head", 0, str(plan.head.y), params("head", plan.head.params), plan.head.macs, ""))
    return out


def render(plan: Plan, counted: dict[str, int] | None = None, title: str = "") -> str:
    table = rows(plan, counted)
    lines = [title or f"{plan.name}  ({plan.file})"]
    if plan.reference:
        lines.append(f"reference: {plan.reference}")
    lines.append(f"input: {plan.input_kind} {plan.input}")
    lines.append("")
    header = f"{'section':<10} {'blocks':>6}  {'output':<22} {'params':>13} {'MACs':>9}  drop_path"
    lines += [header, "-" * len(header)]
    for r in table:
        blocks = str(r.blocks) if r.blocks else ""
        lines.append(f"{r.name:<10} {blocks:>6}  {r.output:<22} {r.params:>13,} {fmt_count(r.macs):>9}  {r.drop_path}")
    total = sum(r.params for r in table)
    macs = sum(r.macs for r in table)
    lines.append("-" * len(header))
    lines.append(f"{'total':<10} {'':>6}  {'':<22} {total:>13,} {fmt_count(macs):>9}")
    lines.append("")
    lines.append(f"parameters: {total:,}")
    lines.append(f"MACs: {macs:,} ({fmt_count(macs)}; FLOPs = 2 x MACs = {fmt_count(2 * macs)})")
    if any(plan.drop_path):
        lines.append("drop_path per block: " + " ".join(f"{r:.3f}" for r in plan.drop_path))
    return "\n".join(lines)


def counted_params(module) -> dict[str, int]:
    """Parameter counts of a built model per section (stem, stages.i, head)."""
    out: dict[str, int] = {}
    for name, p in module.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "stages" else parts[0]
        out[key] = out.get(key, 0) + p.numel()
    return out
