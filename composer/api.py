"""The public entry points: find a blueprint by zoo name or path, check it, build it."""

from __future__ import annotations

from pathlib import Path

from . import resolve as _resolve
from .budget import MAX_SEED
from .diagnostics import did_you_mean, error
from .expr import Schedule, from_python
from .files import blueprint_files, zoo_file_of
from .head_edits import with_head_edits
from .lower import plan
from .plan import Plan
from .locate import BLUEPRINTS_DIR

BUILD_KEYS = ("num_classes", "img_size", "in_chans")


def zoo_files() -> list[Path]:
    return blueprint_files(BLUEPRINTS_DIR)


def zoo_index() -> dict[str, Path]:
    """Zoo model name -> file, torch-free (parses every family file)."""
    index = {}
    for path in zoo_files():
        for m in _resolve.load(path).file.models:
            index[m.name] = path
    return index


def zoo_home(name: str) -> Path | None:
    """The zoo file defining model `name`, without parsing the whole zoo as `zoo_index` does: the
    file whose text declares it (`files.zoo_file_of`), confirmed by parsing that file alone; None
    when not found so (then `zoo_index` decides). tests/test_api.py: the same file as `zoo_index`
    gives, for every zoo model."""
    if not name.isidentifier():
        return None
    home = zoo_file_of(name)
    if home is None or not any(m.name == name for m in _resolve.load(home).file.models):
        return None
    return home


def resolve_target(target: str) -> tuple[Path, str | None]:
    """`file.arch[:model]`, or a zoo model name -> (file, model name or None)."""
    path, _, model = target.partition(":") if not Path(target).exists() else (target, "", "")
    if Path(path).suffix in (".arch", ".yaml", ".yml") or Path(path).exists():
        if not Path(path).is_file():
            raise error("io", f"cannot read {path}: not a regular file" if Path(path).exists() else f"no such file: {path}")
        return Path(path), model or None
    home = zoo_home(target)
    if home is not None:
        return home, target
    index = zoo_index()
    if target not in index:
        raise error("unknown-model", f"no zoo model '{target}'", None,
                    did_you_mean(target, index) or "`composer list models` shows the zoo")
    return index[target], target


def load(target: str, **overrides) -> Plan:
    """Resolve and shape-check one model (pure Python). `overrides`: model parameters and
    model-level settings (`drop_path`, `crop_pct`, ...), plus `num_classes`, `img_size` and
    `in_chans` as build-time overrides and `drop_path_rate` (timm's: `drop_path = linspace(0, rate)`).
    Values are the language's or Python's (any sequence, mapping, numpy number)."""
    overrides = {k: from_python(v) for k, v in overrides.items()}  # tuples, ListConfig, numpy ints ...
    if _saved_folder(target):  # a folder composer.save wrote: its blueprint and overrides
        from .saved import saved_target

        target, saved, edits = saved_target(target)
        return with_head_edits(load(target, **{**saved, **overrides}), edits)
    path, name = resolve_target(target)
    return plan_model(_resolve.load(path), path, name, overrides)


def plan_model(unit, path: Path, name: str | None, overrides: dict) -> Plan:
    """`load` of model `name` (None: the file's only model) once its file is found: `unit` is the
    file at `path` loaded (`resolve.load`), `overrides` the language's values (`from_python`'s).
    `composer check` calls it with the unit it loaded already, for each model of the file."""
    if name is None:
        names = [m.name for m in unit.file.models]  # the file's own, as the unit was loaded
        if len(names) != 1:
            raise error("ambiguous", f"{path} defines {len(names)} models; name one as {path}:MODEL", None,
                        f"models: {', '.join(names)}" if names else None)
        name = names[0]
    defs = unit.models or {m.name: m for m in unit.file.models}  # bases in imported files too
    params = set()
    cur, seen = defs.get(name), set()
    while cur is not None and cur.name not in seen:  # a cyclic base chain is reported by resolve_model
        seen.add(cur.name)
        params |= {p.name for p in cur.params}
        cur = unit.homes.get(id(cur), defs).get(cur.base) if cur.base else None
    if "drop_path_rate" in overrides and "drop_path_rate" not in params:  # timm's name: linspace(0, rate)
        overrides["drop_path"] = drop_path_schedule(overrides.pop("drop_path_rate"))
    in_chans = overrides.pop("in_chans", None)
    img_size = overrides.get("img_size")
    if img_size is not None and "img_size" not in params:
        overrides.pop("img_size")
    else:
        img_size = None
    _positive("in_chans", in_chans)
    for size in img_size if isinstance(img_size, (list, tuple)) else [img_size]:
        _positive("img_size", size)
    model = _resolve.resolve_model(unit, name, overrides)
    if in_chans is not None or img_size is not None:
        inp = model.input
        size = inp.size if img_size is None else tuple([img_size] * len(inp.size) if isinstance(img_size, int) else img_size)
        model.input = type(inp)(inp.kind, inp.channels if in_chans is None else in_chans, size, inp.span)
    return plan(model)


def _saved_folder(target) -> bool:
    """A folder composer.save wrote (saved.is_saved: its config.json has a "composer" section)."""
    from .saved import is_saved

    return is_saved(str(target))


def drop_path_schedule(rate) -> Schedule:
    """timm's `drop_path_rate`: stochastic depth `linspace(0, rate)` over all blocks."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise error("value", f"drop_path_rate must be a number from 0 up to (not including) 1, got {rate!r}")
    return Schedule(0.0, float(rate), None)


def _positive(what: str, value) -> None:
    """`in_chans` and `img_size` given to a model without such a parameter go to its input: a
    positive int or nothing (0 is never "the model's own")."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise error("value", f"{what} must be a positive int, got {value!r}")


def check(target: str, **overrides) -> Plan:
    return load(target, **overrides)


def diff(a: Plan, b: Plan):
    """What differs between two planned models: `composer.diff(composer.load(A), composer.load(B))`.
    Returns a `composer.compare.Diff` (changes by path, params and MACs per stage); no torch."""
    from .compare import compare

    return compare(a, b)




def build(target: str, *, features_only: bool = False, out_indices=None, seed: int | None = 0, device=None,
          dynamic_img_size: bool = False, max_memory=None, optimize: bool = False, **overrides):
    """Build a model as a plain `nn.Module` (timm-style API). The model runs at every input size its
    architecture admits (`composer info` states them) and refuses others with
    `composer.InputSizeError`; `dynamic_img_size=True` resamples absolute position embeddings to
    the grid it gets, as timm's option of that name does. `max_memory` (bytes, or a size such as
    "8G"; default: 80% of the available memory): a model whose parameters, buffers and largest
    activation at batch 1 need more is refused (a ComposerError) before anything is allocated.
    `optimize=True`: the inference form, `model.optimize()` (batch norms and layer scales folded
    into their convs and linears, re-parameterised branches fused, dropout removed; eval mode, and
    `train()` is refused)."""
    from .builder import build_module

    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise error("value", f"seed must be an int from 0 to 2^63 - 1 (or None), got {seed!r}")
    if _saved_folder(target):  # its blueprint, build options and weights (composer/saved.py)
        from .saved import build_saved

        model = build_saved(target, load(target, **overrides), seed=seed, device=device, max_memory=max_memory,
                            features_only=features_only, out_indices=out_indices, dynamic_img_size=dynamic_img_size)
    else:
        model = build_module(load(target, **overrides), seed=seed, device=device, features_only=features_only,
                             out_indices=out_indices, dynamic_img_size=dynamic_img_size, max_memory=max_memory)
    return model.optimize() if optimize else model


def build_loss(target: str, **overrides):
    """The training objective a blueprint names (`loss = focal(alpha = 0.25)`) as an `nn.Module`;
    cross-entropy when it names none. Called as `loss(logits, target)` (see each loss's docs)."""
    from .ops.loss import CrossEntropy

    return (load(target, **overrides).loss or CrossEntropy()).build_loss()


def save(model, folder):
    """Write a built model to `folder` as a Hugging Face-style repository (config.json,
    model.safetensors, README.md and its blueprint files under blueprint/); `composer.build(folder)`
    rebuilds it with its weights, with no zoo lookup (composer/saved.py)."""
    from .saved import save as save_folder

    return save_folder(model, folder, load)


def export(model, to: str, path=None, **options):
    """Export a model (built, or a target `build` takes) to "onnx", "pt2" or "python", checked against eager
    before it is written (composer/exporter.py: img_size, dynamic, tolerance, overrides)."""
    from .exporter import export as export_file

    return export_file(model, to, path, build=build, **options)
