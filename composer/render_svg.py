"""Lay a diagram tree (composer.render) out top-down and write it as SVG, in pure Python.

Text is measured at a fixed width per character (a monospace font at 12px is ~7.2px a
character). A column stacks its items centred on one axis, lanes sit side by side above their merge
node, a residual keeps a lane on its left for the skip line, and a group is a rounded rectangle
with a title. Edges are drawn last: straight when vertical, else a smooth curve, with the tensor
shape beside them on a white backing.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from .render_tree import Column, Diagram, Group, Lanes, Node, Residual

FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
CW, NCW = 7.25, 6.35  # character widths at 12px and 10.5px
LINE, NLINE = 15, 13
PADX, PADY = 10, 6
VGAP, HGAP = 38, 26
GPAD, SKIP, FORK = 14, 22, 8
WRAP = 54  # characters per line of a box label
MARGIN = 20

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


def wrap(text: str, width: int = WRAP) -> list[str]:
    """Break a label after commas or spaces (outside no bracket level in particular) to `width`."""
    if len(text) <= width:
        return [text]
    lines, line = [], ""
    for tok in _tokens(text):
        if line and len(line) + len(tok) > width:
            lines.append(line.rstrip())
            line = "  " + tok.lstrip()
        else:
            line += tok
    if line.strip():
        lines.append(line.rstrip())
    return lines


def _tokens(text: str) -> list[str]:
    """Pieces of a label ending after a ", " or " | " (a piece still too long breaks after a "(")."""
    out, cur = [], ""
    for i, ch in enumerate(text):
        cur += ch
        if ch == " " and i and text[i - 1] in ",|":
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    fine = []
    for piece in out:
        while len(piece) > WRAP and "(" in piece[:WRAP]:
            cut = piece[:WRAP].rindex("(") + 1
            fine.append(piece[:cut])
            piece = piece[cut:]
        fine.append(piece)
    return fine


# ---- layout ------------------------------------------------------------------------------------


class Layout:
    def __init__(self, d: Diagram):
        self.d = d
        self.size: dict[int, tuple[float, float]] = {}
        self.pos: dict[int, tuple[float, float]] = {}
        self.inlabel: dict[str, float] = {}
        for e in d.edges:
            if e.kind == "flow" and e.label:
                self.inlabel[e.dst] = max(self.inlabel.get(e.dst, 0), len(e.label) * NCW)
        self.lines: dict[str, list[str]] = {}

    def entry(self, el) -> list[Node]:
        if isinstance(el, Node):
            return [el]
        if isinstance(el, Column):
            return self.entry(el.items[0]) if el.items else []
        if isinstance(el, Lanes):
            return [n for lane in el.lanes for n in self.entry(lane)] or ([el.merge] if el.merge else [])
        if isinstance(el, Residual):
            return self.entry(el.body) or [el.add]
        if isinstance(el, Group):
            return self.entry(el.body)
        return []

    def measure(self, el) -> tuple[float, float]:
        if isinstance(el, Node):
            if el.klass == "merge":
                w = 26 if len(el.label) <= 1 else len(el.label) * CW + 18
                size = (w, 26 if len(el.label) <= 1 else 24)
            else:
                lines = wrap(el.label)
                notes = wrap(el.note, 64) if el.note else []
                self.lines[el.id] = lines
                self.lines[el.id + "/note"] = notes
                w = max([len(t) * CW for t in lines] + [len(t) * NCW for t in notes] + [44]) + 2 * PADX
                size = (w, len(lines) * LINE + len(notes) * NLINE + 2 * PADY)
        elif isinstance(el, Column):
            w, h = 20.0, 0.0
            for i, it in enumerate(el.items):
                cw, ch = self.measure(it)
                label = max((self.inlabel.get(n.id, 0) for n in self.entry(it)), default=0)
                w = max(w, cw, 2 * (label + 14) if isinstance(it, (Node, Residual)) else 0)
                h += ch + (VGAP if i else 0)
            size = (w, h)
        elif isinstance(el, Lanes):
            sizes = [self.measure(lane) for lane in el.lanes]
            w = sum(s[0] for s in sizes) + HGAP * (len(sizes) - 1)
            h = max((s[1] for s in sizes), default=0)
            if el.merge is not None:
                mw, mh = self.measure(el.merge)
                w, h = max(w, mw), h + VGAP + mh
            size = (w, h)
        elif isinstance(el, Residual):
            bw, bh = self.measure(el.body)
            aw, ah = self.measure(el.add)
            size = (max(bw, aw) + 2 * SKIP, FORK + bh + VGAP + ah)
        elif isinstance(el, Group):
            bw, bh = self.measure(el.body)
            subs = el.subtitle.split("\n") if el.subtitle else []
            tw = max([len(el.title) * CW * 1.1] + [len(t) * NCW for t in subs])
            # the header stays left of the axis, where the edges come in
            size = (max(bw + 2 * GPAD, 2 * (tw + GPAD + 10)), _head(el) + 16 + bh + GPAD)
        else:
            raise TypeError(el)
        self.size[id(el)] = size
        return size

    def place(self, el, x: float, y: float, width: float) -> None:
        """Put `el` at top `y`, centred in [x, x + width]."""
        w, h = self.size[id(el)]
        left = x + (width - w) / 2
        self.pos[id(el)] = (left, y)
        if isinstance(el, Node):
            el.x, el.y, el.w, el.h = left, y, w, h
        elif isinstance(el, Column):
            cy = y
            for it in el.items:
                self.place(it, left, cy, w)
                cy += self.size[id(it)][1] + VGAP
        elif isinstance(el, Lanes):
            lw = sum(self.size[id(lane)][0] for lane in el.lanes) + HGAP * (len(el.lanes) - 1)
            cx = left + (w - lw) / 2
            for lane in el.lanes:
                self.place(lane, cx, y, self.size[id(lane)][0])
                cx += self.size[id(lane)][0] + HGAP
            if el.merge is not None:
                mh = self.size[id(el.merge)][1]
                self.place(el.merge, left, y + h - mh, w)
        elif isinstance(el, Residual):
            self.place(el.body, left + SKIP, y + FORK, w - 2 * SKIP)
            self.place(el.add, left, y + h - self.size[id(el.add)][1], w)
        elif isinstance(el, Group):
            self.place(el.body, left + GPAD, y + _head(el) + 16, w - 2 * GPAD)


def _head(g: Group) -> float:
    """The height of a group's title and subtitle lines."""
    return 28 + (13 * len(g.subtitle.split("\n")) if g.subtitle else 0)


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
        self.skip_x: dict[str, float] = {}  # add node id -> x of its skip line
        self.fork: dict[str, tuple[float, float]] = {}  # add node id -> fork point

    def text(self, x, y, s, size=12, color="#111827", anchor="start", weight="normal", cls=""):
        c = f' class="{cls}"' if cls else ""
        self.out.append(f'<text x="{_num(x)}" y="{_num(y)}" font-size="{size}" fill="{color}" '
                        f'text-anchor="{anchor}" font-weight="{weight}"{c}>{escape(s)}</text>')

    def node(self, n: Node) -> None:
        fill, stroke, ink = PALETTE.get(n.cat, PALETTE["misc"])
        attrs = f' data-repeat="{n.repeat}"' if n.klass == "block" else ""
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
            left, top = self.lay.pos[id(el)]
            w, _ = self.lay.size[id(el)]
            self.skip_x[el.add.id] = left + SKIP / 2
            self.fork[el.add.id] = (left + w / 2, top)
            self.element(el.body)
            self.element(el.add)
        elif isinstance(el, Group):
            x, y = self.lay.pos[id(el)]
            w, h = self.lay.size[id(el)]
            fill, stroke, dash = GROUP_STYLE.get(el.klass, GROUP_STYLE["stage"])
            d = f' stroke-dasharray="{dash}"' if dash else ""
            # the frame goes under the edges; the title (on a backing of the group's colour) over them
            self.bg.append(f'<rect class="frame-{el.klass}" x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" '
                           f'height="{_num(h)}" rx="10" fill="{fill}" stroke="{stroke}" stroke-width="1.3"{d}/>')
            self.out.append(f'<g class="{el.klass}" id="{_attr(el.id)}">')
            subs = el.subtitle.split("\n") if el.subtitle else []
            tw = max([len(el.title) * CW * 1.1] + [len(t) * NCW for t in subs])
            self.out.append(f'<rect x="{_num(x + GPAD - 3)}" y="{_num(y + 5)}" width="{_num(tw + 6)}" '
                            f'height="{_num(_head(el) - 5)}" fill="{fill}" fill-opacity="0.9"/>')
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
        nodes = self.lay.d.nodes
        s, t = nodes[e.src], nodes[e.dst]
        color = {"named": "#7c3aed", "skip": "#6b7280"}.get(e.kind, "#4b5563")
        marker = {"named": "arrow-named"}.get(e.kind, "arrow")
        dash = ' stroke-dasharray="5,3"' if e.kind == "named" else ""
        if e.kind == "skip" and t.id in self.skip_x:
            fx, fy = self.fork[t.id]
            sx = self.skip_x[t.id]
            ty = t.y + t.h / 2
            self.out.append(f'<path class="edge skip" d="M{_num(fx)},{_num(fy)} H{_num(sx)} V{_num(ty)} '
                            f'H{_num(t.x - 1)}" fill="none" stroke="{color}" stroke-width="1.3" '
                            f'marker-end="url(#arrow)"/>')
            self.out.append(f'<circle cx="{_num(fx)}" cy="{_num(fy)}" r="2.5" fill="{color}"/>')
            return
        x1, y1 = self.out_x.get(i, _cx(s)), s.y + s.h
        x2, y2 = self.in_x.get(i, _cx(t)), t.y - 1
        anchor = "end" if x2 < _cx(t) - 1 else "start"
        lx, ly = (x2 - 7 if anchor == "end" else x2 + 7), y2 - 8
        if t.klass == "merge":  # several lanes meet: each label on its own lane's edge
            lx, ly, anchor = x1 + 7, (y1 + y2) / 2 + 4, "start"
        if y2 > y1 + 4 and abs(x1 - x2) < 1:
            path = f"M{_num(x1)},{_num(y1)} V{_num(y2)}"
        elif y2 > y1 + 4:
            bend = min(VGAP * 0.8, (y2 - y1) / 2)
            if t.klass != "merge" and self.crossings(x1, y1 + bend, y2, s, t) < self.crossings(x2, y1, y2 - bend, s, t):
                my = y2 - bend  # straight down under the source, bend near the target
                path = (f"M{_num(x1)},{_num(y1)} V{_num(my)} C{_num(x1)},{_num(y2)} {_num(x2)},{_num(my)} "
                        f"{_num(x2)},{_num(y2)}")
            elif t.klass != "merge":  # bend near the source, arrive vertically
                my = y1 + bend
                path = (f"M{_num(x1)},{_num(y1)} C{_num(x1)},{_num(my)} {_num(x2)},{_num(y1)} {_num(x2)},{_num(my)} "
                        f"V{_num(y2)}")
            else:
                my = (y1 + y2) / 2
                path = f"M{_num(x1)},{_num(y1)} C{_num(x1)},{_num(my)} {_num(x2)},{_num(my)} {_num(x2)},{_num(y2)}"
        else:  # upward or level: around the right side
            x1, y1 = s.x + s.w, s.y + s.h / 2
            x2, y2 = t.x + t.w, t.y + t.h / 2
            bend = max(x1, x2) + 40
            path = f"M{_num(x1)},{_num(y1)} C{_num(bend)},{_num(y1)} {_num(bend)},{_num(y2)} {_num(x2 + 1)},{_num(y2)}"
            lx, ly, anchor = bend - 10, (y1 + y2) / 2, "start"
        self.out.append(f'<path class="edge {e.kind}" d="{path}" fill="none" stroke="{color}" stroke-width="1.3"'
                        f'{dash} marker-end="url(#{marker})"/>')
        if e.label:
            self.labels.append((lx, ly, e.label, color if e.kind == "named" else "#374151", anchor))


def _cx(n: Node) -> float:
    return n.x + n.w / 2


def to_svg(d: Diagram) -> str:
    lay = Layout(d)
    w, h = lay.measure(d.root)
    title_w = max(len(d.title) * CW * 1.45, len(d.subtitle) * NCW * 1.1)
    width = max(w, title_w) + 2 * MARGIN
    top = MARGIN + 46
    lay.place(d.root, MARGIN, top, width - 2 * MARGIN)
    svg = _Svg(lay)
    svg.labels = []
    svg.element(d.root)
    body = svg.out
    svg.out = []
    svg.ports()
    for i, e in enumerate(d.edges):
        svg.edge(i, e)
    edges = svg.out
    svg.out = []
    for lx, ly, text, color, anchor in svg.labels:
        svg.label(lx, ly, text, color, anchor)
    labels = svg.out
    svg.out = []
    svg.text(MARGIN, MARGIN + 16, d.title, 18, "#111827", weight="bold", cls="model-title")
    svg.text(MARGIN, MARGIN + 34, d.subtitle, 11, "#4b5563", cls="model-subtitle")
    head = svg.out
    height = top + h + MARGIN
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
