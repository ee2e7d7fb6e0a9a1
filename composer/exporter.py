"""Export a built model to ONNX (torch.onnx's dynamo exporter, run back with onnxruntime), to a
torch.export program (`.pt2`, loaded back with torch.export.load) or to a standalone PyTorch file
(`.py`, composer/codegen.py: imported back, given the model's state_dict), each checked against the eager
model on a fixed random input before it is written: a file whose outputs differ from eager by more
than the tolerance is refused (a ComposerError, exit 2) and nothing is written. The file is
written atomically (composer.files), and the check runs on the very file written (its temporary
copy), so what lands at the path is what was checked.

`dynamic=True` exports one program for every batch size and, along each spatial axis whose
admitted sizes are regular (composer.sizes: "multiples of 32 from 32"), every admitted size from
twice the step; the program is then also checked at a second batch and size."""

from __future__ import annotations

import importlib.util
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .diagnostics import error
from .files import check_writable, write_atomic

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "python": ".py"}
TOLERANCE = 1e-4  # the largest difference, relative to max(1, max |eager output|)
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


@dataclass
class Exported:
    """What `export` wrote: the file, its format, the largest difference from eager at each checked
    input shape, and which input axes the program leaves free."""

    path: Path
    to: str
    checked: list = field(default_factory=list)  # (input shape, largest difference), one per check
    dynamic: list = field(default_factory=list)  # words per free axis, e.g. "H: multiples of 32 from 64"

    @property
    def max_diff(self) -> float:
        return max((d for _, d in self.checked), default=0.0)

    def render(self) -> str:
        checks = "; ".join(f"{'x'.join(map(str, s))}: {d:.2g}" for s, d in self.checked)
        free = f"\ndynamic: {', '.join(self.dynamic)}" if self.dynamic else ""
        return f"checked against eager (largest difference {checks}){free}\nwrote {self.path}"


def require_onnx() -> None:
    """A user error naming the missing packages when the ONNX toolchain is not installed."""
    missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise error("missing-dependency", f"ONNX export needs {', '.join(missing)} (not installed)", None,
                    'pip install "arch-composer[export]" (onnx, onnxscript and onnxruntime)')


def export(model, to: str, path=None, *, img_size=None, dynamic: bool = False, tolerance: float = TOLERANCE,
           input_size=None, batch: int = 2, build=None, **overrides) -> Exported:
    """Export `model` (a built ComposedModel, or a target composer.build takes: a zoo name,
    FILE[:MODEL] or a saved folder, with `img_size` and `overrides`) to `to` ("onnx", "pt2" or
    "python") at `path` (default: MODEL.onnx / MODEL.pt2 / MODEL.py here). `input_size` (C, *spatial)
    for a module without a
    blueprint. Refused (ComposerError, nothing written) when the file's outputs differ from eager by
    more than `tolerance` relative to max(1, max |eager|). `build`: composer.build, for a target
    (composer.export passes it; this module does not import the API)."""
    if to not in FORMATS:
        raise error("usage", f"cannot export to '{to}'", None, "formats: " + ", ".join(FORMATS))
    if not tolerance >= 0:
        raise error("usage", f"the tolerance must be a number >= 0, got {tolerance}")
    if to == "onnx":
        require_onnx()
    if isinstance(model, (str, Path)):
        name = Path(str(model)).name.split(":")[-1] if Path(str(model)).is_dir() else str(model).split(":")[-1]
        name = Path(name).stem if name.endswith((".arch", ".yaml", ".yml")) else name
        path = Path(path) if path is not None else Path(name + FORMATS[to])
        check_writable(path)  # before the build
        if img_size is not None:
            overrides["img_size"] = img_size
        model = build(str(model), **overrides)
    else:
        plan = getattr(model, "plan", None)
        path = Path(path) if path is not None else Path((plan.name if plan is not None else "model") + FORMATS[to])
        check_writable(path)
        if overrides:
            raise error("usage", f"overrides ({', '.join(overrides)}) need a blueprint target, not a built model")
    shape = _example_shape(model, img_size, input_size)
    was_training = model.training
    model.eval()
    try:
        return _export(model, to, Path(path), shape, dynamic, tolerance, batch)
    finally:
        model.train(was_training)


def _example_shape(model, img_size, input_size) -> tuple:
    if input_size is not None:
        return tuple(input_size)
    plan = getattr(model, "plan", None)
    if plan is None:
        raise error("usage", "this module has no blueprint: give input_size=(C, H, W)")
    spatial = tuple(plan.input.spatial)
    if img_size is not None and "img_size" not in plan.arguments:  # a built model: another admitted size
        spatial = (img_size,) * len(spatial) if isinstance(img_size, int) else tuple(img_size)
    return (plan.input.channels, *spatial)


def _export(model, to, path, shape, dynamic, tolerance, batch) -> Exported:
    if to == "python":
        return _export_python(model, path, shape, dynamic, tolerance, batch)
    gen = torch.Generator().manual_seed(0)
    first = next(model.parameters(), None)  # the inputs on the model's device, in its dtype
    like = dict(device=first.device, dtype=first.dtype) if first is not None and first.is_floating_point() else {}
    x = torch.randn(batch, *shape, generator=gen).to(**like)
    checks = [x]
    spec, words = None, []
    if dynamic:
        spec, words, other = dynamic_shapes(model, shape)
        checks.append(torch.randn(batch + 1, *shape[:1], *other, generator=gen).to(**like))
    with torch.no_grad():
        expected = [flatten(model(c)) for c in checks]
    try:
        if to == "onnx":
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=spec, verbose=False)
        else:
            program = torch.export.export(model, (x,), dynamic_shapes=spec)
    except Exception as exc:  # the exporter's own refusal: its first line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error("export-failed", f"cannot export {_name(model)} to {to}: {first}", None,
                    "without --dynamic the program is traced at one size" if dynamic else None) from None
    result = Exported(path, to, dynamic=words)

    def write_and_check(tmp):
        if to == "onnx":
            program.save(tmp, external_data=False)
        else:  # torch.export.save names files by suffix: through a buffer into the temporary file
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
            Path(tmp).write_bytes(buffer.getvalue())
        for c, want, got in zip(checks, expected, run_exported(to, tmp, checks)):
            diff = largest_difference(want, got)
            result.checked.append((tuple(c.shape), diff))
            if not diff <= tolerance:
                raise error("export-mismatch", f"not written: {path} would differ from the eager model by {diff:.3g} "
                            f"at input {'x'.join(map(str, c.shape))} (tolerance {tolerance:g}, relative to "
                            "max(1, max |eager output|))", None,
                            "report it with the model's name; a looser --tolerance writes it anyway")

    write_atomic(path, writer=write_and_check)
    return result


def _export_python(model, path, shape, dynamic: bool, tolerance: float, batch: int):
    """Write `model` (a built ComposedModel) as a standalone file at `path`, checked before it lands:
    the file is imported, given the model's state_dict (strict: the same keys) and run on a fixed
    random input (with `dynamic`, also at another batch and an admitted size); refused when the
    logits differ by more than `tolerance` relative to max(1, max |logit|)."""
    from .codegen import generate
    from .codegen_file import load_source

    plan = getattr(model, "plan", None)
    if plan is None:
        raise error("usage", "only a model composer built (with its blueprint) can be written as Python")
    dyn = bool(getattr(model, "dynamic_img_size", False))
    text = generate(plan, dynamic_img_size=dyn)
    gen = torch.Generator().manual_seed(0)
    first = next(model.parameters(), None)
    like = dict(device=first.device, dtype=first.dtype) if first is not None and first.is_floating_point() else {}
    checks = [torch.randn(batch, *shape, generator=gen).to(**like)]
    if dynamic:
        from .sizes import admits

        other = next((s for d in (32, 16, 8) if admits(plan, s := tuple(n + d for n in shape[1:]), dyn) is None), None)
        checks.append(torch.randn(batch + 1, shape[0], *(other or shape[1:]), generator=gen).to(**like))
    result = Exported(Path(path), "python", dynamic=["batch", "every admitted size (grids follow the input)"])

    def write_and_check(tmp):
        Path(tmp).write_text(text, encoding="utf-8")
        exported = load_source(Path(tmp).read_text(encoding="utf-8"), plan.name)()
        try:
            exported.load_state_dict(model.state_dict(), strict=True)
        except RuntimeError as exc:
            raise error("export-mismatch", f"not written: the model's state_dict does not match its blueprint's "
                        f"({str(exc).splitlines()[0]})", None,
                        "export the model as built (before fuse() or edits), or export its blueprint") from None
        exported.to(**like).eval()
        with torch.no_grad():
            for x in checks:
                diff = largest_difference(flatten(model(x)), flatten(exported(x)))
                result.checked.append((tuple(x.shape), diff))
                if not diff <= tolerance:
                    raise error("export-mismatch", f"not written: {path} would differ from the built model by "
                                f"{diff:.3g} at input {'x'.join(map(str, x.shape))} (tolerance {tolerance:g})", None,
                                "report it with the model's name; a looser --tolerance writes it anyway")

    write_atomic(Path(path), writer=write_and_check)
    return result


def dynamic_shapes(model, shape) -> tuple:
    """(the exporter's dynamic_shapes for the input, words per free axis, a second admitted spatial
    size to check at). Batch is always free; a spatial axis is free when its admitted sizes are
    regular, from twice the step (the exporter specialises a size of 1)."""
    from torch.export import Dim

    from .sizes import axis_rules

    plan = getattr(model, "plan", None)
    spatial = list(shape[1:])
    rules = axis_rules(plan, bool(getattr(model, "dynamic_img_size", False))) if plan is not None else []
    axes = {0: Dim("batch", min=1)}
    words, other = ["batch"], list(spatial)
    names = ["H", "W"] if len(spatial) == 2 else [f"axis{a}" for a in range(len(spatial))]
    reduction = max([int(f.get("reduction") or 1) for f in getattr(model, "feature_info", None) or []] or [1])
    for a, rule in enumerate(rules):
        step = math.lcm(rule.step, reduction)  # the exporter proves its shape rules for whole output grids
        if rule.fixed or rule.irregular or rule.high or rule.low % rule.step or rule.build % step:
            continue
        low = max(-(-rule.low // step), 2)
        if rule.build // step < low:
            continue
        axes[a + 2] = step * Dim(names[a], min=low) if step > 1 else Dim(names[a], min=low)
        words.append(f"{names[a]}: multiples of {step} from {low * step}")
        other[a] = spatial[a] + step
    return ({"x": axes} if plan is not None else (axes,)), words, other


def run_exported(to: str, path, inputs: list) -> list:
    """Run the exported file at `path` on each input: onnxruntime for ONNX, torch.export.load for
    pt2. Returns, per input, its outputs as a flat list of tensors."""
    if to == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return [[torch.from_numpy(o).to(x.device) for o in session.run(None, {name: x.detach().cpu().float().numpy()})]
                for x in inputs]
    program = torch.export.load(io.BytesIO(Path(path).read_bytes())).module()
    with torch.no_grad():
        return [flatten(program(x)) for x in inputs]


def flatten(out) -> list:
    """Every tensor of a model's output (a tensor, or lists, tuples and dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten(v)]
    return []


def largest_difference(want: list, got: list) -> float:
    """The largest absolute difference over every output, relative to max(1, max |want|); inf when
    the outputs differ in number or shape."""
    if len(want) != len(got) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(want, got)):
        return float("inf")
    diff = 0.0
    for a, b in zip(want, got):
        if a.numel():
            scale = max(1.0, a.abs().max().item())
            diff = max(diff, (a.float() - b.float()).abs().max().item() / scale)
    return diff


def _name(model) -> str:
    plan = getattr(model, "plan", None)
    return plan.name if plan is not None else type(model).__name__
