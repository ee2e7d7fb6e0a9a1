"""`composer graph`: draw a planned model as a block diagram (SVG, PDF, PNG, Graphviz DOT, Mermaid or HTML).

The plan is turned into a small diagram tree first (render_tree: nodes, columns, side-by-side lanes,
residuals, titled groups, plus the edges with the tensor shapes on them; labels in render_labels);
render_layout lays the tree out top to bottom or left to right, sizing every box from its whole
label; render_svg writes the SVG itself, so no system program is needed; render_picture draws that
SVG again with matplotlib for PDF and PNG (the optional extra `pictures`); render_text writes DOT,
Mermaid and the HTML page. Repeated blocks of a stage collapse into one box
(`6 x metaformer(attention(...), mlp)`); blocks that differ only in values (a window shift, a
drop-path rate) collapse too, with a note (`shift 0/3`). `--expand` draws every block with its
sub-layers, `--open NAME` one stage, block or composite. Named tensors (`save`/`from`) become edges
from where they were saved. Pure Python: no torch.
"""

from __future__ import annotations

from pathlib import Path

from .diagnostics import did_you_mean, error

FORMATS = (".svg", ".pdf", ".png", ".dot", ".mmd", ".html")


def output_format(output: str, given: str | None = None) -> str:
    """The format of the file `output` (".svg", ...): `given` (without the dot) or its suffix. A
    usage error when neither says it or they disagree, or when a PDF or PNG is asked for and
    matplotlib is missing (before any work)."""
    suffix = Path(output).suffix.lower()
    fmt = suffix
    if given:
        if suffix in FORMATS and suffix != "." + given:
            raise error("usage", f"'{output}' names a {suffix[1:]} file, not {given}", None,
                        f"name the output OUT.{given}, or leave --format out")
        fmt = "." + given
    if fmt not in FORMATS:
        raise error("usage", f"cannot tell the format of '{output}' from its suffix '{Path(output).suffix}'", None,
                    "name the output OUT.svg, OUT.pdf, OUT.png, OUT.dot (Graphviz), OUT.mmd (Mermaid) or OUT.html, "
                    "or give --format")
    if fmt in (".pdf", ".png"):
        from .render_picture import check_available

        check_available()
    return fmt


def check_open(plan, names) -> None:
    """A located error (the model's definition) for a name `--open` cannot open, with a hint listing
    the names it can open next to it."""
    from .render_tree import openable

    known = openable(plan)
    for name in names:
        if name in known:
            continue
        parent = max((k for k in known if name.startswith(k + ".")), key=len, default="")
        near = [k for k, p in known.items() if p == parent]
        hint = did_you_mean(name, known)
        listing = f"openable{' in ' + parent if parent else ''}: {', '.join(near)}" if near else \
            "this model has no stage, block or composite to open"
        raise error("graph", f"{plan.name} has no stage, block or composite '{name}' to open", plan.span,
                    f"{hint} {listing}" if hint else listing)


def render(plan, fmt: str, expand: bool = False, opened=(), direction: str = "TB"):
    """The diagram of `plan` in format `fmt` (.svg, .dot, .mmd or .html: text; .pdf or .png: a
    function writing the file at a path), `opened` naming stages, blocks and composites drawn with
    their inside, the flow top to bottom ("TB") or left to right ("LR")."""
    from .render_svg import to_svg
    from .render_text import to_dot, to_html, to_mermaid
    from .render_tree import diagram

    check_open(plan, opened)
    d = diagram(plan, expand, opened)
    if fmt == ".dot":
        return to_dot(d, direction)
    if fmt == ".mmd":
        return to_mermaid(d, direction)
    svg = to_svg(d, direction)
    if fmt in (".pdf", ".png"):
        from .render_picture import write_picture

        return lambda path: write_picture(svg, path, fmt)
    return to_html(d, plan, svg) if fmt == ".html" else svg
