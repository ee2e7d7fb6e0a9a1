"""The cases of the fuzz harness (benchmarks/fuzz.py, tests/test_fuzz.py): mutated zoo blueprints.

Every case is a function of (seed, index) alone, so one case can be made again from its number.
A case is a small folder of files (the mutated blueprint, and for a mutated library file a copy of
a zoo file that imports it) and the file to check. Sources: every blueprints/*.arch and
blueprints/lib/*.arch and its YAML twin (blueprints/NAME.yaml when there is one, else the .arch
converted). Mutations:

- token: delete, duplicate or swap a token; a number becomes 0, -1, huge, a float...; a name
  becomes another known name; a token becomes a string;
- line: delete, duplicate or move a line;
- hostile: deep nesting, exponent towers, squaring and doubling chains, huge lists and ranges,
  huge ints, float overflow, division by 0, recursive blocks, nested `parallel for`, many
  definitions, a 1 MB line, a long import path (the patterns of issue 15).

`classify(rc, stderr)` names the outcome of a `composer check`: accepted, located (exit 2 with a
`file:line:col: error:` line), unlocated (exit 2 without one), or exit3 (any other status).
No torch anywhere here (the check path never needs it).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ZOO = REPO / "blueprints"

OUTCOMES = ("accepted", "located", "unlocated", "exit3", "slow", "memory")
LOCATED = re.compile(r"^\S.*:\d+:\d+: error: ", re.M)

# a token: a comment (kept, never mutated), a string, a number, a name, an operator or a bracket
TOKEN = re.compile(r"""(?P<comment>\#[^\n]*)|(?P<string>"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
                   r"|(?P<number>\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
                   r"|(?P<op>\*\*|//|==|!=|<=|>=|\.\.|->|[^\s\w])")
IMPORT = re.compile(r'^(\s*import\s+")([^"]+)(")', re.M)
YAML_IMPORT = re.compile(r"^(imports:\s*)(.*)$", re.M)


def classify(rc: int, stderr: str) -> str:
    if rc == 0:
        return "accepted"
    if rc == 2:
        return "located" if LOCATED.search(stderr) else "unlocated"
    return "exit3"


@dataclass
class Case:
    index: int
    label: str  # what was done: "resnet.arch (yaml) token:number 17:12 '64' -> '-1'"
    files: dict = field(default_factory=dict)  # path relative to the case folder -> text
    target: str = ""  # the file to check, relative to the case folder

    def write(self, folder: Path) -> Path:
        for rel, text in self.files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        return folder / self.target


@dataclass
class Source:
    name: str  # blueprints-relative .arch path: "resnet.arch", "lib/convnets.arch"
    yaml: bool  # the YAML twin

    @property
    def label(self) -> str:
        return self.name + (" (yaml)" if self.yaml else "")


class Corpus:
    """The zoo's texts, their tokens and YAML twins (converted lazily), and the names they use."""

    def __init__(self, zoo: Path = ZOO):
        self.zoo = zoo
        names = sorted(p.relative_to(zoo).as_posix() for p in [*zoo.glob("*.arch"), *zoo.glob("lib/*.arch")])
        self.sources = [Source(n, y) for n in names for y in (False, True)]
        self.arch = {n: (zoo / n).read_text(encoding="utf-8") for n in names}
        self._yaml: dict[str, str] = {}
        self._tokens: dict[tuple, list] = {}
        self.importers: dict[str, list[str]] = {}  # lib stem -> zoo files importing it, smallest first
        for n in sorted((n for n in names if "/" not in n), key=lambda n: (len(self.arch[n]), n)):
            for m in IMPORT.finditer(self.arch[n]):
                if m.group(2).startswith("lib/"):
                    self.importers.setdefault(m.group(2)[4:], []).append(n)
        from composer.ops import OPS

        words = set(OPS)  # every op, not only those the zoo uses
        for text in self.arch.values():
            words.update(m.group("name") for m in TOKEN.finditer(text) if m.group("name"))
        self.names = sorted(words)

    def text(self, src: Source) -> str:
        """The source's text; a library file's sibling imports are spelled `lib/X` (so the mutated
        copy, in the case's lib/ folder, still finds them in the standard library)."""
        text = self.arch[src.name]
        if "/" in src.name:
            text = IMPORT.sub(lambda m: m.group(1) + (m.group(2) if "/" in m.group(2) else "lib/" + m.group(2))
                              + m.group(3), text)
        if not src.yaml:
            return text
        if src.name not in self._yaml:
            twin = self.zoo / src.name.replace(".arch", ".yaml")
            if twin.is_file():
                self._yaml[src.name] = twin.read_text(encoding="utf-8")
            else:
                from composer.convert import arch_to_yaml

                self._yaml[src.name] = arch_to_yaml(text, src.name)
        return self._yaml[src.name]

    def tokens(self, src: Source, text: str) -> list[tuple[str, int, int]]:
        """(kind, start, end) of every token of `text` but comments (cached for the source's own text)."""
        key = (src.name, src.yaml)
        if text is not self.text(src):
            return tokens(text)
        if key not in self._tokens:
            self._tokens[key] = tokens(text)
        return self._tokens[key]


def tokens(text: str) -> list[tuple[str, int, int]]:
    return [(m.lastgroup, m.start(), m.end()) for m in TOKEN.finditer(text) if m.lastgroup != "comment"]


# ---- mutations: each takes (rng, corpus, source, text) and returns (new text, label) ----------

NUMBERS = ["0", "-1", "1" + "0" * 30, "99999999999", "0.5", "1e309", "-0.0", "2 ** 62", "1e-320", "3.0",
           "-7", "65536", "1", "2", "3", "5", "7", "13", "1000"]  # small ones: shapes that do not divide
STRINGS = ['"x"', '""', '"avg"', '"max"', '"\\u0000"', '"' + "é" * 3 + '"']


def _where(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"{line}:{pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"


def _splice(text, start, end, new):
    return text[:start] + new + text[end:]


def token_mutation(rng: random.Random, corpus: Corpus, src: Source, text: str):
    toks = corpus.tokens(src, text)
    if not toks:
        return text + "\n}", "token:append '}'"
    kind, a, b = toks[rng.randrange(len(toks))]
    old = text[a:b]
    op = rng.choice(["delete", "duplicate", "swap", "number", "number", "name", "name", "string"])
    if op == "number":
        numbers = [t for t in toks if t[0] == "number"]
        if numbers:
            kind, a, b = numbers[rng.randrange(len(numbers))]
            old = text[a:b]
        new = rng.choice(NUMBERS)
    elif op == "name":
        names = [t for t in toks if t[0] == "name"]
        if names:
            kind, a, b = names[rng.randrange(len(names))]
            old = text[a:b]
        local = [text[x:y] for k, x, y in toks if k == "name"]
        new = rng.choice(local if local and rng.random() < 0.5 else corpus.names)
    elif op == "string":
        new = rng.choice(STRINGS)
    elif op == "delete":
        new = ""
    elif op == "duplicate":
        new = old + " " + old
    else:  # swap with the next token
        i = next(i for i, t in enumerate(toks) if t[1] == a)
        if i + 1 >= len(toks):
            return _splice(text, a, b, ""), f"token:delete {_where(text, a)} {old!r}"
        _, c, d = toks[i + 1]
        return (text[:a] + text[c:d] + text[b:c] + old + text[d:],
                f"token:swap {_where(text, a)} {old!r} <-> {text[c:d]!r}")
    return _splice(text, a, b, new), f"token:{op} {_where(text, a)} {old!r} -> {new[:40]!r}"


def line_mutation(rng: random.Random, corpus: Corpus, src: Source, text: str):
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    op = rng.choice(["delete", "duplicate", "move"])
    if op == "delete":
        del lines[i]
        return "\n".join(lines), f"line:delete {i + 1}"
    if op == "duplicate":
        lines.insert(i, lines[i])
        return "\n".join(lines), f"line:duplicate {i + 1}"
    line = lines.pop(i)
    j = rng.randrange(len(lines) + 1)
    lines.insert(j, line)
    return "\n".join(lines), f"line:move {i + 1} -> {j + 1}"


# hostile expressions, put in place of a number: (name, maker(rng) -> text)
def _nest(rng, o, c):
    k = rng.choice([50, 200, 500, 1000, 3000])
    return o * k + "1" + c * k


HOSTILE_EXPRS = [
    ("parens", lambda r: _nest(r, "(", ")")),
    ("brackets", lambda r: _nest(r, "[", "]")),
    ("unary", lambda r: "-" * r.choice([100, 1000, 5000]) + "1"),
    ("long-sum", lambda r: " + ".join(["1"] * r.choice([1000, 10000, 50000]))),
    ("tower", lambda r: " ** ".join([str(r.choice([2, 3, 9]))] * r.choice([3, 4, 5, 8]))),
    ("big-pow", lambda r: f"10 ** {r.choice([300, 4301, 100000])}"),
    ("big-literal", lambda r: "9" * r.choice([4301, 5000, 20000])),
    ("float-overflow", lambda r: r.choice(["1e300 ** 2", "int(1e309)", "1e309", "-1e309 * 0", "1e308 * 10",
                                            "round(1e309)", "float(10 ** 400)", "2.0 ** 2000"])),
    ("divide-by-0", lambda r: r.choice(["7 // 0", "7 % 0", "7 / 0", "0 ** -1", "make_divisible(7, 0)",
                                        "make_divisible(7, -8)", "range(0, 10, 0)"])),
    ("huge-list", lambda r: r.choice(["len([0] * 10 ** 9)", "len([0] * 10 ** 5 * 10 ** 5)",
                                      "len(range(10 ** 12))", "sum(range(999999))", "[0] * 10 ** 9",
                                      "len([i for i in range(999999)])",
                                      "len([[j for j in range(99999)] for i in range(99999)])",
                                      "len(range(10 ** 400))", "[1, 2][10 ** 20]"])),
    ("string-repeat", lambda r: r.choice(['len("ab" * 10 ** 9)', 'len("ab" + "c" * 10 ** 8)'])),
    ("empty", lambda r: r.choice(["min([])", "max([])", "sum([])", "len(1)", "[][0]"])),
]

_TAIL = '    input image(3, 8)\n{body}    head {{ global_pool("avg"); classifier(10) }}\n}}\n'


def _model(name: str, body: str, lets: str = "") -> str:
    return f"\nmodel {name}(num_classes = 10) {{\n{lets}" + _TAIL.format(body=body)


def _chain(rng, op: str, start: str) -> str:
    k = rng.choice([20, 40, 64])
    lets = f"    let v0 = {start}\n" + "".join(f"    let v{i} = v{i - 1} {op} v{i - 1}\n" for i in range(1, k))
    used = f"len(v{k - 1})" if op == "+" else f"v{k - 1}"  # used, so that it is evaluated
    return _model("fz_chain", f"    stem conv(8, 3 + 0 * {used})\n", lets)


def _recursive(rng) -> str:
    d = rng.choice([8, 16, 24, 40])
    return ("\nblock fz_r(n) {\n    parallel add { (n > 0 ? fz_r(n - 1) : relu); (n > 0 ? fz_r(n - 1) : relu) }\n}\n"
            + _model("fz_rec", f"    stem {{ conv(8, 3); fz_r({d}) }}\n"))


def _nested_parallel(rng) -> str:
    n = rng.choice([16, 64, 256])
    return _model("fz_par", f"    stem {{ conv(8, 3); parallel add for a in 0..{n} {{ parallel add for b in 0..{n} "
                  f"{{ parallel add for c in 0..{n} {{ relu }} }} }} }}\n")


def _residuals(rng) -> str:
    k = rng.choice([100, 500, 2000])
    return _model("fz_res", "    stem { conv(8, 3); " + "residual { " * k + "relu" + " }" * k + " }\n")


def _big_repeat(rng) -> str:
    n = rng.choice(["100000", "10 ** 9", "2 ** 40"])
    return _model("fz_rep", f"    stem conv(8, 3)\n    stage {{ repeat {n} relu }}\n")


def _many_stages(rng) -> str:
    return _model("fz_stages", f"    stem conv(8, 3)\n    stages for i in 0..{rng.choice(['100000', '10 ** 9'])} "
                  "{ repeat 1 relu }\n")


HOSTILE_SNIPPETS = [  # appended to an .arch file: (name, maker(rng) -> text)
    ("squaring", lambda r: _chain(r, "*", "10")),
    ("list-doubling", lambda r: _chain(r, "+", "[0]")),
    ("string-doubling", lambda r: _chain(r, "+", '"ab"')),
    ("recursive-block", _recursive),
    ("self-recursive", lambda r: "\nblock fz_self { fz_self }\n" + _model("fz_self_m", "    stem fz_self\n")),
    ("nested-parallel-for", _nested_parallel),
    ("nested-residual", _residuals),
    ("big-repeat", _big_repeat),
    ("many-stages", _many_stages),
    ("big-input", lambda r: _model("fz_in", "    stem conv(8, 3)\n").replace(
        "image(3, 8)", r.choice(["image(3, 200000)", "image(0, 8)", "image(3, 0)", "image(10 ** 6, 8)",
                                 "image(3, [8, 8, 8, 8, 8, 8])", "image(3, -8)"]))),
    ("bad-op-args", lambda r: _model("fz_args", "    stem " + r.choice([
        "conv(8, 3, stride = 0)", "conv(-1, 3)", "conv(8, 0)", "conv(8, 3, dilation = 0)",
        "conv(8, 3, padding = -4)", "pool(3, stride = 2, padding = 5)", "dropout(1.5)", "conv(8, 3, groups = 0)",
        "patch_embed(8, 0)", "conv(8, 10 ** 6)", "conv(10 ** 9, 3)", "linear(0)"]) + "\n")),
]


def _many_definitions(rng, text):
    n = rng.choice([2000, 15000])
    return text + "".join(f"\nblock fz_b{i} {{ relu }}" for i in range(n)) + "\n", f"hostile:many-definitions {n}"


def _long_line(rng, text):
    n = rng.choice([10**5, 10**6 - 100])
    what = rng.choice(["comment", "sum", "names"])
    line = {"comment": "# " + "x" * n, "sum": "let fz_long = " + "1 + " * (n // 4) + "nope",
            "names": "x" * n}[what]
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    lines.insert(i, line)
    return "\n".join(lines), f"hostile:long-line {what} at {i + 1}"


def _long_import(rng, text):
    n = rng.choice([300, 5000])
    return f'import "{"a" * n}"\n' + text, f"hostile:long-import {n}"


def hostile_mutation(rng: random.Random, corpus: Corpus, src: Source, text: str):
    toks = [t for t in corpus.tokens(src, text) if t[0] == "number"]
    choice = rng.random()
    if src.yaml or choice < 0.5:  # an expression in place of a number
        name, make = rng.choice(HOSTILE_EXPRS)
        if not toks:
            return text + "\n" + make(rng), f"hostile:{name} appended"
        _, a, b = toks[rng.randrange(len(toks))]
        new = make(rng)
        if src.yaml:  # a quoted scalar, so YAML reads it as the expression's text
            new = "'" + new + "'" if "'" not in text[:a].rsplit("\n", 1)[-1] else new
        return _splice(text, a, b, new), f"hostile:{name} {_where(text, a)} {text[a:b]!r} -> {new[:40]!r}"
    if choice < 0.9:
        name, make = rng.choice(HOSTILE_SNIPPETS)
        return text + make(rng), f"hostile:{name}"
    return rng.choice([_many_definitions, _long_line, _long_import])(rng, text)


def make_case(corpus: Corpus, seed: int, index: int) -> Case:
    """Case `index` of the run with `seed`: every source in turn (in an order the seed shuffles),
    mutated at random (60 % one token, or two, 20 % one line, 20 % a hostile pattern)."""
    order = list(range(len(corpus.sources)))
    random.Random(f"order-{seed}").shuffle(order)
    src = corpus.sources[order[index % len(order)]]
    rng = random.Random(f"case-{seed}-{index}")
    text = corpus.text(src)
    r = rng.random()
    mutate = token_mutation if r < 0.6 else line_mutation if r < 0.8 else hostile_mutation
    new, what = mutate(rng, corpus, src, text)
    if mutate is token_mutation and rng.random() < 0.3:
        new, second = token_mutation(rng, corpus, src, new)
        what += " then " + second
    stem = Path(src.name).stem
    suffix = ".yaml" if src.yaml else ".arch"
    case = Case(index, f"{src.label} {what}")
    if "/" not in src.name:
        case.files[stem + suffix] = new
        case.target = stem + suffix
        return case
    case.files["lib/" + stem + suffix] = new
    importers = corpus.importers.get(stem, [])
    if not importers:  # a library file no zoo file imports: checked alone
        case.target = "lib/" + stem + suffix
        return case
    user = importers[rng.randrange(min(3, len(importers)))]
    user_text = corpus.arch[user]
    if src.yaml:
        user_text = user_text.replace(f'import "lib/{stem}"', f'import "lib/{stem}.yaml"')
    case.files[user] = user_text
    case.target = user
    case.label += f" (checked through {user})"
    return case
