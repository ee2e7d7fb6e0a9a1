"""Write a laid-out diagram (composer.render_layout) as SVG, in pure Python.

Boxes are rounded rectangles with their whole label; a group is a rounded frame with a title.
Edges are drawn last, routed along the flow (straight when in line, else a smooth curve; a
residual's skip line beside its body; an edge going back around the side), in flow coordinates and
turned onto the page for a left-to-right drawing, with the tensor shape beside them on a white
backing. Every box names the plan steps it stands for (`data-steps`) and every edge its ends
(`data-src`, `data-dst`), so a drawing can be checked against its plan.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from .render_layout import GPAD, MARGIN, NCW, PADX, PADY, VGAP, LINE, NLINE, CW, Layout, head_height, title_width
from .render_tree import Column, Diagram, Group, Lanes, Node, Residual

FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"

# category -> (fill, stroke, text)
PALETTE = {
    "conv": ("#dbeafe", "#3b82f6", "#1e3a8a"),
    "attention": ("#ffedd5", "#ea580c", "#7c2d12"),
    "norm": ("#f3f4f6", "#9ca3af", "#374151"),
    "activation": ("#dcfce7", "#16a34a", "#14532d"),
    "linear": ("#ede9fe", "#7c3aed", "#4c1d95"),
    "pool": ("#ccfbf1", "#0d9488", "#134e4a"),
    "embed": ("#fef3c7", "#d97706", "#78350f"),
    "gating": ("#fce7f3", "#db2777", "#831843"),
    "head": ("#fee2e2", "#dc2626", "#7f1d1d"),
    "layout": ("#e0f2fe", "#0284c7", "#0c4a6e"),
    "resample": ("#e0f2fe", "#0284c7", "#0c4a6e"),
    "block": ("#e0e7ff", "#4f46e5", "#312e81"),
    "io": ("#1f2937", "#1f2937", "#ffffff"),
    "merge": ("#ffffff", "#374151", "#111827"),
    "misc": ("#f5f5f4", "#78716c", "#292524"),
}
GROUP_STYLE = {  # klass -> (fill, stroke, dash)
    "stage": ("#f8fafc", "#64748b", ""),
    "stem": ("#fffbeb", "#b45309", ""),
    "head": ("#fef2f2", "#b91c1c", ""),
    "block": ("#ffffff", "#6366f1", "5,3"),
    "mixer": ("#ffffff", "#a8a29e", "2,3"),
}


# ---- drawing -----------------------------------------------------------------------------------


def _attr(v) -> str:
    return escape(str(v), {'"': "&quot;"})


def _num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


class _Svg:
    def __init__(self, lay: Layout):
        self.lay = lay
        self.out: list[str] = []
        self.bg: list[str] = []  # group frames, drawn first
        self.labels: list[tuple] = []  # the shapes on the edges, drawn over everything

    def text(self, x, y, s, size=12, color="#111827", anchor="start", weight="normal", cls=""):
        c = f' class="{cls}"' if cls else ""
        self.out.append(f'<text x="{_num(x)}" y="{_num(y)}" font-size="{size}" fill="{color}" '
                        f'text-anchor="{anchor}" font-weight="{weight}"{c}>{escape(s)}</text>')

    def node(self, n: Node) -> None:
        fill, stroke, ink = PALETTE.get(n.cat, PALETTE["misc"])
        attrs = f' data-repeat="{n.repeat}"' if n.klass == "block" else ""
        attrs += f' data-steps="{_attr(n.steps)}"' if n.steps else ""
        self.out.append(f'<g class="{n.klass} cat-{n.cat}" id="{n.id}"{attrs}>')
        if n.tip:
            self.out.append(f"<title>{escape(n.tip)}</title>")
        cx, cy = n.x + n.w / 2, n.y + n.h / 2
        if n.klass == "merge":
            if len(n.label) <= 1:
                self.out.append(f'<circle cx="{_num(cx)}" cy="{_num(cy)}" r="{_num(n.w / 2)}" fill="{fill}" '
                                f'stroke="{stroke}" stroke-width="1.5"/>')
                self.text(cx, cy + 5.5, n.label, 16, ink, "middle", "bold")
            else:
                self.out.append(f'<rect x="{_num(n.x)}" y="{_num(n.y)}" width="{_num(n.w)}" height="{_num(n.h)}" '
                                f'rx="{_num(n.h / 2)}" fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>')
                self.text(cx, cy + 4, n.label, 12, ink, "middle", "bold")
        else:
            rx = n.h / 2 if n.klass == "io" else 6
            width = 2 if n.klass == "block" else 1.2
            self.out.append(f'<rect x="{_num(n.x)}" y="{_num(n.y)}" width="{_num(n.w)}" height="{_num(n.h)}" '
                            f'rx="{_num(min(rx, 14))}" fill="{fill}" stroke="{stroke}" stroke-width="{width}"/>')
            if n.repeat > 1:  # a stacked look for a collapsed run
                self.out.append(f'<path d="M{_num(n.x + 4)},{_num(n.y + n.h + 3)} H{_num(n.x + n.w - 3)} '
                                f'V{_num(n.y + 4)}" fill="none" stroke="{stroke}" stroke-width="1.2"/>')
            lines = self.lay.lines.get(n.id, [n.label])
            notes = self.lay.lines.get(n.id + "/note", [])
            ty = n.y + PADY + 11.5
            for i, line in enumerate(lines):
                anchor, tx = ("middle", cx) if len(lines) == 1 else ("start", n.x + PADX)
                self.text(tx, ty, line, 12, ink, anchor, "bold" if n.klass in ("block", "io") and i == 0 else
                          "normal", "label")
                ty += LINE
            for note in notes:
                self.text(cx, ty - 1, note, 10.5, "#6b7280" if n.klass != "io" else "#d1d5db", "middle",
                          cls="note")
                ty += NLINE
        self.out.append("</g>")

    def element(self, el) -> None:
        if isinstance(el, Node):
            self.node(el)
        elif isinstance(el, Column):
            for it in el.items:
                self.element(it)
        elif isinstance(el, Lanes):
            for lane in el.lanes:
                self.element(lane)
            if el.merge is not None:
                self.element(el.merge)
        elif isinstance(el, Residual):
            self.element(el.body)
            self.element(el.add)
        elif isinstance(el, Group):
            x, y, w, h = self.lay.frame(el)
            fill, stroke, dash = GROUP_STYLE.get(el.klass, GROUP_STYLE["stage"])
            d = f' stroke-dasharray="{dash}"' if dash else ""
            # the frame goes under the edges; the title (on a backing of the group's colour) over them
            self.bg.append(f'<rect class="frame-{el.klass}" x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" '
                           f'height="{_num(h)}" rx="10" fill="{fill}" stroke="{stroke}" stroke-width="1.3"{d}/>')
            self.out.append(f'<g class="{el.klass}" id="{_attr(el.id)}">')
            subs = el.subtitle.split("\n") if el.subtitle else []
            self.out.append(f'<rect x="{_num(x + GPAD - 3)}" y="{_num(y + 5)}" width="{_num(title_width(el) + 6)}" '
                            f'height="{_num(head_height(el) - 5)}" fill="{fill}" fill-opacity="0.9"/>')
            self.text(x + GPAD, y + 18, el.title, 13, stroke, weight="bold", cls="title")
            for i, line in enumerate(subs):
                self.text(x + GPAD, y + 32 + 13 * i, line, 10.5, "#4b5563", cls="subtitle")
            self.element(el.body)
            self.out.append("</g>")

    def label(self, x, y, text, color="#374151", anchor="start") -> None:
        w = len(text) * NCW + 6
        bx = {"start": x - 3, "end": x - w + 3}.get(anchor, x - w / 2)
        self.out.append(f'<rect x="{_num(bx)}" y="{_num(y - 10)}" width="{_num(w)}" height="13" rx="3" '
                        f'fill="#ffffff" fill-opacity="0.85"/>')
        self.text(x, y, text, 10.5, color, anchor, cls="shape")

    def ports(self) -> None:
        """Spread the ends of several edges leaving or entering one box along its side."""
        nodes = self.lay.d.nodes
        outs: dict[str, list] = {}
        ins: dict[str, list] = {}
        for i, e in enumerate(self.lay.d.edges):
            if e.kind != "skip":
                outs.setdefault(e.src, []).append(i)
                ins.setdefault(e.dst, []).append(i)
        self.out_x, self.in_x = {}, {}
        for table, mine, other, store in ((outs, "src", "dst", self.out_x), (ins, "dst", "src", self.in_x)):
            for nid, idx in table.items():
                n = nodes[nid]
                idx.sort(key=lambda i, other=other: _cx(nodes[getattr(self.lay.d.edges[i], other)]))
                k = len(idx)
                step = min(40.0, (n.w - 16) / k) if k > 1 and n.klass != "merge" else 0.0
                for j, i in enumerate(idx):
                    store[i] = _cx(n) + (j - (k - 1) / 2) * step

    def crossings(self, x: float, ya: float, yb: float, s: Node, t: Node) -> int:
        """How many boxes a vertical line at x from ya to yb would cross (the edge's ends left out)."""
        return sum(1 for n in self.lay.d.nodes.values() if n is not s and n is not t and n.x - 3 <= x <= n.x + n.w + 3
                   and n.y < yb and n.y + n.h > ya)

    def edge(self, i: int, e) -> None:
        """Route edge `i` in flow coordinates (before the boxes are put on the page)."""
        nodes = self.lay.d.nodes
        s, t = nodes[e.src], nodes[e.dst]
        lay = self.lay
        if e.kind == "skip" and t.id in lay.skip_x:
            fx, fy = lay.fork[t.id]
            path = [("M", fx, fy), ("H", lay.skip_x[t.id]), ("V", t.y + t.h / 2), ("H", t.x - 1)]
            self.routes.append((e, path, None))
            return
        x1, y1 = self.out_x.get(i, _cx(s)), s.y + s.h
        x2, y2 = self.in_x.get(i, _cx(t)), t.y - 1
        anchor = "end" if x2 < _cx(t) - 1 else "start"
        lx, ly = (x2 - 7 if anchor == "end" else x2 + 7), y2 - 8
        if t.klass == "merge":  # several lanes meet: each label on its own lane's edge
            lx, ly, anchor = x1 + 7, (y1 + y2) / 2 + 4, "start"
        if lay.lr:  # left to right the shape sits above the edge, in the gap before the box
            (p1x, p1y), (p2x, p2y) = lay.point(x1, y1), lay.point(x2, y2)
            if t.klass == "merge":
                lx, ly, anchor = p1x + 6, p1y - 5, "start"
            elif abs(x1 - x2) < 1:
                lx, ly, anchor = (p1x + p2x) / 2, p1y - 5, "middle"
            else:
                lx, ly, anchor = p2x - 6, p2y - 5, "end"
        if y2 > y1 + 4 and abs(x1 - x2) < 1:
            path = [("M", x1, y1), ("V", y2)]
        elif y2 > y1 + 4:
            bend = min(VGAP * 0.8, (y2 - y1) / 2)
            if t.klass != "merge" and self.crossings(x1, y1 + bend, y2, s, t) < self.crossings(x2, y1, y2 - bend, s, t):
                my = y2 - bend  # straight down under the source, bend near the target
                path = [("M", x1, y1), ("V", my), ("C", x1, y2, x2, my, x2, y2)]
            elif t.klass != "merge":  # bend near the source, arrive vertically
                my = y1 + bend
                path = [("M", x1, y1), ("C", x1, my, x2, y1, x2, my), ("V", y2)]
            else:
                my = (y1 + y2) / 2
                path = [("M", x1, y1), ("C", x1, my, x2, my, x2, y2)]
        else:  # upward or level: around the side (the right, or below when left to right)
            x1, y1 = s.x + s.w, s.y + s.h / 2
            x2, y2 = t.x + t.w, t.y + t.h / 2
            bend = max(x1, x2) + 40
            path = [("M", x1, y1), ("C", bend, y1, bend, y2, x2 + 1, y2)]
            lx, ly, anchor = bend - 10, (y1 + y2) / 2, "start"
            if lay.lr:
                lx, ly, anchor = (y1 + y2) / 2, bend + 4, "middle"
        self.routes.append((e, path, (lx, ly, anchor) if e.label else None))

    def draw_edge(self, e, path, label) -> None:
        """An edge routed by `edge`, on the page."""
        color = {"named": "#7c3aed", "skip": "#6b7280"}.get(e.kind, "#4b5563")
        marker = {"named": "arrow-named"}.get(e.kind, "arrow")
        dash = ' stroke-dasharray="5,3"' if e.kind == "named" else ""
        ends = f' data-src="{e.src}" data-dst="{e.dst}"'
        d = _path(path, self.lay.lr)
        self.out.append(f'<path class="edge {e.kind}"{ends} d="{d}" fill="none" stroke="{color}" '
                        f'stroke-width="1.3"{dash} marker-end="url(#{marker})"/>')
        if e.kind == "skip":
            fx, fy = self.lay.point(path[0][1], path[0][2])
            self.out.append(f'<circle cx="{_num(fx)}" cy="{_num(fy)}" r="2.5" fill="{color}"/>')
        if label is not None:
            self.labels.append((*label, e.label, color if e.kind == "named" else "#374151"))


def _path(cmds, lr: bool) -> str:
    """SVG path data from commands in flow coordinates (M x y, H x, V y, C x1 y1 x2 y2 x y), turned
    onto the page when the flow runs left to right."""
    out = []
    for op, *v in cmds:
        if lr:
            op = {"H": "V", "V": "H"}.get(op, op)
            v = [v[k ^ 1] for k in range(len(v))] if len(v) > 1 else v
        pairs = [f"{_num(v[k])},{_num(v[k + 1])}" for k in range(0, len(v) - 1, 2)] if len(v) > 1 else [_num(v[0])]
        out.append(op + " ".join(pairs))
    return " ".join(out)


def _cx(n: Node) -> float:
    return n.x + n.w / 2


def to_svg(d: Diagram, direction: str = "TB") -> str:
    """The SVG of diagram `d`, its flow top to bottom ("TB") or left to right ("LR")."""
    lay = Layout(d, direction)
    title_w = max(len(d.title) * CW * 1.45, len(d.subtitle) * NCW * 1.1)
    top = MARGIN + 46
    width, height = lay.run(top, title_w)
    svg = _Svg(lay)
    svg.routes = []
    svg.ports()
    for i, e in enumerate(d.edges):
        svg.edge(i, e)
    lay.realise()
    svg.element(d.root)
    body = svg.out
    svg.out = []
    for e, path, label in svg.routes:
        svg.draw_edge(e, path, label)
    edges = svg.out
    svg.out = []
    for lx, ly, anchor, text, color in svg.labels:
        svg.label(lx, ly, text, color, anchor)
    labels = svg.out
    svg.out = []
    svg.text(MARGIN, MARGIN + 16, d.title, 18, "#111827", weight="bold", cls="model-title")
    svg.text(MARGIN, MARGIN + 34, d.subtitle, 11, "#4b5563", cls="model-subtitle")
    head = svg.out
    defs = ('<defs>'
            '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#4b5563"/></marker>'
            '<marker id="arrow-named" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#7c3aed"/></marker>'
            '</defs>')
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(width)}" height="{_num(height)}" '
         f'viewBox="0 0 {_num(width)} {_num(height)}" font-family="{FONT}">'),
        f"<title>{escape(d.title)}</title>",
        defs,
        f'<rect width="{_num(width)}" height="{_num(height)}" fill="#ffffff"/>',
        *head,
        '<g class="frames">', *svg.bg, "</g>",
        '<g class="edges">', *edges, "</g>",
        '<g class="diagram">', *body, "</g>",
        '<g class="edge-labels">', *labels, "</g>",
        "</svg>",
    ]
    return "\n".join(parts) + "\n"
