"""Lay a diagram tree (composer.render_tree) out, top to bottom (TB) or left to right (LR), in pure
Python. render_svg draws the result (and render_picture turns that drawing into PDF or PNG).

Text is measured at a fixed width per character (a monospace font at 12px is ~7.2px a character);
every box is as large as its whole label, wrapped over lines when long (nothing is cut). The layout
is computed once along a flow axis and a cross axis: top-down the flow runs down y; left-to-right
the same layout is transposed, so a column becomes a row, side-by-side lanes are stacked, a
residual's skip line runs above its body, and a group keeps its title on top. Each box keeps both
its flow-axis placement (`flow`, which the edge router uses) and its place on the page (Node.x, y,
w, h, set by `realise`).
"""

from __future__ import annotations

from .render_tree import Column, Diagram, Group, Lanes, Node, Residual

CW, NCW = 7.25, 6.35  # character widths at 12px and 10.5px
LINE, NLINE = 15, 13
PADX, PADY = 10, 6
VGAP, HGAP = 38, 26
GPAD, SKIP, FORK = 14, 22, 8
WRAP, WRAP_LR = 54, 32  # characters per line of a box label (narrower boxes when they sit in a row)
NOTE_WRAP = 64
LGAP = 14  # room on each side of a tensor shape written between two boxes (LR)
MARGIN = 20
DIRECTIONS = ("TB", "LR")


def wrap(text: str, width: int = WRAP) -> list[str]:
    """Break a label after commas or spaces (a piece still too long after a "(", else anywhere) to
    `width`; the lines together hold the whole text."""
    if len(text) <= width:
        return [text]
    lines, line = [], ""
    for tok in _tokens(text, width):
        if line and len(line) + len(tok) > width:
            lines.append(line.rstrip())
            line = "  " + tok.lstrip()
        else:
            line += tok
    if line.strip():
        lines.append(line.rstrip())
    return lines


def _tokens(text: str, width: int) -> list[str]:
    """Pieces of a label ending after a ", " or " | " (a piece still too long breaks after a "(",
    then after a space, then at `width`)."""
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
        while len(piece) > width:
            head = piece[:width]
            cut = head.rindex("(") + 1 if "(" in head else head.rindex(" ") + 1 if " " in head.strip() else width
            fine.append(piece[:cut])
            piece = piece[cut:]
        fine.append(piece)
    return fine


def head_height(g: Group) -> float:
    """The height of a group's title and subtitle lines."""
    return 28 + (13 * len(g.subtitle.split("\n")) if g.subtitle else 0)


def title_width(g: Group) -> float:
    subs = g.subtitle.split("\n") if g.subtitle else []
    return max([len(g.title) * CW * 1.1] + [len(t) * NCW for t in subs])


class Layout:
    """Sizes and places the tree in flow coordinates (x across the flow, y along it), then
    `realise` puts every box on the page. `flow[node id]` keeps a box's flow-coordinate rectangle,
    `pos`/`size` an element's, `fork`/`skip_x` a residual's skip line, `gaps` a column's spacing."""

    def __init__(self, d: Diagram, direction: str = "TB"):
        self.d = d
        self.lr = direction == "LR"
        self.width = WRAP_LR if self.lr else WRAP
        self.size: dict[int, tuple[float, float]] = {}
        self.pos: dict[int, tuple[float, float]] = {}
        self.gaps: dict[int, list[float]] = {}
        self.flow: dict[str, tuple[float, float, float, float]] = {}
        self.fork: dict[str, tuple[float, float]] = {}  # add node id -> where its skip line leaves the flow
        self.skip_x: dict[str, float] = {}  # add node id -> the cross position of its skip line
        self.inlabel: dict[str, float] = {}  # node id -> the widest tensor shape written on an edge into it
        for e in d.edges:
            if e.label and (e.kind == "flow" or self.lr and e.kind == "named"):
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

    def gap(self, el) -> float:
        """The space before `el` along the flow: left to right it holds the shapes written on the
        edges coming in."""
        if not self.lr:
            return VGAP
        label = max((self.inlabel.get(n.id, 0) for n in self.entry(el)), default=0)
        return max(VGAP, label + 2 * LGAP)

    def box(self, n: Node) -> tuple[float, float]:
        """A box's size on the page, from its whole label (and note)."""
        if n.klass == "merge":
            w = 26 if len(n.label) <= 1 else len(n.label) * CW + 18
            return w, (26 if len(n.label) <= 1 else 24)
        lines = wrap(n.label, self.width)
        notes = wrap(n.note, NOTE_WRAP) if n.note else []
        self.lines[n.id] = lines
        self.lines[n.id + "/note"] = notes
        w = max([len(t) * CW for t in lines] + [len(t) * NCW for t in notes] + [44]) + 2 * PADX
        return w, len(lines) * LINE + len(notes) * NLINE + 2 * PADY

    def measure(self, el) -> tuple[float, float]:
        """(across, along) the flow."""
        if isinstance(el, Node):
            w, h = self.box(el)
            size = (h, w) if self.lr else (w, h)
        elif isinstance(el, Column):
            w, h, gaps = 20.0, 0.0, []
            for i, it in enumerate(el.items):
                cw, ch = self.measure(it)
                gaps.append(self.gap(it) if i else 0.0)
                if not self.lr:  # top-down the shapes are written beside the edge, left or right of the axis
                    label = max((self.inlabel.get(n.id, 0) for n in self.entry(it)), default=0)
                    cw = max(cw, 2 * (label + 14) if isinstance(it, (Node, Residual)) else 0)
                w = max(w, cw)
                h += ch + gaps[-1]
            self.gaps[id(el)] = gaps
            size = (w, h)
        elif isinstance(el, Lanes):
            sizes = [self.measure(lane) for lane in el.lanes]
            w = sum(s[0] for s in sizes) + HGAP * (len(sizes) - 1)
            h = max((s[1] for s in sizes), default=0)
            if el.merge is not None:
                mw, mh = self.measure(el.merge)
                w, h = max(w, mw), h + self.gap(el.merge) + mh
            size = (w, h)
        elif isinstance(el, Residual):
            bw, bh = self.measure(el.body)
            aw, ah = self.measure(el.add)
            size = (max(bw, aw) + 2 * SKIP, FORK + bh + self.gap(el.add) + ah)
        elif isinstance(el, Group):
            bw, bh = self.measure(el.body)
            tw = title_width(el)
            if self.lr:  # the title above the row: as much room below it, to keep the row on the axis
                pad = head_height(el) + 8
                size = (bw + 2 * pad, max(bh + 2 * GPAD, tw + 2 * GPAD + 8))
            else:  # the header stays left of the axis, where the edges come in
                size = (max(bw + 2 * GPAD, 2 * (tw + GPAD + 10)), head_height(el) + 16 + bh + GPAD)
        else:
            raise TypeError(el)
        self.size[id(el)] = size
        return size

    def place(self, el, x: float, y: float, width: float) -> None:
        """Put `el` at flow position `y`, centred across in [x, x + width]."""
        w, h = self.size[id(el)]
        left = x + (width - w) / 2
        self.pos[id(el)] = (left, y)
        if isinstance(el, Node):  # the edge router reads the boxes in flow coordinates, until `realise`
            self.flow[el.id] = (left, y, w, h)
            el.x, el.y, el.w, el.h = left, y, w, h
        elif isinstance(el, Column):
            cy = y
            for it, gap in zip(el.items, self.gaps[id(el)]):
                cy += gap
                self.place(it, left, cy, w)
                cy += self.size[id(it)][1]
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
            self.fork[el.add.id] = (left + w / 2, y)
            self.skip_x[el.add.id] = left + SKIP / 2
            self.place(el.body, left + SKIP, y + FORK, w - 2 * SKIP)
            self.place(el.add, left, y + h - self.size[id(el.add)][1], w)
        elif isinstance(el, Group):
            if self.lr:
                pad = head_height(el) + 8
                self.place(el.body, left + pad, y + (h - self.size[id(el.body)][1]) / 2, w - 2 * pad)
            else:
                self.place(el.body, left + GPAD, y + head_height(el) + 16, w - 2 * GPAD)

    def frame(self, el) -> tuple[float, float, float, float]:
        """An element's rectangle on the page."""
        (x, y), (w, h) = self.pos[id(el)], self.size[id(el)]
        return (y, x, h, w) if self.lr else (x, y, w, h)

    def point(self, x: float, y: float) -> tuple[float, float]:
        """A point in flow coordinates, on the page."""
        return (y, x) if self.lr else (x, y)

    def realise(self) -> None:
        """Every box's place on the page (Node.x, y, w, h)."""
        for nid, (x, y, w, h) in self.flow.items():
            n = self.d.nodes[nid]
            n.x, n.y, n.w, n.h = (y, x, h, w) if self.lr else (x, y, w, h)

    def run(self, top: float, title_w: float) -> tuple[float, float]:
        """Lay the whole diagram out below a title block `top` high and `title_w` wide; the page's
        width and height."""
        w, h = self.measure(self.d.root)
        if self.lr:
            self.place(self.d.root, top, MARGIN, w)
            return max(h, title_w) + 2 * MARGIN, top + w + MARGIN
        width = max(w, title_w) + 2 * MARGIN
        self.place(self.d.root, MARGIN, top, width - 2 * MARGIN)
        return width, top + h + MARGIN
