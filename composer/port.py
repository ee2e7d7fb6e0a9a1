"""Weight porting: load a reference implementation's state_dict (timm's) into a composed model.

The mapping is data, declared next to each family blueprint as `<family>.port.yaml` (the format
is in docs/porting.md; read by composer/port_mapping.py). Rename rules map OUR key to the
REFERENCE key (`{ours: REGEX, ref: REPL}`, applied in order, each with `re.sub`), so every key of
our model names the one tensor that feeds it. Split rules cut a fused reference tensor into named
parts first; tensors whose numel matches are reshaped (a 1x1 conv <-> a linear); join rules (the
inverse of a split) concatenate several reference tensors into the one tensor of ours they feed;
the classifier is skipped when `num_classes` differs (timm's rule) and the input conv is adapted
to `in_chans` (timm's `adapt_input_conv`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .diagnostics import error
from .plan import OpStep
from .port_mapping import (SOURCES, Join, Mapping, Reorder, Rule, Split, mapping_error,  # noqa: F401
                           mapping_path, read_mapping)  # SOURCES, Reorder, Rule: `composer.port`'s names too
from .port_order import keeps_axis_order, refuse_reorders, rule_to_write
from .port_report import PortReport
from .port_verify import DEFAULT_TOLERANCE, compare_outputs, refuse_disagreement, timm_reference


# ------------------------------------------------------------------------------------------------ the port
def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """timm's rule: one channel sums the RGB filters; other counts repeat them, scaled by 3/in_chans."""
    dtype, w = weight.dtype, weight.float()
    out, have = w.shape[:2]
    if in_chans == 1:
        if have > 3:
            w = w.reshape(out, have // 3, 3, *w.shape[2:]).sum(dim=2)
        else:
            w = w.sum(dim=1, keepdim=True)
    elif in_chans != have:
        repeat = math.ceil(in_chans / have)
        w = w.repeat(1, repeat, *[1] * (w.ndim - 2))[:, :in_chans] * (have / float(in_chans))
    return w.to(dtype)


def _collision(path, what: str, made: str, key: str, other: str):
    return mapping_error(path, f"{what} makes '{made}' from '{key}', but '{made}' is already {other}",
                "anchor the pattern so that it matches only the fused tensors (e.g. '\\.qkv\\.weight$'), "
                "or name the parts apart")


def _split_source(state: dict, splits: list[Split], path: str = "<mapping>") -> tuple[dict, dict]:
    """Reference tensors with fused ones cut into their named parts -> (tensors, part -> fused key).
    A part named like another reference tensor or another part is an error (nothing overwritten)."""
    out, origin = dict(state), {}
    for key, value in state.items():
        for s in splits:
            m = s.pattern.search(key)
            if not m:
                continue
            total = sum(s.sizes)
            n = value.shape[s.dim]
            if n % total:
                raise error("port-mapping", f"split '{s.pattern.pattern}': {key} has {n} along dim {s.dim}, not a "
                            f"multiple of {total} (sizes {s.sizes})")
            parts = torch.split(value, [n // total * k for k in s.sizes], dim=s.dim)
            del out[key]
            for name, part in zip(s.into, parts):
                part_key = key[:m.start()] + m.expand(name) + key[m.end():]
                if part_key in origin:
                    raise _collision(path, f"split '{s.pattern.pattern}'", part_key, key,
                                     f"a part of '{origin[part_key]}'")
                if part_key in state:
                    raise _collision(path, f"split '{s.pattern.pattern}'", part_key, key,
                                     "the tensor it cuts" if part_key == key else "a checkpoint tensor")
                out[part_key] = part
                origin[part_key] = key
            break
    return out, origin


def _join_source(state: dict, joins: list[Join], path: str = "<mapping>") -> tuple[dict, dict]:
    """Reference tensors with the parts of each join concatenated -> (tensors, joined key -> part keys).
    A joined name that another tensor has is an error (nothing overwritten)."""
    out, parts_of = dict(state), {}
    for j in joins:
        found = []                                   # per part: {(text before, text after): (key, match)}
        for pat in j.parts:
            hits = {}
            for key in out:
                m = pat.search(key)
                if m:
                    hits[(key[:m.start()], key[m.end():])] = (key, m)
            found.append(hits)
        for around, (key0, m0) in found[0].items():
            if not all(around in hits for hits in found[1:]):
                continue
            keys = [hits[around][0] for hits in found]
            try:
                value = torch.cat([out[k] for k in keys], dim=j.dim)
            except RuntimeError as exc:
                raise error("port-mapping", f"join {[p.pattern for p in j.parts]}: cannot concatenate "
                            f"{', '.join(keys)} along dim {j.dim}: {exc}") from None
            joined = around[0] + m0.expand(j.into) + around[1]
            if joined in out and joined not in keys:
                raise _collision(path, f"join {[p.pattern for p in j.parts]}", joined, " + ".join(keys),
                                 "a checkpoint tensor" if joined not in parts_of else "another join's result")
            if len(set(keys)) < len(keys):
                raise mapping_error(path, f"join {[p.pattern for p in j.parts]}: two of its patterns match the same tensor "
                           f"'{keys[0]}'", "make each pattern match one part")
            for k in keys:
                del out[k]
            out[joined] = value
            parts_of[joined] = [p for k in keys for p in parts_of.pop(k, [k])]
    return out, parts_of


def _head_keys(model) -> tuple[set[str], set[str]]:
    """Our full model's head keys and its classifier keys (computed on the meta device, so they are
    known for a features_only model, which has no head)."""
    from .builder import build_module

    full = model if not model.features_only else build_module(model.plan, seed=None, device="meta")
    head = {k for k in full.state_dict() if k.startswith("head.")}
    cls = set()
    for name in _classifier_names(model.plan.head.steps):
        keys = {k for k in head if k.startswith(f"head.{name}.")}
        cls |= keys or {f"head.{name}.weight", f"head.{name}.bias"}  # num_classes = 0: the keys it would have
    return head, cls


def _classifier_names(steps):
    """The names of the classifier ops of a section (inside its residuals and branches too)."""
    for s in steps:
        if s.__class__ is OpStep and getattr(s.op, "classifier", False):
            yield s.name
        for sub in s.children():
            yield from _classifier_names(sub)


def port(model, state_dict: dict, mapping=None, *, strict: bool = True, source_name: str | None = None) -> PortReport:
    """Map `state_dict` (the reference's) onto `model` with `mapping` (a Mapping, a dict, a path, or
    None for the `.port.yaml` next to the model's blueprint) and load it. With `strict`, anything
    unaccounted for (missing, unexpected, a shape that cannot be reconciled) raises a ComposerError
    before any weight is changed."""
    plan = model.plan
    ref_name = source_name or (plan.reference or "")
    ref_name = ref_name.split(":", 1)[-1].split(".", 1)[0]
    if not isinstance(mapping, Mapping):
        if mapping is None:
            mapping = mapping_path(model)
            if not mapping.is_file():
                raise error("port-mapping", f"no port mapping for {plan.name}: {mapping} does not exist",
                            None, "declare the rename rules in that file (see docs/porting.md)")
        mapping = read_mapping(mapping, (plan.name, ref_name))
    report = PortReport(plan.name, f"{mapping.source}:{ref_name}" if ref_name else mapping.source)

    state = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    for k in list(state):
        if any(p.search(k) for p in mapping.ignore):
            report.ignored.append(k)
            del state[k]
    source, origin = _split_source(state, mapping.splits, mapping.path)
    source, joined_from = _join_source(source, mapping.joins, mapping.path)
    used: set[str] = set()

    ours = model.state_dict()
    head_keys, cls_keys = _head_keys(model)
    in_chans = model.plan.input.channels
    new = {}
    for key, target in ours.items():
        ref = mapping.our_to_ref(key)
        if ref not in source:
            report.missing.append((key, ref))
            continue
        value = source[ref]
        used.add(ref)
        if key in cls_keys and value.shape != target.shape:
            report.skipped.append((key, f"classifier: checkpoint {list(value.shape)}, model {list(target.shape)}; "
                                       "left as initialised"))
            continue
        rule = mapping.reorder(ref)
        if rule is not None:
            value = _reordered(mapping, rule, key, ref, value, target, report)
            if value is None:
                continue
        elif value.shape == target.shape and ref in joined_from:
            report.joined.append((key, joined_from[ref]))
        elif value.shape == target.shape:
            (report.split if ref in origin else report.matched).append((key, origin.get(ref, ref)))
        elif (key.startswith("stem.") and value.ndim == target.ndim >= 3 and value.shape[0] == target.shape[0]
              and value.shape[2:] == target.shape[2:] and target.shape[1] == in_chans):
            value = adapt_input_conv(in_chans, value)
            report.adapted.append((key, ref, f"in_chans {source[ref].shape[1]} -> {in_chans}"))
        elif mapping.reshape and value.numel() == target.numel() and keeps_axis_order(value.shape, target.shape):
            report.reshaped.append((key, ref, tuple(value.shape), tuple(target.shape)))
            value = value.reshape(target.shape)
        elif mapping.reshape and value.numel() == target.numel():
            report.reordered.append((key, ref, tuple(target.shape), tuple(value.shape),
                                     rule_to_write(ref, tuple(value.shape), tuple(target.shape))))
            continue
        else:
            report.mismatched.append((key, ref, tuple(target.shape), tuple(value.shape)))
            continue
        new[key] = value

    # reference tensors no key of ours used: the head a features_only / num_classes=0 model lacks is skipped
    absent = {mapping.our_to_ref(k): k for k in (head_keys | cls_keys) if k not in ours}
    for ref in source:
        if ref in used:
            continue
        if ref in absent:
            report.skipped.append((ref, "reference " + ("classifier" if absent[ref] in cls_keys else "head")
                                   + ": the model has none"))
        elif ref in joined_from:
            report.unexpected.extend(origin.get(k, k) for k in joined_from[ref])
        else:
            report.unexpected.append(origin.get(ref, ref))
    report.unexpected = sorted(set(report.unexpected))
    if strict:
        refuse_reorders(plan, report, mapping.path)
    if strict and not report.ok:
        raise error("port-incomplete", f"cannot port {report.source} into {plan.name}: "
                    f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
                    f"{len(report.mismatched)} mismatched tensor(s)\n" + report.render(limit=8), plan.span,
                    f"fix the rename rules in {mapping.path}, or pass strict=False to load what matches")
    with torch.no_grad():
        for key, value in new.items():
            ours[key].copy_(value.to(dtype=ours[key].dtype, device=ours[key].device))
    return report


def _reordered(mapping, rule, key, ref, value, target, report):
    """`value` reordered by `rule` into `target`'s shape (recorded in the report), or None (a mismatch)."""
    before = tuple(value.shape)
    if rule.kind != "view":
        if max(rule.dims) >= value.ndim or (rule.kind == "permute" and len(rule.dims) != value.ndim):
            raise error("port-mapping", f"{mapping.path}: {rule.kind} '{rule.pattern.pattern}' {rule.dims} does not fit "
                        f"{ref} {list(before)} ({value.ndim} axes)", None, "give one entry per axis of the tensor")
        value = value.permute(rule.dims) if rule.kind == "permute" else value.transpose(*rule.dims)
    if value.numel() != target.numel() or (rule.kind != "view" and not keeps_axis_order(value.shape, target.shape)):
        report.mismatched.append((key, ref, tuple(target.shape), tuple(value.shape)))
        return None
    report.permuted.append((key, ref, rule.describe(), before, tuple(target.shape)))
    return value.reshape(target.shape)


def from_timm(model, state_dict: dict, mapping=None, *, strict: bool = True, source_name: str | None = None,
              compare: bool | None = None, tolerance: float = DEFAULT_TOLERANCE, reference=None) -> PortReport:
    """Load a timm model's `state_dict` into `model` (a ComposedModel). See `port`. Then, with
    `compare`, the outputs are checked: timm's model named by `source_name` (`timm:NAME` or NAME) is
    built and loaded with `state_dict` (or `reference`, such a module, is used), both run on one
    fixed random input, and the largest difference goes into the report; over `tolerance`
    (relative to max(1, max |reference output|)) it is an error with `strict` (else `report.ok` is
    False). `compare` defaults to True when `reference` or `source_name` is given; without timm
    installed nothing is compared (the report says so)."""
    if isinstance(mapping, Mapping) and mapping.source != "timm":
        raise error("port-mapping", f"{mapping.path} maps from '{mapping.source}', not timm")
    report = port(model, state_dict, mapping, strict=strict, source_name=source_name)
    if compare is None:
        compare = reference is not None or source_name is not None
    name = (source_name or model.plan.reference or "").split(":", 1)[-1]
    if compare and report.ok:
        ref = reference if reference is not None else timm_reference(name, state_dict) if name else None
        if ref is None:
            report.compared = "outputs not compared: " + ("timm is not installed" if name else "no reference named")
        elif not compare_outputs(model, ref, report, tolerance=tolerance):
            report.disagrees = True
            if strict:
                raise refuse_disagreement(model.plan, report, f"timm:{name}")
    return report


def from_torchvision(model, state_dict: dict, mapping=None, *, strict: bool = True, source_name: str | None = None
                     ) -> PortReport:
    """Load a torchvision model's `state_dict` into `model` (a ComposedModel), with a mapping whose
    `source` is `torchvision`. See `port`."""
    if isinstance(mapping, Mapping) and mapping.source != "torchvision":
        raise error("port-mapping", f"{mapping.path} maps from '{mapping.source}', not torchvision")
    return port(model, state_dict, mapping, strict=strict, source_name=source_name)


def read_checkpoint(path) -> dict:
    """A local state dict: `.safetensors`, or a torch file (loaded with weights_only=True) whose
    top-level "state_dict" / "model" entry is unwrapped; a DataParallel `module.` prefix is dropped."""
    path = Path(path)
    if not path.is_file():
        raise error("io", f"no such checkpoint: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # a corrupt file: the user's to fix
            raise error("io", f"cannot read {path} as safetensors: {exc}") from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error("io", f"cannot read {path} as a torch state dict (weights_only): {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise error("io", f"{path} holds no state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data
