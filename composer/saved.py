"""Self-describing checkpoints: `composer.save(model, folder)` writes a folder laid out as a Hugging
Face model repository, from which `composer.build(folder)` rebuilds the same model with the same
weights, with no zoo lookup:

    folder/
      config.json          model name, parameters (the overrides used, and all values), settings,
                           build options, input (pretrained_cfg-like: input size, channels, classes),
                           and a sha256 of every blueprint file
      model.safetensors    the state dict (shared tensors stored once: safetensors' save_model)
      README.md            a model card stub
      blueprint/           the model's blueprint file and every file it imports, copied verbatim

The blueprint files are copied, not merged into one self-contained file: the text is exactly what
was built (comments and locations kept, so an error in the folder points at the line it is on),
and a model that inherits across files or names composites of several files needs no renaming.
Each imported file is placed at the path its `import` names relative to the importing file's copy,
where the loader looks first (composer/loader.py confines imports to the importing file's folder
tree, then the installed standard library): the folder never falls back on the installed zoo,
whose files may change between versions. A standard-library file that imports `"lib/x"` from
inside `lib/` is therefore copied to `lib/lib/x.arch`; the copies are a few KB.

Nothing here downloads or uploads: pushing the folder to a hub is the hub client's job. Checking
(`composer.load(folder)`, `composer check FOLDER`) needs no torch; building does."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import warnings
from pathlib import Path

from .diagnostics import ComposerError, ComposerWarning, error
from .expr import Cycle, Ref, Schedule
from .files import is_saved_folder, read_source, write_atomic

CONFIG, WEIGHTS, CARD, BLUEPRINT_DIR = "config.json", "model.safetensors", "README.md", "blueprint"
FORMAT = 1


def is_saved(folder) -> bool:
    """Whether `folder` is a folder `save` wrote (its config.json has a "composer" section)."""
    return is_saved_folder(folder)


# -- saving

def save(model, folder, load) -> Path:
    """Write `model` (built by composer.build, composer.build(folder) or timm through the bridge)
    to `folder`: its blueprint files, config.json, model.safetensors and README.md. The folder is
    checked first: the blueprint copies are loaded from a temporary folder and the model planned
    from them must have exactly the model's tensors (names and shapes), else nothing is written
    (a fused model, or one whose classifier was replaced by hand, is refused). `load`: composer.load
    (passed in: this module does not import the API)."""
    plan = getattr(model, "plan", None)
    if plan is None:
        raise error("usage", f"composer.save takes a model composer built, got {type(model).__name__}", None,
                    "a plain nn.Module has no blueprint: save its state_dict with safetensors")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise error("io", f"cannot write {folder}: it is not a folder")
    files = blueprint_files(Path(plan.file))
    config = make_config(model, plan, files, load)
    with tempfile.TemporaryDirectory(prefix=".composer-save-") as tmp:  # check before writing anything
        for rel, src in files.items():
            dest = Path(tmp) / BLUEPRINT_DIR / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
        (Path(tmp) / CONFIG).write_text(json.dumps(config))
        rebuilt = load(tmp)
        _same_tensors(model, rebuilt)
    if not _same_rates(rebuilt.drop_path, plan.drop_path):  # a schedule the language cannot write
        warnings.warn(ComposerWarning(f"{plan.name}: the model's drop-path schedule is recorded in config.json "
                                      "but not rebuilt; composer.build(folder) uses the blueprint's"), stacklevel=3)
    for rel, src in files.items():
        write_atomic(folder / BLUEPRINT_DIR / rel, src.read_bytes())
    from safetensors.torch import save_model

    write_atomic(folder / WEIGHTS, writer=lambda tmp: save_model(model, tmp, metadata={"format": "pt"}))
    card = folder / CARD
    if not card.exists():  # a card the user wrote is kept
        write_atomic(card, model_card(config))
    write_atomic(folder / CONFIG, json.dumps(config, indent=2) + "\n")  # last: the folder is complete
    return folder


def blueprint_files(main: Path) -> dict[str, Path]:
    """The model's file and every file it imports, by the path each takes under blueprint/ (the
    main file by its name; each import at the path it names, beside the importing file's copy)."""
    from .loader import find_import, import_file_name, read_blueprint

    out: dict[str, Path] = {}
    todo = [(main.name, main)]
    while todo:
        rel, src = todo.pop()
        if rel in out:
            if out[rel].resolve() != src.resolve():
                raise error("save-conflict", f"cannot save: two different files would be copied to "
                            f"{BLUEPRINT_DIR}/{rel} ({out[rel]} and {src})", None,
                            "rename one of the imported files")
            continue
        out[rel] = src
        for imp in read_blueprint(src).imports:
            # beside the importing file's copy, where the loader looks before the installed library
            todo.append(((Path(rel).parent / import_file_name(imp)).as_posix(), find_import(imp, src.parent)))
    return out


def make_config(model, plan, files: dict, load) -> dict:
    from . import __version__

    overrides = _overrides(model, plan, load)
    classes = getattr(model, "num_classes", None)
    spatial = list(plan.input.spatial)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})  # what the timm bridge knows, when present
    cfg.update(input_size=[plan.input.channels, *spatial], num_classes=classes)
    return {
        "architecture": plan.name,
        "num_classes": classes,
        "num_features": getattr(model, "num_features", None),
        "pretrained_cfg": cfg,
        "composer": {
            "format": FORMAT,
            "version": __version__,
            "model": plan.name,
            "blueprint": f"{BLUEPRINT_DIR}/{next(iter(files))}",
            "files": {f"{BLUEPRINT_DIR}/{rel}": _sha256(src.read_bytes()) for rel, src in files.items()},
            "overrides": overrides,
            "arguments": {k: to_json(v, k) for k, v in plan.arguments.items()},
            "input": {"kind": plan.input_kind, "channels": plan.input.channels, "size": spatial},
            "build": {"features_only": bool(getattr(model, "features_only", False)),
                      "out_indices": list(model.out_indices) if getattr(model, "features_only", False) else None,
                      "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
                      "head": dict(plan.head_edits)},  # timm's drop_rate / global_pool, reapplied on load
            "settings": {"drop_path": list(plan.drop_path), "reference": plan.reference, "paper": plan.paper},
            "params": plan.params,
        },
    }


def _overrides(model, plan, load) -> dict:
    """The parameter values that differ from the blueprint's defaults (all of them when the
    defaults do not plan), the input channels and size when they differ, and the classifier size
    when it was reset after the build."""
    try:
        default = load(f"{plan.file}:{plan.name}")
    except ComposerError:
        default = None
    out = {}
    for k, v in plan.arguments.items():
        if default is None or k not in default.arguments or expr_text(v) != expr_text(default.arguments[k]):
            out[k] = to_json(v, k)
    classes = getattr(model, "num_classes", None)
    if "num_classes" in plan.arguments and classes is not None and classes != plan.arguments["num_classes"]:
        out["num_classes"] = classes  # reset_classifier after the build
    if default is None or tuple(default.input.spatial) != tuple(plan.input.spatial):
        if "img_size" not in plan.arguments:
            out["img_size"] = list(plan.input.spatial)
    if default is None or default.input.channels != plan.input.channels:
        out["in_chans"] = plan.input.channels
    if default is not None and not _same_rates(default.drop_path, plan.drop_path):
        rates = plan.drop_path  # set after the build's blueprint (timm's drop_path_rate, --set drop_path=...)
        n = len(rates)
        line = [rates[0] + (rates[-1] - rates[0]) * i / max(n - 1, 1) for i in range(n)] if n else []
        if n and _same_rates(line, rates):  # the language writes a constant or linspace(a, b)
            out["drop_path"] = to_json(rates[0] if rates[0] == rates[-1] else Schedule(rates[0], rates[-1], None))
    return out


def _same_rates(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-9 for x, y in zip(a, b))


def to_json(value, name: str = "value"):
    """A parameter value as JSON: numbers, strings, booleans and lists of them as they are; any
    other value (an op or block, a schedule) as {"expr": its text in the language}."""
    if _plain(value):
        return list(value) if isinstance(value, tuple) else value
    return {"expr": expr_text(value, name)}


def _plain(v) -> bool:
    if isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v)):
        return True
    return isinstance(v, (list, tuple)) and all(_plain(x) for x in v)


def expr_text(v, name: str = "value") -> str:
    """A resolved value written as the language reads it (`--set` syntax)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and math.isfinite(v):
        return repr(v)
    if isinstance(v, str) and '"' not in v and "\n" not in v:
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(expr_text(x, name) for x in v) + "]"
    if isinstance(v, Ref):
        args = ", ".join(f"{k} = {expr_text(x, name)}" for k, x in v.args)
        return f"{v.name}({args})" if args else v.name
    if isinstance(v, Schedule):
        return f"linspace({v.start!r}, {v.end!r})"
    if isinstance(v, Cycle):
        return "alternate(" + ", ".join(expr_text(x, name) for x in v.values) + ")"
    raise error("save-value", f"cannot save parameter '{name}': its value {v!r:.60} has no written form")


def model_card(config: dict) -> str:
    c = config["composer"]
    over = ", ".join(f"{k}={json.dumps(v)}" for k, v in c["overrides"].items()) or "none"
    ref = c["settings"].get("paper") or c["settings"].get("reference") or ""
    return (f"---\nlibrary_name: arch-composer\ntags:\n- composer\n- {c['model']}\n---\n\n"
            f"# {c['model']}\n\n"
            f"A [composer](https://pypi.org/project/arch-composer/) model{f' ({ref})' if ref else ''}: "
            f"{c['params']:,} parameters, input {c['input']['kind']} "
            f"{'x'.join(map(str, [c['input']['channels'], *c['input']['size']]))}, overrides: {over}.\n\n"
            "```python\nimport composer\n\nmodel = composer.build(\"PATH/TO/THIS/FOLDER\")   "
            "# the blueprint in blueprint/, the weights in model.safetensors\n```\n\n"
            "Training data, intended use and evaluation: to be written.\n")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- loading

def read_config(folder) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise error("io", f"{folder} is not a saved model: it has no {CONFIG}", None,
                    "composer.save(model, folder) writes one")
    try:
        config = json.loads(read_source(path))
        section = config["composer"]
        section["model"], section["blueprint"], section["overrides"]  # noqa: B018 (the keys we need)
    except (ValueError, KeyError, TypeError) as exc:
        raise error("io", f"{path}: not a composer config ({type(exc).__name__}: {exc})") from None
    files = section.get("files") or {}
    if not isinstance(section["model"], str) or not isinstance(section["overrides"], dict) \
            or not isinstance(files, dict) or any(not isinstance(v, str) for v in files.values()) \
            or any(isinstance(v, dict) and not isinstance(v.get("expr", ""), str) for v in section["overrides"].values()):
        raise error("io", f"{path}: not a composer config (its composer section's model, overrides or files "
                    "have the wrong types)", None, "composer.save(model, folder) writes one")
    if not isinstance(section.get("format"), int) or section["format"] > FORMAT:
        raise error("io", f"{path}: format {section.get('format')!r} is newer than this composer reads ({FORMAT})",
                    None, "upgrade composer")
    return config


def _blueprint_path(folder: Path, section: dict) -> Path:
    rel = Path(str(section["blueprint"]))
    if rel.is_absolute() or ".." in rel.parts:
        raise error("io", f"{folder / CONFIG}: the blueprint must be a path inside the folder, got '{rel}'")
    return folder / rel


def saved_target(folder) -> tuple[str, dict, dict]:
    """What composer.load plans for a saved folder (no torch): its blueprint file and model
    (FILE:MODEL), the saved overrides and the head edits (head_edits.with_head_edits). A blueprint file changed since it was saved is a warning
    (the weights then must still fit: `build_saved` checks)."""
    from .parse import parse_expr

    folder = Path(folder)
    section = read_config(folder)["composer"]
    path = _blueprint_path(folder, section)
    for rel, digest in (section.get("files") or {}).items():
        f = folder / rel
        inside = not Path(rel).is_absolute() and ".." not in Path(rel).parts
        if inside and f.is_file() and _sha256(f.read_bytes()) != digest:
            warnings.warn(ComposerWarning(f"{f}: warning: changed since the model was saved; the weights in "
                                          f"{WEIGHTS} were saved with the original"), stacklevel=3)
    given = {}
    for k, v in section["overrides"].items():
        given[k] = parse_expr(v["expr"], f"{folder / CONFIG}: overrides.{k}") if isinstance(v, dict) and "expr" in v \
            else v
    edits = (section.get("build") or {}).get("head") or {}
    if not isinstance(edits, dict):
        raise error("io", f"{folder / CONFIG}: not a composer config (build.head must be an object)")
    return f"{path}:{section['model']}", given, edits


def build_saved(folder, plan, *, seed=0, device=None, max_memory=None, features_only=None, out_indices=None,
                dynamic_img_size=None):
    """The saved model rebuilt from `plan` (composer.load of the folder, with any overrides: they
    must keep every tensor's shape) with its weights. The build options default to those saved
    (False / None from composer.build mean "as saved")."""
    from .builder import build_module

    saved = read_config(folder)["composer"].get("build") or {}
    features_only = bool(features_only or saved.get("features_only"))
    out_indices = (out_indices if out_indices is not None else saved.get("out_indices")) if features_only else None
    dynamic_img_size = bool(dynamic_img_size or saved.get("dynamic_img_size"))
    model = build_module(plan, seed=seed, device=device, max_memory=max_memory, features_only=features_only,
                         out_indices=out_indices, dynamic_img_size=dynamic_img_size)
    if str(device) != "meta":
        load_weights(model, folder)
    return model


def load_weights(model, folder) -> None:
    """Load folder/model.safetensors into `model`: every tensor present with its shape, else a
    located error (at the blueprint line of the layer whose tensor does not fit)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise error("io", f"{folder} has no {WEIGHTS}")
    _check_shapes(model, path, safe_open)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:  # a file safetensors cannot read
        raise error("io", f"cannot read {path}: {exc}") from None
    if missing or unexpected:
        words = [f"missing {', '.join(sorted(missing)[:4])}" if missing else "",
                 f"unexpected {', '.join(sorted(unexpected)[:4])}" if unexpected else ""]
        raise error("weights", f"{path} does not fit the model its blueprint gives: "
                    + "; ".join(w for w in words if w), None,
                    "the blueprint or the overrides were changed since the model was saved")


def _check_shapes(model, path: Path, safe_open) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise error("io", f"cannot read {path}: {exc}") from None
    state = model.state_dict()
    for key in state:  # in the model's order: the first layer that does not fit
        shape = shapes.get(key)
        if shape is not None and tuple(state[key].shape) != shape:
            raise error("weights", f"{path}: '{key}' has shape {list(shape)}, the blueprint gives "
                        f"{list(state[key].shape)}", _span_of(model.plan, key),
                        "the blueprint was changed since the model was saved")


def _span_of(plan, key: str):
    """The span of the plan step whose module holds the tensor `key` (the longest path prefix)."""
    best, span = -1, None
    for section in plan.sections:
        for step in section.steps:
            for s in step.walk():
                if (key.startswith(s.path + ".") or key == s.path) and len(s.path) > best and s.span is not None:
                    best, span = len(s.path), s.span
    return span


def _same_tensors(model, plan) -> None:
    """Refuse to save when `plan` (planned from the blueprint copies) does not give the model's tensors."""
    from .builder import build_module

    rebuilt = build_module(plan, seed=None, device="meta", features_only=bool(getattr(model, "features_only", False)),
                           out_indices=getattr(model, "out_indices", None) if getattr(model, "features_only", False)
                           else None, dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)))
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise error("save-mismatch", f"cannot save {model.plan.name}: its blueprint no longer gives its tensors "
                    f"(e.g. {', '.join(f'{k} {list(s)}' for k, s in diff)})", None,
                    "save before fuse() or reset_classifier() to another head, or rebuild the model from its blueprint")
