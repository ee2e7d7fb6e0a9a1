"""The resolved architecture: what `resolve` gives and lowering (`lower`) reads. Nothing symbolic
is left: every value is concrete, every op a validated instance, every layer named."""

from __future__ import annotations

from dataclasses import dataclass, field

from .expr import InputSpec
from .ops import Op
from .source import Span



@dataclass
class OpNode:
    name: str
    op: Op
    span: Span


@dataclass
class SubSeq:
    """A composite (block or mixer) instance: its own naming scope, e.g. `token_mixer.qkv`."""

    name: str
    kind: str
    items: list
    span: Span
    call: str = ""


@dataclass
class ResidualNode:
    body: list
    shortcut: list
    drop_path: float
    span: Span


@dataclass
class ParallelNode:
    merge: str
    branches: list
    split: list | None
    span: Span


@dataclass
class NamedTensor:
    """`save name` (store) or `from name` (load) in a body."""

    action: str  # "save" or "load"
    tensor: str
    span: Span


@dataclass
class ReuseNode:
    """`reuse PATH`: the module at that state_dict path, applied again (weights stored once)."""

    path: str
    span: Span


@dataclass
class Block:
    items: list
    drop_path: float
    index: int
    span: Span
    call: str


@dataclass
class Stage:
    index: int
    downsample: list | None
    downsample_last: bool
    blocks: list
    span: Span
    norm: list | None = None


@dataclass
class Model:
    name: str
    file: str
    input: InputSpec
    stem: list
    stages: list
    head: list
    drop_path: list
    params: dict
    overrides: list
    reference: str | None = None
    paper: str | None = None
    doc: str = ""
    span: Span | None = None
    outputs: list | None = None  # names of saved tensors that features_only returns
    features: str = "stages"  # feature points of features_only: every stage's output, or every block's
    loss: Op | None = None  # the training objective the blueprint names (`loss = focal(...)`), a kind="loss" op
    chain: list = field(default_factory=list)  # the model's name, then its base's, up to the root of the chain
    outputs_spans: list = field(default_factory=list)  # where each name of `outputs` is written
    preprocess: dict = field(default_factory=dict)  # timm's data config the blueprint gives (composer/preprocess.py)
