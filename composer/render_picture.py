"""PDF and PNG pictures of composer graph, drawn with matplotlib (the optional extra `pictures`).

The SVG that render_svg writes is the one drawing: this module draws its elements again, in order,
on a matplotlib figure whose unit is the SVG's pixel (one typographic point), so the PDF and PNG
have the same layout, boxes, edges and text. It reads only what render_svg writes: <g>, <rect>
(rounded), <circle>, <path> (M, H, V and C commands; the arrow markers), <text>. matplotlib ships
as wheels with its fonts (DejaVu Sans Mono, the font the SVG names first) and needs no system
library; it is imported only here, when a PDF or PNG is asked for. No torch.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from .diagnostics import error

PICTURES = (".pdf", ".png")
PNG_SCALE = 2  # PNG pixels per SVG pixel: sharp on a page or a slide
PNG_MAX = 32_000  # pixels along a side at most (Agg's limit is 2^16): a huge drawing gets a smaller scale
_NS = "{http://www.w3.org/2000/svg}"
_ANCHOR = {"start": "left", "middle": "center", "end": "right"}
_MARKERS = {"url(#arrow)": "#4b5563", "url(#arrow-named)": "#7c3aed"}  # render_svg's <defs>


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise error("missing", "writing PDF or PNG needs matplotlib, which is not installed", None,
                    "pip install \"arch-composer[pictures]\" (or pip install matplotlib); "
                    ".svg, .html, .dot and .mmd need nothing more") from None
    return matplotlib, Figure


def check_available() -> None:
    """A user error now, before any work, when matplotlib is missing."""
    _matplotlib()


def write_picture(svg: str, path, fmt: str) -> None:
    """Draw the SVG text `svg` (render_svg's) to the file `path` as PDF or PNG (`fmt`: .pdf or .png)."""
    matplotlib, Figure = _matplotlib()
    root = ET.fromstring(svg)
    width, height = float(root.get("width")), float(root.get("height"))
    with matplotlib.rc_context({"pdf.fonttype": 42, "font.family": "monospace",
                                "font.monospace": ["DejaVu Sans Mono"], "path.simplify": False}):
        fig = Figure(figsize=(width / 72, height / 72), dpi=72)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()
        _Painter(ax).draw(root)
        kind = fmt.lstrip(".")
        scale = min(PNG_SCALE, PNG_MAX / max(width, height))
        options = {"metadata": {"CreationDate": None}} if kind == "pdf" else {"dpi": 72 * scale}
        fig.savefig(path, format=kind, **options)


class _Painter:
    def __init__(self, ax):
        self.ax = ax
        self.z = 0

    def draw(self, el) -> None:
        for child in el:
            tag = child.tag.removeprefix(_NS)
            if tag == "g":
                self.draw(child)
            elif tag in ("rect", "circle", "path", "text"):
                self.z += 1
                getattr(self, tag)(child)

    def style(self, el) -> dict:
        fill = el.get("fill", "#000000")
        dash = el.get("stroke-dasharray")
        out = {"facecolor": "none" if fill == "none" else fill, "zorder": self.z,
               "edgecolor": el.get("stroke", "none"), "linewidth": float(el.get("stroke-width", 0))}
        if el.get("fill-opacity"):
            out["alpha"] = float(el.get("fill-opacity"))
        if dash:
            out["linestyle"] = (0, tuple(float(v) for v in dash.split(",")))
        return out

    def rect(self, el) -> None:
        from matplotlib.patches import FancyBboxPatch

        x, y, w, h = (float(el.get(k, 0)) for k in ("x", "y", "width", "height"))
        r = min(float(el.get("rx", 0)), w / 2, h / 2)
        box = f"round,pad=0,rounding_size={r}" if r > 0 else "square,pad=0"
        self.ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=box, **self.style(el)))

    def circle(self, el) -> None:
        from matplotlib.patches import Circle

        self.ax.add_patch(Circle((float(el.get("cx")), float(el.get("cy"))), float(el.get("r")), **self.style(el)))

    def path(self, el) -> None:
        from matplotlib.patches import PathPatch, Polygon
        from matplotlib.path import Path

        verts, codes = _path_data(el.get("d"))
        style = self.style(el)
        style["facecolor"] = "none"
        style["capstyle"] = "butt"
        self.ax.add_patch(PathPatch(Path(verts, codes), **style))
        color = _MARKERS.get(el.get("marker-end", ""))
        if color is None or len(verts) < 2:
            return
        # the SVG marker: a triangle 7 stroke-widths long whose point lies 0.7 past the end
        (ax, ay), (bx, by) = verts[-2], verts[-1]
        if (ax, ay) == (bx, by) and len(verts) > 2:
            ax, ay = verts[-3]
        length = ((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5 or 1.0
        ux, uy = (bx - ax) / length, (by - ay) / length
        size = 7 * style["linewidth"]
        tip = (bx + ux * size * 0.1, by + uy * size * 0.1)
        base = (tip[0] - ux * size, tip[1] - uy * size)
        half = size / 2
        self.ax.add_patch(Polygon([tip, (base[0] - uy * half, base[1] + ux * half),
                                   (base[0] + uy * half, base[1] - ux * half)], closed=True, facecolor=color,
                                  edgecolor="none", zorder=self.z))

    def text(self, el) -> None:
        self.ax.text(float(el.get("x")), float(el.get("y")), el.text or "", fontsize=float(el.get("font-size", 12)),
                     color=el.get("fill", "#000000"), ha=_ANCHOR.get(el.get("text-anchor", "start"), "left"),
                     va="baseline", fontweight=el.get("font-weight", "normal"), zorder=self.z)


def _path_data(d: str):
    """Vertices and matplotlib path codes of SVG path data made of M, H, V and C commands."""
    from matplotlib.path import Path

    verts, codes = [], []
    x = y = 0.0
    for op, args in re.findall(r"([MHVCL])([^MHVCL]*)", d):
        nums = [float(v) for v in re.split(r"[\s,]+", args.strip()) if v]
        if op in ("M", "L"):
            x, y = nums[0], nums[1]
            verts.append((x, y))
            codes.append(Path.MOVETO if op == "M" else Path.LINETO)
        elif op == "H":
            x = nums[0]
            verts.append((x, y))
            codes.append(Path.LINETO)
        elif op == "V":
            y = nums[0]
            verts.append((x, y))
            codes.append(Path.LINETO)
        else:
            pts = [(nums[k], nums[k + 1]) for k in range(0, 6, 2)]
            verts += pts
            codes += [Path.CURVE4] * 3
            x, y = pts[-1]
    return verts, codes
