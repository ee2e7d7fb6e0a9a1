"""The check that makes a port honest: the reference model (timm's), loaded with the checkpoint,
and the ported model run on one fixed random input must agree. `composer port` refuses to write,
and `port.from_timm(..., compare=True)` raises, when they do not."""

from __future__ import annotations

import torch

from .diagnostics import error

DEFAULT_TOLERANCE = 1e-4  # the largest |ours - reference|, relative to max(1, max |reference|)


def timm_reference(name: str, state_dict: dict):
    """timm's `name`, built without downloading anything and loaded with `state_dict` (strict);
    None when timm is not installed; a ComposerError when the checkpoint does not load into it."""
    try:
        import timm
    except ImportError:
        return None
    try:
        ref = timm.create_model(name, pretrained=False)
    except Exception as exc:  # an unknown name or arguments: the user's to fix
        raise error("port-compare", f"cannot build timm's {name} to compare the outputs: {exc}", None,
                    "name the checkpoint's model with --from timm:NAME, or pass --no-compare") from None
    try:
        ref.load_state_dict({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)})
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise error("port-compare", f"the checkpoint does not load into timm's {name}, so the outputs cannot be "
                    f"compared: {' '.join(first[:3])[:300]}", None,
                    "name the checkpoint's model with --from timm:NAME, or pass --no-compare") from None
    return ref.eval()


def compare_outputs(model, reference, report, *, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> bool:
    """Run `model` and `reference` on one random input (seeded) of the model's input shape, at batch
    2; record the largest difference in `report`. Compares pre-logits when the classifier was
    skipped (another num_classes). True when they agree within `tolerance` (relative to
    max(1, max |reference output|)); False, with `report.compared` saying why, when not or when the
    outputs cannot be compared (a features_only model, an adapted input conv)."""
    plan = model.plan
    if getattr(model, "features_only", False) or report.adapted:
        why = "the model is features_only" if getattr(model, "features_only", False) else \
            "the input conv was adapted to in_chans"
        report.compared = f"outputs not compared: {why}"
        return True
    pre_logits = any("classifier" in why for _, why in report.skipped)
    x = torch.randn(2, plan.input.channels, *plan.input.spatial, generator=torch.Generator().manual_seed(seed))
    was = model.training, reference.training
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            if pre_logits:
                ours = model.forward_head(model.forward_features(x), pre_logits=True)
                theirs = reference.forward_head(reference.forward_features(x), pre_logits=True)
            else:
                ours, theirs = model(x), reference(x)
    finally:
        model.train(was[0])
        reference.train(was[1])
    what = "pre-logits" if pre_logits else "outputs"
    if not (torch.is_tensor(ours) and torch.is_tensor(theirs)) or ours.shape != theirs.shape:
        shape = (lambda t: list(t.shape) if torch.is_tensor(t) else type(t).__name__)
        report.compared = f"{what} differ in shape: ours {shape(ours)}, the reference's {shape(theirs)}"
        return False
    diff = (ours.float() - theirs.float()).abs().max().item()
    scale = max(1.0, theirs.float().abs().max().item())
    report.max_difference = diff
    ok = diff <= tolerance * scale
    report.compared = (f"{what} compared on a random input {list(x.shape)}: largest difference {diff:.3g} "
                       f"({'within' if ok else 'over'} the tolerance {tolerance:g} x {scale:.3g})")
    return ok


def refuse_disagreement(plan, report, source: str):
    """The located error for a port whose outputs differ from the reference's."""
    return error("port-differs", f"the ported {plan.name} does not compute what {source} computes: "
                 f"{report.compared}", plan.span,
                 "a tensor is probably read in the wrong element order or fed to the wrong layer: check the "
                 "report's reshaped and matched tensors and the port map (a permute or transpose rule); "
                 "--tolerance sets the tolerance")
