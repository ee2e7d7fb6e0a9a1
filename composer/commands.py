"""What each command of the command line does (composer/cli.py parses the arguments and calls
these): check, build, info, port, list, diff, graph, show, export, fmt, convert, schema, lsp."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .diagnostics import ComposerError, error

EXIT_OK, EXIT_DIFFERS, EXIT_USER, EXIT_INTERNAL = 0, 1, 2, 3

MAX_SET_CHARS = 1000  # a --set value is a short expression; a million-digit number is a mistake


def _sets(values: list[str]) -> dict:
    """`--set key=value` pairs; values are expressions of the language (parsed, not eval'd)."""
    out = {}
    for item in values or []:
        from .parse import parse_expr  # here: a check without --set from cached files never imports Lark

        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise error("usage", f"--set expects key=value, got '{item[:60]}'")
        if len(text) > MAX_SET_CHARS:
            raise error("usage", f"--set {key}: the value is {len(text):,} characters long; the limit is "
                        f"{MAX_SET_CHARS:,}", None, "--set takes a short expression: 10, [2, 2, 6, 2], \"avg\"")
        out[key] = parse_expr(text, f"--set {key}")
    return out


def _overrides(args) -> dict:
    over = _sets(getattr(args, "set", None))
    for key in ("num_classes", "img_size", "in_chans"):
        value = getattr(args, key, None)
        if key == "img_size" and value is not None:  # `--img-size 256` or `--img-size 256 192` (H W)
            value = value[0] if len(set(value)) == 1 else list(value)
        if value is not None:
            over[key] = value
    return over


SAVED = object()  # a check target that is a saved model's folder


def cmd_check(args) -> int:
    # what a cached check needs is imported here; the op library only when a file is checked
    from .check_cache import CheckCache
    from .files import blueprint_files, is_saved_folder, zoo_file_of

    cache = CheckCache(repr((args.quiet, args.set, args.num_classes, args.img_size, args.in_chans)))
    targets, kept = [], {}  # kept: the results looked up already (a zoo name's)
    for t in args.targets:
        p = Path(t)
        if is_saved_folder(p):  # a folder composer.save wrote: its blueprint with the saved overrides
            targets.append((p, SAVED))
        elif p.is_dir():
            found = blueprint_files(p, recursive=True)
            if not found:
                raise error("io", f"no blueprint in {t}", None, "blueprints are .arch, .yaml or .yml files")
            targets += [(f, None) for f in found]
        elif p.suffix in (".arch", ".yaml", ".yml") and p.is_file():
            targets.append((p, None))  # as api.resolve_target gives it
        else:
            home = zoo_file_of(t) if t.isidentifier() and not p.exists() else None
            result = cache.lookup((home, t)) if home is not None else None
            if result is not None:  # a zoo model whose kept result still holds: no need to parse
                targets.append((home, t))
                kept[(home, t)] = result
            else:
                from . import api

                targets.append(api.resolve_target(t))
    if any(name is SAVED for _, name in targets):
        failures = sum(_check_target(args, t) for t in targets)
    else:  # a folder's files: on several cores (composer/check_jobs.py), the output in the same order;
        # an unchanged file's output comes from the check-result cache (composer/check_cache.py)
        from .check_jobs import run

        items = [(t, kept[t] if t in kept else cache.lookup(t)) for t in targets]
        if any(kept is None for _, kept in items):
            from . import api  # noqa: F401 - the op library, imported once before run() forks, not per process

        def check(item) -> int:
            target, kept = item
            if kept is not None:
                return cache.replay(kept)
            return cache.record(target, lambda: _check_target(args, target))

        failures = run(items, check, [0 if kept is not None else _size(t[0]) for t, kept in items])
    return EXIT_USER if failures else EXIT_OK


def _size(path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _check_target(args, target) -> int:
    """Check one target of `composer check`, printing its models' summaries; 1 if it failed."""
    path, name = target
    from . import api
    from .expr import from_python
    from .resolve import load

    try:
        if name is SAVED:
            plan = api.load(str(path), **_overrides(args))
            if not args.quiet:
                params, macs = plan.cost()
                print(f"ok  {path} (saved {plan.name})  {params:,} params  {macs / 1e9:.2f} GMACs")
            return 0
        unit = load(path)
        names = [name] if name else [m.name for m in unit.file.models]
        for n in names:
            # api.load(f"{path}:{n}", ...) without finding and loading the file again for every model
            plan = api.plan_model(unit, path, n, {k: from_python(v) for k, v in _overrides(args).items()})
            if not args.quiet:
                params, macs = plan.cost()
                print(f"ok  {path}:{n}  {params:,} params  {macs / 1e9:.2f} GMACs")
        if not names and not args.quiet:
            print(f"ok  {path}  ({len(unit.file.composites)} definitions)")
    except ComposerError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    return 0


def cmd_build(args) -> int:
    from . import api
    from .files import check_writable

    if args.output:
        check_writable(args.output)  # before the build, not after it
    plan = api.load(args.target, **_overrides(args))
    import torch

    from .analyse import counted_params, render
    from .builder import build_module

    from .saved import is_saved

    if is_saved(args.target):  # a folder composer.save wrote: built with its weights and build options
        model = api.build(args.target, seed=args.seed, max_memory=args.max_memory, **_overrides(args))
    else:
        model = build_module(plan, seed=args.seed, max_memory=args.max_memory)
    model.eval()
    if args.fuse:
        model.fuse()
    if args.optimize:
        model.optimize()
    x = torch.randn(1, plan.input.channels, *plan.input.spatial)
    with torch.no_grad():
        y = model(x)
    print(render(plan, counted_params(model)))
    shown = tuple(y.shape) if isinstance(y, torch.Tensor) else [tuple(t.shape) for t in y]  # features_only: a list
    print(f"forward: input {tuple(x.shape)} -> output {shown}")
    if args.fuse:
        print("fused: re-parameterized into the inference form (parameters counted fused, MACs as trained)")
    if args.optimize:
        print("optimized: the inference form, batch norms and layer scales folded into their convs and linears, "
              "activations into the linears before them, dropout removed (parameters counted optimized, MACs as "
              "trained; the state dict has other keys)")
    if args.output:
        _save(model, Path(args.output))
        print(f"wrote {args.output}")
    return EXIT_OK


def _save(model, path: Path) -> None:
    """Write the state dict as safetensors atomically: a temporary file, then a rename."""
    from safetensors.torch import save_file

    from .files import write_atomic

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, writer=lambda tmp: save_file(state, tmp))


def cmd_port(args) -> int:
    from . import api

    from .files import check_writable

    source = args.source
    check_writable(args.output)
    plan = api.load(args.target, **_overrides(args))
    if source is None:
        source = plan.reference
        if not source:
            raise error("usage", f"{plan.name} declares no `reference`; name the source with --from timm:MODEL")
    kind, _, ref_name = source.partition(":")
    if kind not in ("timm", "torchvision") or not ref_name:
        raise error("usage", f"--from expects timm:MODEL_NAME or torchvision:MODEL_NAME, got '{source}'", None,
                    "timm and torchvision checkpoints are supported")
    from .memory import check_memory

    check_memory(plan, args.max_memory)  # before the checkpoint is read or anything allocated
    from .builder import build_module
    from .port import from_timm, from_torchvision, mapping_path, read_checkpoint, refuse_reorders

    if not args.tolerance >= 0:
        raise error("usage", f"--tolerance must be a number >= 0, got {args.tolerance}")

    state = read_checkpoint(args.checkpoint)
    model = build_module(plan, seed=args.seed, max_memory=args.max_memory)
    if kind == "timm":
        report = from_timm(model, state, strict=False, source_name=source, compare=not args.no_compare,
                           tolerance=args.tolerance)
    else:
        report = from_torchvision(model, state, strict=False, source_name=source)
    print(report.render())
    refuse_reorders(plan, report, mapping_path(model))
    if report.disagrees:
        from .port_verify import refuse_disagreement

        raise refuse_disagreement(plan, report, source)
    if not report.ok:
        raise error("port-incomplete", f"not written: {args.checkpoint} does not account for every tensor of "
                    f"{plan.name} (see the report above)", None,
                    "fix the rename rules in the family's .port.yaml, or check --from and the checkpoint")
    _save(model, Path(args.output))
    print(f"wrote {args.output}")
    return EXIT_OK


def cmd_info(args) -> int:
    """The summary from the plan alone (no torch); `--build` counts the parameters of a model built
    on the meta device instead (imports torch; the zoo's tests prove both counts equal)."""
    from . import api
    from .analyse import render
    from .memory import estimate
    from .sizes import rule_texts

    plan = api.load(args.target, **_overrides(args))
    counted = None
    if args.build:
        from .analyse import counted_params
        from .builder import build_module

        counted = counted_params(build_module(plan, seed=None, device="meta"))
    print(render(plan, counted))
    print(estimate(plan).render())
    plain, dynamic = rule_texts(plan)
    print(f"input sizes: {plain} (built at {'x'.join(map(str, plan.input.spatial))}"
          + (f"; with dynamic_img_size: {dynamic})" if dynamic != plain else ")"))
    print("(built on the meta device: no weights allocated)" if args.build else
          "(counted from the plan: no model built; --build counts on a model built on the meta device)")
    return EXIT_OK


def cmd_list(args) -> int:
    from .catalog import listing, render_listing

    items = listing(args.what)
    if args.format == "json":
        print(json.dumps(items, indent=2))
    elif args.format == "markdown":
        from .catalog import render_markdown

        print(render_markdown(args.what, items), end="")
    else:
        print(render_listing(args.what, items))
    return EXIT_OK


def cmd_diff(args) -> int:
    """Exit 0 when identical, 1 when different; user errors raise (exit 2)."""
    from .api import load
    from .compare import compare, render_markdown, render_text

    plans = []
    for label, target in (("A", args.a), ("B", args.b)):
        try:
            plans.append(load(target, **_overrides(args)))
        except ComposerError as exc:
            exc.diagnostics[0].notes.append(f"while loading {label} of `composer diff` ('{target}')")
            raise
    d = compare(*plans, target_a=args.a, target_b=args.b)
    if args.format == "json":
        print(json.dumps(d.as_json(), indent=2))
    elif args.format == "markdown":
        print(render_markdown(d), end="")
    else:
        colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        print(render_text(d, colour))
    return EXIT_OK if d.identical else EXIT_DIFFERS


def cmd_graph(args) -> int:
    from . import api
    from .files import check_writable, write_atomic
    from .render import output_format, render

    fmt = output_format(args.output, getattr(args, "format", None))
    out = Path(args.output)
    check_writable(out)
    plan = api.load(args.target, **_overrides(args))
    drawing = render(plan, fmt, expand=getattr(args, "expand", False), opened=getattr(args, "open", None) or (),
                     direction=getattr(args, "direction", "TB"))
    if callable(drawing):  # PDF, PNG: written by matplotlib into the temporary file
        write_atomic(out, writer=drawing)
    else:
        write_atomic(out, drawing)
    print(f"wrote {out}")
    return EXIT_OK


def cmd_export(args) -> int:
    """`composer export TARGET --to onnx|pt2|python [-o FILE] [--dynamic]`: 0 written, 2 refused."""
    from .api import export

    over = _overrides(args)
    result = export(args.target, args.to, args.output, dynamic=args.dynamic, tolerance=args.tolerance, **over)
    print(result.render())
    return EXIT_OK


def cmd_fmt(args) -> int:
    """`composer fmt PATH... [--check]`: 0 formatted (or rewritten), 1 would change (--check), 2 error."""
    import difflib

    from .files import write_atomic
    from .format_files import format_paths

    files, changed = format_paths(args.paths)
    if getattr(args, "check", False):
        for path, text, new in changed:
            sys.stdout.writelines(difflib.unified_diff(
                text.splitlines(keepends=True), new.splitlines(keepends=True), f"{path}", f"{path} (formatted)"))
        if changed:
            print(f"{len(changed)} of {len(files)} file{'s' * (len(files) != 1)} would be reformatted", file=sys.stderr)
        return 1 if changed else 0
    for path, _, new in changed:
        write_atomic(path, new)
        print(f"reformatted {path}")
    return 0


def cmd_convert(args) -> int:
    """`composer convert FILE --to yaml|arch [-o OUT]`: 0 written, 2 error."""
    from .convert import convert_file
    from .files import write_atomic

    out = convert_file(Path(args.file), args.to)
    if getattr(args, "output", None):
        try:
            write_atomic(Path(args.output), out)
        except OSError as exc:
            raise error("io", f"cannot write {args.output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.write(out)
    return 0


def cmd_show(args) -> int:
    """`composer show NAME [-o FILE]`: the zoo's blueprint file of model NAME (or the zoo file NAME)."""
    from .files import read_source
    from .loader import zoo_source
    from .locate import BLUEPRINTS_DIR

    path = zoo_source(args.name)
    return _emit(read_source(path), args.output, f" (the zoo's {path.relative_to(BLUEPRINTS_DIR)})")


def cmd_schema(args) -> int:
    """`composer schema [-o FILE]`: the JSON Schema of the YAML form (no torch)."""
    from .schema import render

    return _emit(render(), args.output)


def _emit(text: str, output, what: str = "") -> int:
    """A text command's result: written to `output` (atomically), or printed."""
    if output:
        from .files import write_atomic

        write_atomic(Path(output), text)
        print(f"wrote {output}{what}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_lsp(args) -> int:
    from .lsp import serve  # pygls only here: a missing pygls is a user error naming the extra

    return serve()

