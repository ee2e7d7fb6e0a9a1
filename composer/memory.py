"""How much memory building a planned model takes, estimated from the plan alone (no torch), and
the check that refuses a model over a limit before anything is allocated.

The estimate is the sum of three terms:

- parameters: `Plan.params` elements, 4 bytes each (float32);
- buffers: what every op says its module registers (`Op.buffer_elements`: relative position
  index tables, shift masks, neighbourhood indexes, fixed sin-cos tables), counted at 8 bytes an
  element (index tables are int64; float buffers are counted at the same bound);
- the largest activation: the largest tensor one step of the plan gives (or the input), times the
  batch of the forward pass (`composer build` runs one at batch 1), 4 bytes an element.

The default limit is a fraction (`DEFAULT_FRACTION`) of the memory available now (MemAvailable of
/proc/meminfo, else the free pages of `os.sysconf`, else `FALLBACK_BYTES`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .diagnostics import error
from .plan import OpStep, Plan, ReuseStep

DEFAULT_FRACTION = 0.8
FALLBACK_BYTES = 8 << 30  # when the available memory cannot be read
PARAM_BYTES, BUFFER_BYTES, ACTIVATION_BYTES = 4, 8, 4
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Estimate:
    """Elements of parameters, buffers and the largest activation (at `batch`), and where the
    largest buffer and activation are (a step, or None)."""

    params: int
    buffers: int
    activation: int
    batch: int = 1
    buffer_step: object = None
    activation_step: object = None

    @property
    def bytes(self) -> int:
        return self.params * PARAM_BYTES + self.buffers * BUFFER_BYTES + self.activation * ACTIVATION_BYTES

    def render(self) -> str:
        return (f"memory: about {show_bytes(self.bytes)} to build and run at batch {self.batch}: parameters "
                f"{self.params:,} ({show_bytes(self.params * PARAM_BYTES)}), buffers {self.buffers:,} "
                f"({show_bytes(self.buffers * BUFFER_BYTES)}), largest activation {self.activation:,} "
                f"({show_bytes(self.activation * ACTIVATION_BYTES)})")


def show_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def parse_size(text) -> int:
    """Bytes from `8G`, `512M`, `1.5T`, `8GiB`, `100000` (binary units: G = 2^30); a ComposerError
    (usage) for anything else or a size not above zero."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if m is None:
            raise error("usage", f"--max-memory expects a size such as 8G, 512M or 1.5T, got '{text}'", None,
                        "units K, M, G, T are powers of 1024; a plain number is bytes")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value > 0 or value > 1 << 70:
        raise error("usage", f"--max-memory must be a size above zero (and below 1 ZiB), got '{text}'")
    return int(value)


def available_bytes() -> int:
    """The memory available now: MemAvailable of /proc/meminfo, else `os.sysconf`'s free pages,
    else `FALLBACK_BYTES`."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return FALLBACK_BYTES


def default_limit() -> int:
    return int(available_bytes() * DEFAULT_FRACTION)


def _steps(steps, reused: bool = False):
    """(step, whether it runs a module that an earlier step made: `reuse`) of every step."""
    for s in steps:
        for t in s.walk():
            yield t, reused
            if t.__class__ is ReuseStep:
                yield from _steps(t.reused, True)


def _folded(step: OpStep) -> int:
    """The sequences per image an op runs on (inside patches_to_batch): its `batch`, less the heads
    factor lowering puts there for the MACs of a per-head op (`Shape.numel` counts the heads)."""
    per_head = step.x.heads and step.op.layout == "any" and step.op.per_head
    return step.batch // step.x.heads if per_head else step.batch


def estimate(plan: Plan, batch: int = 1) -> Estimate:
    """The memory `plan` takes built and run once at `batch` (see the module docstring)."""
    buffers, top_buffer, top_step = 0, 0, None
    activation, act_step = plan.input.numel, None
    for sec in plan.sections:
        for s, reused in _steps(sec.steps):
            n = s.y.numel * (_folded(s) if s.__class__ is OpStep else 1)
            if n > activation:
                activation, act_step = n, s
            if s.__class__ is OpStep and not reused:  # one module, whatever the batch it runs on, however often
                b = s.op.buffer_elements(s.x, s.y)
                buffers += b
                if b > top_buffer:
                    top_buffer, top_step = b, s
    return Estimate(plan.params, buffers, activation * batch, batch, top_step, act_step)


def check_memory(plan: Plan, max_memory=None, batch: int = 1) -> Estimate:
    """The estimate of `plan`, or a located error (the model's span) when it is over `max_memory`
    (bytes, or a size such as "8G"; None: the default limit, a fraction of the available memory)."""
    limit = default_limit() if max_memory is None else parse_size(max_memory)
    est = estimate(plan, batch)
    if est.bytes <= limit:
        return est
    origin = "--max-memory" if max_memory is not None else \
        f"{DEFAULT_FRACTION:.0%} of the {show_bytes(available_bytes())} available"
    exc = error("too-large", f"{plan.name} needs about {show_bytes(est.bytes)} to build and run at batch {batch}, "
                f"over the limit of {show_bytes(limit)} ({origin}); refusing to allocate it", plan.span,
                "make the model or its input smaller, or raise the limit with --max-memory (Python: "
                "max_memory=...); `composer info` shows the estimate and allocates nothing")
    notes = exc.diagnostics[0].notes
    notes.append(est.render())
    for what, step in (("the largest buffer", est.buffer_step), ("the largest activation", est.activation_step)):
        if step is not None:
            notes.append(f"{what}: {step.path} at {step.span}" if step.span else f"{what}: {step.path}")
    raise exc
