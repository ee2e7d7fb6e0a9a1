"""The plan: the one representation of a model after resolution. Lowering (`lower.plan`) makes it;
the builder, analyse, compare, render, catalog, port and the API read it, and nothing else.

A section is a list of typed steps, one class per kind, each with only its own fields. Every step
has a path (its state_dict path), the shape it reads (`x`) and gives (`y`), and the span of the
construct it comes from; `children()` gives its nested step lists, so `walk`, `params` and `macs`
are generic. A step reads the one tensor flowing through its list. A step with several named
tensor inputs (a later `attend(q, k, v)`) adds its own field naming them, `inputs: dict[str, str]`
(role -> saved tensor), as `LoadStep.tensor` names one today; the graph (`Plan.to_networkx`) and the
builder then read that field for that class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .shapes import Shape
from .source import Span


@dataclass
class Step:
    path: str
    x: Shape
    y: Shape
    span: Span | None

    kind: ClassVar[str] = ""  # a label for display; consumers dispatch on the class

    def children(self) -> tuple:
        """The nested step lists (a residual's shortcut and body, a parallel's branches)."""
        return ()

    def walk(self):
        yield self
        for steps in self.children():
            for s in steps:
                yield from s.walk()

    def cost(self) -> tuple[int, int]:
        """(parameters, MACs) of this step and every step nested in it, in one pass."""
        return steps_cost([self])

    def own_params(self) -> int:
        return 0

    def own_macs(self) -> int:
        return 0

    def own_cost(self) -> tuple[int, int]:
        return self.own_params(), self.own_macs()

    @property
    def params(self) -> int:
        return self.cost()[0]

    @property
    def macs(self) -> int:
        return self.cost()[1]


def steps_cost(steps: list) -> tuple[int, int]:
    """(parameters, MACs) of `steps` and everything nested in them (`own_params`, `own_macs`): per
    step the sum over `walk()` in its order, then the sum of those, as `sum(s.params for s in steps)`.
    The hot path of a check, which counts every plan twice: an op step's kept counts are read here
    directly (`OpStep.op_counts`, inlined) and the plain steps' classes are dispatched on, which
    has neither counts nor children of their own (saves, loads, conversions) or only children."""
    params = macs = 0
    for top in steps:
        p = m = 0
        todo = [top]
        while todo:
            s = todo.pop()
            cls = s.__class__
            if cls is OpStep:
                d = s.__dict__
                kept = d.get("_counts")
                if kept is not None and kept[0] is d["op"] and kept[1] is d["x"] and kept[2] is d["y"]:
                    p += kept[3] - d["tied"]
                    m += kept[4] * d["batch"]
                else:  # `own_cost`, inlined
                    sp, sm = s.op_counts()
                    p += sp - d["tied"]
                    m += sm * d["batch"]
                continue
            elif cls is SeqStep:
                todo += reversed(s.body)
                continue
            elif cls is ResidualStep:  # children (shortcut, body): the shortcut popped first
                todo += reversed(s.body)
                todo += reversed(s.shortcut)
                continue
            elif cls in _NO_COUNTS:
                continue
            sp, sm = s.own_cost()
            p += sp
            m += sm
            kids = s.children()
            if kids:  # pushed last to first: popped in walk() order
                for nested in reversed(kids):
                    todo += reversed(nested)
        params += p
        macs += m
    return params, macs


# OpStep keeps its op's counts beside its fields (`_counts`, valid while op, x and y are the
# same objects): a replayed block's steps are copies carrying them, and a plan's counts are read
# more than once (the size check of lowering, then the caller). COUNTS_KEPT = False computes every
# count afresh (tests/test_speed_invariants.py: the same counts).
COUNTS_KEPT = True


@dataclass
class OpStep(Step):
    """One op, a module at `path` (its last part is `name`)."""

    name: str
    op: object
    batch: int = 1  # sequences per image inside patches_to_batch ... batch_to_patches: multiplies the MACs
    tied: int = 0  # parameters of this op owned by an earlier op with the same tie key (`Op.tie_key`)
    kind: ClassVar[str] = "op"

    def own_params(self) -> int:
        return self.op_counts()[0] - self.tied

    def own_macs(self) -> int:
        return self.op_counts()[1] * self.batch

    def own_cost(self) -> tuple[int, int]:
        params, macs = self.op_counts()
        return params - self.tied, macs * self.batch

    def op_counts(self) -> tuple[int, int]:
        """(op.params(x, y), op.macs(x, y)), kept with the step while its op and shapes stay."""
        op, x, y = self.op, self.x, self.y
        kept = self.__dict__.get("_counts")
        if kept is not None and kept[0] is op and kept[1] is x and kept[2] is y:
            return kept[3], kept[4]
        params, macs = op.params(x, y), op.macs(x, y)
        if COUNTS_KEPT:
            self.__dict__["_counts"] = (op, x, y, params, macs)
        return params, macs


@dataclass
class SeqStep(Step):
    """A composite (block or mixer) instance: a module of its own, named `name`, called as `call`."""

    name: str
    body: list
    call: str = ""
    kind: ClassVar[str] = "seq"

    def children(self) -> tuple:
        return (self.body,)


@dataclass
class ConvertStep(Step):
    """A layout change inserted by lowering: `to_tokens` (map -> tokens) or `to_map` (back to `y`'s grid)."""

    name: str
    kind: ClassVar[str] = "convert"


@dataclass
class ResidualStep(Step):
    body: list
    shortcut: list
    drop_path: float = 0.0
    kind: ClassVar[str] = "residual"

    def children(self) -> tuple:
        return (self.shortcut, self.body)


@dataclass
class ParallelStep(Step):
    merge: str  # concat, tokens, add, sub, mul, mean
    branches: list
    split: list | None = None  # channels per branch, when the input is split among them
    kind: ClassVar[str] = "parallel"

    def children(self) -> tuple:
        return tuple(self.branches)


@dataclass
class SaveStep(Step):
    """`save tensor`: keep the flowing tensor under a name."""

    tensor: str
    kind: ClassVar[str] = "save"


@dataclass
class LoadStep(Step):
    """`from tensor`: continue from a saved tensor."""

    tensor: str
    kind: ClassVar[str] = "load"


@dataclass
class ReuseStep(Step):
    """`reuse target`: the module at that path applied again; `reused` are its steps lowered at this
    input, which count MACs here but no parameters (the weights are the target's)."""

    target: str
    reused: list
    kind: ClassVar[str] = "reuse"

    def own_macs(self) -> int:
        return sum(r.macs for r in self.reused)


@dataclass
class Section:
    """stem, a stage's downsample or block, or head: the unit the builder makes one module of."""

    path: str
    steps: list
    x: Shape
    y: Shape
    drop_path: float = 0.0
    call: str = ""
    span: Span | None = None  # a stage block's: where it is written (its `repeat` or `block`)

    def cost(self) -> tuple[int, int]:
        """(parameters, MACs) of the section, in one pass. Kept beside it while `steps` is the
        same list (lowering makes a section whole, and head edits make new ones): a plan is counted
        by its lowering's size check and again by its caller."""
        kept = self.__dict__.get("_cost")
        if kept is not None and kept[0] is self.steps:
            return kept[1]
        return self.keep_cost(steps_cost(self.steps))

    def keep_cost(self, counts: tuple[int, int]) -> tuple[int, int]:
        """Keep `counts` as this section's (a replayed block's are its original's)."""
        if COUNTS_KEPT:
            self.__dict__["_cost"] = (self.steps, counts)
        return counts

    @property
    def params(self) -> int:
        return self.cost()[0]

    @property
    def macs(self) -> int:
        return self.cost()[1]


@dataclass
class StagePlan:
    index: int
    downsample: Section | None
    downsample_last: bool
    blocks: list
    x: Shape
    y: Shape
    norm: Section | None = None


@dataclass
class Plan:
    """A planned model: its sections of steps, and what consumers need of the resolved model."""

    name: str
    file: str
    input: Shape
    input_kind: str  # image, signal, ...
    stem: Section
    stages: list
    head: Section
    arguments: dict = field(default_factory=dict)  # the model's parameter values (name -> value)
    chain: list = field(default_factory=list)  # the model's name, then its base's, up to the root
    overrides: list = field(default_factory=list)  # (parameter name, span) a variant overrides
    drop_path: list = field(default_factory=list)  # the drop-path rate of every block, in order
    outputs: list | None = None  # names of saved tensors that features_only returns
    features: str = "stages"  # feature points of features_only: every stage's output, or every block's
    loss: object = None  # the training objective the blueprint names, a kind="loss" op
    reference: str | None = None
    paper: str | None = None
    doc: str = ""
    span: Span | None = None
    saved: dict = field(default_factory=dict)  # tensor name -> its Shape, of every `save` (and "input")
    preprocess: dict = field(default_factory=dict)  # mean, std, crop_pct, interpolation the blueprint gives
    head_edits: dict = field(default_factory=dict)  # timm's drop_rate / global_pool applied (head_edits.py)
    # the resolved model lowered into this plan, kept only to plan it again at another input size
    # (composer.sizes); consumers read the plan's own fields
    source: object = field(default=None, repr=False, compare=False)

    @property
    def graph(self):
        """The networkx DiGraph of the plan (`to_networkx`), derived on each use."""
        return self.to_networkx()

    def to_networkx(self):
        """The plan as a networkx DiGraph (networkx is imported here only: `composer check` stays
        fast). Nodes: `input`, every op at its path (kind op, op name, x, y), a merge node per
        residual (`PATH.add@LINE:COL`) and parallel (`PATH.MERGE@LINE:COL`), one per `reuse`
        (`PATH.reuse@LINE:COL`). A `from` continues from the node where its tensor was saved;
        layout conversions, saves and composite instances add no node."""
        import networkx as nx

        g = nx.DiGraph()
        g.add_node("input", kind="input", shape=self.input)
        flow = _Flow(g)
        for sec in self.sections:
            flow.steps(sec.steps)
        return g

    @property
    def sections(self):
        yield self.stem
        for st in self.stages:
            if st.downsample is not None and not st.downsample_last:
                yield st.downsample
            yield from st.blocks
            if st.downsample is not None and st.downsample_last:
                yield st.downsample
            if st.norm is not None:
                yield st.norm
        yield self.head

    def cost(self) -> tuple[int, int]:
        """(parameters, MACs) of the whole model, in one pass."""
        params = macs = 0
        for sec in self.sections:
            p, m = sec.cost()
            params += p
            macs += m
        return params, macs

    @property
    def params(self) -> int:
        return self.cost()[0]

    @property
    def macs(self) -> int:
        return self.cost()[1]


class _Flow:
    """Walks steps in order, adding the nodes and edges of `Plan.to_networkx` to `g`."""

    def __init__(self, g, saved: dict | None = None):
        self.g = g
        self.last = "input"
        self.saved = {"input": "input"} if saved is None else saved  # tensor name -> the node that made it

    def node(self, name: str, ends: list, **attrs) -> None:
        self.g.add_node(name, **attrs)
        for e in ends:
            self.g.add_edge(e, name)
        self.last = name

    def steps(self, steps: list) -> None:
        for s in steps:
            cls = s.__class__
            if cls is OpStep:
                self.node(s.path, [self.last], kind="op", op=s.op.name, x=s.x, y=s.y)
            elif cls is SeqStep:
                self.steps(s.body)
            elif cls is ResidualStep:
                start = self.last
                self.steps(s.shortcut)
                short_end, self.last = self.last, start
                self.steps(s.body)
                self.node(merge_node(s, "add"), [self.last, short_end], kind="merge", merge="add", y=s.y)
            elif cls is ParallelStep:
                start, ends = self.last, []
                for b in s.branches:
                    self.last = start
                    self.steps(b)
                    ends.append(self.last)
                self.node(merge_node(s, s.merge), ends, kind="merge", merge=s.merge, y=s.y)
            elif cls is SaveStep:
                self.saved[s.tensor] = self.last
            elif cls is LoadStep:
                self.last = self.saved[s.tensor]
            elif cls is ReuseStep:
                # the target's steps form a graph of their own, left out; their saves still count
                _Flow(type(self.g)(), self.saved).steps(s.reused)
                self.node(merge_node(s, "reuse"), [self.last], kind="reuse", op=f"reuse {s.target}", x=s.x, y=s.y)


# steps with no parameters, MACs or children of their own (`steps_cost` skips them)
_NO_COUNTS = frozenset({SaveStep, LoadStep, ConvertStep})


def merge_node(step: Step, what: str) -> str:
    """The name of the graph node a residual's add, a parallel's merge or a reuse makes: unique, as
    a residual shares its path with its block (`PATH.WHAT@LINE:COL`)."""
    return f"{step.path}.{what}@{step.span.line}:{step.span.column}"
