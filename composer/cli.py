"""The command line: check, build, info, port, list, diff, graph, show, export, fmt, convert, lsp. Exit status 0 ok, 1 differs, 2 user error, 3 internal error."""

from __future__ import annotations

import argparse
import atexit
import functools
import gc
import os
import shutil
import sys
import warnings

from .budget import MAX_SEED
from .commands import (EXIT_INTERNAL, EXIT_OK, EXIT_USER, cmd_build, cmd_check, cmd_convert, cmd_diff,
                       cmd_export, cmd_fmt, cmd_graph, cmd_info, cmd_list, cmd_lsp, cmd_port, cmd_schema, cmd_show)
from .diagnostics import ComposerError, ComposerWarning


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # argparse makes a formatter at every add_argument, and each asks the terminal its width
        # (a failed ioctl and environment lookups when output is piped): ask once per parser
        kwargs.setdefault("formatter_class", functools.partial(
            argparse.HelpFormatter, width=shutil.get_terminal_size().columns - 2))
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse's own usage errors: exit 2 like every user error
        self.print_usage(sys.stderr)
        print(f"composer: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER)


def _int_in(low: int, high: int | None = None):
    """An argparse type: an int from `low` (to `high`), refused with a usage error (exit 2) otherwise."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got '{text[:40]}'") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be {'at least ' + str(low) if high is None else f'from {low} to {high}'}, got {value}")
        return value

    return convert


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="composer", description="Declarative architecture composer for deep-learning backbones.",
                epilog="exit status: 0 ok, 1 differs, 2 user error, 3 internal error")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for internal errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def target_opts(sp, with_build=True):
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a model parameter (the value is an expression: 10, [2, 2, 6, 2], \"avg\")")
        sp.add_argument("--num-classes", dest="num_classes", type=_int_in(0), help="classifier size (0: no classifier)")
        sp.add_argument("--img-size", dest="img_size", type=_int_in(1), nargs="+", metavar="SIZE",
                        help="input resolution: one size, or one per spatial axis (H W)")
        sp.add_argument("--in-chans", dest="in_chans", type=_int_in(1), help="input channels")

    def memory_opt(sp):
        sp.add_argument("--max-memory", dest="max_memory", metavar="SIZE",
                        help="refuse a model whose parameters, buffers and largest activation need more (8G, "
                        "512M; default: 80%% of the available memory)")

    c = sub.add_parser("check", help="parse, validate and infer every shape (no torch)",
                       description="Parse, validate and shape-check blueprints without importing torch. "
                       "TARGET is a file, a directory (every .arch/.yaml in it), file:model, or a zoo model name.")
    c.add_argument("targets", nargs="+", metavar="TARGET")
    c.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    target_opts(c)
    c.set_defaults(func=cmd_check)

    b = sub.add_parser("build", help="build the model, run one forward pass, print the summary",
                       description="Build a blueprint into a PyTorch module, run one forward pass on random input "
                       "and print the per-stage summary. TARGET: FILE[:MODEL] or a zoo model name.")
    b.add_argument("target", metavar="TARGET")
    target_opts(b)
    b.add_argument("-o", "--output", metavar="OUT.safetensors", help="write the initial weights (atomically)")
    b.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, help="initialisation seed (default 0)")
    memory_opt(b)
    b.add_argument("--fuse", action="store_true",
                   help="fuse re-parameterizable ops into single convs first (inference form; params counted fused)")
    b.add_argument("--optimize", action="store_true",
                   help="the inference form (model.optimize()): --fuse, and batch norms and layer scales folded into "
                   "their convs and linears, activations into the linears before them (one oneDNN kernel on the CPU), "
                   "dropout removed; -o then writes its (other) state dict")
    b.set_defaults(func=cmd_build)

    i = sub.add_parser("info", help="the per-stage summary, memory estimate and input sizes (no torch)",
                       description="Print the per-stage summary of a model (parameters and MACs from the plan, "
                       "without torch: nothing is built or allocated, so any size works), the memory a build "
                       "needs and the input sizes it admits.")
    i.add_argument("target", metavar="TARGET")
    target_opts(i)
    i.add_argument("--build", action="store_true",
                   help="count the parameters of the model built on the meta device (imports torch; slower)")
    i.set_defaults(func=cmd_info)

    po = sub.add_parser("port", help="convert a reference (timm) checkpoint into this model's weights",
                        description="Map a local reference checkpoint onto a blueprint's model with the family's "
                        "<family>.port.yaml rename rules, print the report (matched, reshaped, skipped, missing, "
                        "unexpected) and write the weights as safetensors. Nothing is written (exit 2) when any "
                        "tensor is unaccounted for, or when (timm installed) timm's model loaded with the checkpoint "
                        "and the ported model disagree on a random input. A classifier of a different size (--num-classes) is skipped "
                        "and left initialised; the input conv is adapted to --in-chans as timm does. "
                        "TARGET: FILE[:MODEL] or a zoo model name.")
    po.add_argument("target", metavar="TARGET", help="FILE[:MODEL] or a zoo model name")
    po.add_argument("checkpoint", metavar="CHECKPOINT",
                    help="a local .safetensors, or a .pth/.bin state dict (read with weights_only=True; a top-level "
                    "'state_dict' or 'model' entry is unwrapped)")
    po.add_argument("--from", dest="source", metavar="SOURCE:MODEL",
                    help="the checkpoint's model, timm:NAME or torchvision:NAME (default: the blueprint's `reference`)")
    po.add_argument("-o", "--output", metavar="OUT.safetensors", required=True,
                    help="where to write the ported weights (atomically)")
    target_opts(po)
    memory_opt(po)
    po.add_argument("--tolerance", type=float, default=1e-4, help="the largest difference of the outputs of the "
                    "ported model and timm's, relative to max(1, max |timm's output|) (default 1e-4)")
    po.add_argument("--no-compare", dest="no_compare", action="store_true",
                    help="write without running timm's model to compare the outputs")
    po.add_argument("--seed", type=_int_in(0, MAX_SEED), default=0, help="initialisation seed for the tensors left re-initialised "
                    "(default 0)")
    po.set_defaults(func=cmd_port)

    ls = sub.add_parser("list", help="list ops, mixers, blocks or models (no torch)",
                        description="List the op library, the composite mixers and blocks of the standard "
                        "library, or the zoo's models, with their documented parameters.")
    ls.add_argument("what", choices=["ops", "mixers", "blocks", "models"])
    ls.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    ls.set_defaults(func=cmd_list)

    d = sub.add_parser("diff", help="what differs between two models: settings, structure, params and MACs per stage",
                       description="Compare two resolved architectures, aligned by stable paths (stages[2].depth: 6 -> 18), "
                       "with params and MACs per stage of each side and the delta. A and B: FILE[:MODEL] or zoo names. "
                       "Exit 0 identical, 1 different, 2 error (like diff(1)). No torch.")
    d.add_argument("a", metavar="A")
    d.add_argument("b", metavar="B")
    d.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    d.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the text output (auto: only on a terminal)")
    target_opts(d)
    d.set_defaults(func=cmd_diff)

    g = sub.add_parser("graph", help="draw the model as a block diagram (.svg, .pdf, .png, .dot, .mmd or .html)",
                       description="Draw a block diagram: stem, stages as groups, repeated blocks collapsed "
                       "(6 x metaformer(...)), branches and merges, tensor shapes on edges; every label whole. "
                       "The format follows the output's suffix (or --format). SVG and HTML need no system program; "
                       "PDF and PNG need matplotlib (pip install \"arch-composer[pictures]\"). No torch.")
    g.add_argument("target", metavar="TARGET")
    g.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="OUT.svg, OUT.pdf, OUT.png, OUT.dot, OUT.mmd or OUT.html")
    g.add_argument("--format", choices=["svg", "pdf", "png", "dot", "mmd", "html"],
                   help="the format, when the output's suffix does not say it")
    g.add_argument("--direction", choices=["TB", "LR"], default="TB",
                   help="the flow top to bottom (TB, the default) or left to right (LR)")
    g.add_argument("--expand", action="store_true", help="draw every block instead of collapsing repeats")
    g.add_argument("--open", action="append", metavar="NAME",
                   help="draw this stage, block or composite with its inside (its plan path: stages.2, "
                   "stages.2.blocks.0, stages.2.blocks.0.mlp); repeatable")
    target_opts(g)
    g.set_defaults(func=cmd_graph)

    ex = sub.add_parser("export", help="export to ONNX, a torch.export program or a standalone PyTorch file, "
                        "checked against eager",
                        description="Export a model to ONNX (torch.onnx's dynamo exporter; checked with onnxruntime), "
                        "to a torch.export program (.pt2; checked with torch.export.load) or to one readable PyTorch "
                        "file (.py: a class per block, flat forwards, no import of composer; imported back and given "
                        "the model's weights, whose state_dict keys it shares). The written file is run "
                        "on a fixed random input and compared with the eager model first: when they differ by more "
                        "than --tolerance nothing is written (exit 2). TARGET: FILE[:MODEL], a zoo model name or a "
                        "folder composer.save wrote (with its weights).")
    ex.add_argument("target", metavar="TARGET")
    ex.add_argument("--to", choices=["onnx", "pt2", "python"], required=True)
    ex.add_argument("-o", "--output", metavar="FILE", help="where to write it (default: MODEL.onnx, MODEL.pt2 or "
                    "MODEL.py here)")
    ex.add_argument("--dynamic", action="store_true", help="one program for every batch size and every admitted "
                    "input size (checked at a second size too)")
    ex.add_argument("--tolerance", type=float, default=1e-4, help="the largest difference from eager, relative to "
                    "max(1, max |eager output|) (default 1e-4)")
    target_opts(ex)
    ex.set_defaults(func=cmd_export)

    sh = sub.add_parser("show", help="print a zoo blueprint file to start from (no torch)",
                        description="Print the zoo's blueprint file that defines model NAME (or the zoo file NAME: "
                        "swin, lib/metaformer), or write it to FILE (atomically), to start a variant from. Its "
                        "imports of the standard library work from anywhere. No torch.")
    sh.add_argument("name", metavar="NAME", help="a zoo model (swin_t) or zoo file (swin, lib/metaformer)")
    sh.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead of standard output")
    sh.set_defaults(func=cmd_show)

    f = sub.add_parser("fmt", help="rewrite .arch files in the one canonical layout (--check: only report)",
                       description="Format .arch files (files or directories) in place, keeping every comment. "
                       "With --check nothing is written: exit 1 and a diff when a file would change. No torch.")
    f.add_argument("paths", nargs="+", metavar="PATH")
    f.add_argument("--check", action="store_true", help="report files that would change (exit 1) and print a diff")
    f.set_defaults(func=cmd_fmt)

    cv = sub.add_parser("convert", help="convert a blueprint between .arch and YAML, losslessly",
                        description="Convert a blueprint file to the other syntax (.arch <-> YAML); comments are "
                        "carried where the target can hold them. Writes to OUT (atomically) or standard output. No torch.")
    cv.add_argument("file", metavar="FILE")
    cv.add_argument("--to", choices=["yaml", "arch"], required=True)
    cv.add_argument("-o", "--output", metavar="OUT", help="output file (default: standard output)")
    cv.set_defaults(func=cmd_convert)

    sc = sub.add_parser("schema", help="print the JSON Schema of the YAML form, for YAML editors (no torch)",
                        description="Print (or write) the JSON Schema (draft 7) of YAML blueprints: the keys of "
                        "every mapping and the op names with their parameters, for the YAML extensions of "
                        "VS Code and Neovim (docs/yaml.md). No torch.")
    sc.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead of standard output")
    sc.set_defaults(func=cmd_schema)
    lp = sub.add_parser("lsp", help="run the language server for .arch files on stdin/stdout (no torch)",
                        description="A Language Server (LSP, over stdio) for editors: diagnostics, hovers with "
                        "shapes, completion, definitions, symbols. Needs the extra `lsp` (pygls).")
    lp.set_defaults(func=cmd_lsp)
    for command in sub.choices.values():  # `composer check x.arch --debug` as well as `composer --debug check ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show Python tracebacks for internal errors")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """A blueprint's warnings as the compiler's: their located text, nothing about Python."""
    if issubclass(category, ComposerWarning):
        print(str(message), file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except ComposerError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # an internal bug: one line, the traceback only on request
        if args.debug:
            import traceback  # only here: its imports are 1% of a check's start-up

            traceback.print_exc()
        print(f"composer: internal error: {type(exc).__name__}: {exc} (please report; --debug shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def run() -> None:
    """The `composer` program: `main()`, then exit without the interpreter's last work on memory.

    Python's exit runs full cyclic collections over every live object, then frees the modules and
    what they hold: for a check of the zoo, the parsed files, plans and caches it keeps (about
    220,000 objects), 0.3-0.4 s for the collections and 0.04 s for the freeing, with nothing to
    gain. Frozen first, the objects are left out of the collections; a command that never imported
    torch (the check path) then ends the process at once, its exit functions run and its output
    flushed, leaving the memory to the operating system. One that did exits as Python does,
    for torch's own clean-up."""
    code = main()
    gc.freeze()
    if "torch" not in sys.modules and hasattr(atexit, "_run_exitfuncs"):
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader that went away (`| head`), or a closed stream
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
