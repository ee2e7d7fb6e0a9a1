"""`check` accepts exactly what `build` can build (issue 15, items 3, 4 and 8): every op parameter
has its range, refused at check time with a located message (driven from the op registry, so a
new op is covered); model settings and command-line values out of range are user errors (exit 2);
layer names that clash with torch's module attributes are refused; outputs that cannot be written
are user errors before any work; a signal during a write leaves no temporary file; YAML is read
without YAML 1.1's yes/no/on/off booleans and sexagesimal numbers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import typing
from itertools import count

import pytest

from composer import api, files
from composer.cli import main
from composer.diagnostics import ComposerError
from composer.ops import OPS
from composer.ops.registry import Op, plain_annotation
from composer.shapes import TensorRef
from helpers import REPO

_NAMES = count()


def run(tmp_path, capsys, stem: str, *extra, command="check", head: str = "", loss: str = "") -> tuple[int, str, str]:
    """`composer COMMAND` on a one-section model (a fresh file each time: the loader caches by path);
    `loss`: the model's objective, on line 3 before the stem (line 4 then)."""
    path = tmp_path / f"m{next(_NAMES)}.arch"
    objective = f"    loss = {loss}\n" if loss else ""
    path.write_text(f"{head}model m {{\n    input image(3, 8)\n{objective}    stem {{ {stem} }}\n}}\n")
    status = main([command, str(path), *extra])
    out = capsys.readouterr()
    return status, out.err, path.name


# ---- every op parameter: out of range at check time, located, naming the parameter ----------

def _classes(annotation) -> set:
    args = typing.get_args(annotation)
    return {c for a in args for c in _classes(a)} if args else {annotation}


def _valid(annotation) -> str:
    """A value of the right type inside every range (1, 0.5, [1], a saved tensor `t`, an op)."""
    ann = plain_annotation(annotation)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union:
        return _valid(next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        return f'"{args[0]}"' if isinstance(args[0], str) else str(args[0]).lower()
    if origin is list:
        return f"[{_valid(args[0])}]"
    return {int: "1", float: "0.5", str: '"x"', bool: "true", TensorRef: "t", Op: "identity()"}[ann]


def _call(cls, field: str, value: str) -> str:
    """`cls` called with its required arguments and `field = value`; a part inside the op that takes it."""
    args = [f"{k} = {value if k == field else _valid(f.annotation)}" for k, f in cls.model_fields.items()
            if f.is_required() or k == field]
    text = f"{cls.name}({', '.join(args)})"
    if cls.kind == "part":
        owner, slot = next((o, k) for o in OPS.values() if o.kind == "op" for k, f in o.model_fields.items()
                           if any(isinstance(c, type) and c is not Op and issubclass(cls, c)
                                  for c in _classes(f.annotation)))
        text = _call(owner, slot, text)
    return text


def _limits(field) -> list[tuple[str, object]]:
    """(sign, bound) of each constraint of a field (of its first constrained type: `Pos` of
    `Union[Pos, list[Pos]]`)."""
    found = []

    def walk(ann, meta):
        for m in meta:
            walk(None, getattr(m, "metadata", ()))
            found.extend((sign, getattr(m, key)) for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<="),
                                                                    ("lt", "<")) if getattr(m, key, None) is not None)
        for a in typing.get_args(ann) if ann is not None else ():
            if not found:
                walk(a, typing.get_args(a)[1:] if typing.get_origin(a) is typing.Annotated else ())

    walk(field.annotation, field.metadata)
    return found


def _outside(sign: str, bound) -> list:
    step = 1 if isinstance(bound, int) else 0.5
    return {">=": [bound - step, bound - 2 * step] if bound == 1 else [bound - step], ">": [bound],
            "<=": [bound + step], "<": [bound]}[sign]


RANGED = sorted(name for name, cls in OPS.items() if any(_limits(f) for f in cls.model_fields.values()))


def test_the_registry_has_ranges():
    # the ops whose sizes crashed the build in issue 15 are among the ranged ones
    assert {"conv", "pool", "patch_embed", "dropout", "conv_transpose", "deform_conv", "linear"} <= set(RANGED)
    assert len(RANGED) > 80


@pytest.mark.parametrize("name", RANGED)
def test_out_of_range_is_a_located_error_naming_the_parameter(tmp_path, capsys, name):
    cls = OPS[name]
    for field_name, field in cls.model_fields.items():
        plain = plain_annotation(field.annotation)
        arms = typing.get_args(plain) if typing.get_origin(plain) is typing.Union else (plain,)
        list_only = all(typing.get_origin(a) is list for a in arms if a is not type(None))
        for sign, bound in _limits(field):
            for bad in _outside(sign, bound):
                value = f"[{bad}]" if list_only else str(bad)
                if cls.kind == "loss":  # a loss is the model's objective, not a layer
                    status, err, file = run(tmp_path, capsys, "conv(4, 1)", loss=_call(cls, field_name, value))
                else:
                    status, err, file = run(tmp_path, capsys, f"conv(4, 1); save t; {_call(cls, field_name, value)}")
                assert status == 2, (name, field_name, value, err)
                assert f"{file}:3:" in err and f"argument '{field_name}' must be {sign} {bound}, got {bad}" in err, err
                assert "Traceback" not in err and "internal error" not in err


def test_conv_of_minus_one_has_no_parameter_count(tmp_path, capsys):
    status, err, _ = run(tmp_path, capsys, "conv(-1, 3)")
    assert status == 2 and "'conv' argument 'out' must be >= 1, got -1" in err
    assert "params" not in err
    status, err, _ = run(tmp_path, capsys, "conv(4, [3, 0])")  # one entry of a per-dim list
    assert status == 2 and "'kernel' must be >= 1, got 0 (entry 1 of [3, 0])" in err


@pytest.mark.parametrize("stem, message", [
    ("pool(3, stride = 2, padding = 5)", "pool padding 5 is more than half the kernel 3"),
    ("conv(4, 3); layernorm(1e309)", "too large: the result is inf"),  # refused by the evaluator first
    ("conv(make_divisible(4, 0), 1)", "make_divisible(): the divisor must be a positive int, got 0"),
    ("conv(4, 3); dropout(1.5)", "'dropout' argument 'p' must be <= 1.0, got 1.5"),
])
def test_values_torch_refuses_are_refused_at_check(tmp_path, capsys, stem, message):
    status, err, file = run(tmp_path, capsys, stem)
    assert status == 2 and f"{file}:3:" in err and message in err, err


def test_values_just_inside_the_ranges_build(tmp_path, capsys):
    stem = ("conv(4, 1, stride = 1, padding = 0, dilation = 1, groups = 1); pool(3, stride = 1, padding = 1); "
            "patch_embed(8, 1); dropout(1.0); layernorm(0.0); to_tokens(); class_token(1, std = 0.0)")
    status, err, _ = run(tmp_path, capsys, stem, command="build")
    assert status == 0, err


# ---- model settings, make_divisible and the command line --------------------------------------

BLOCK = "block rb(c) { residual { conv(c, 3) } }\n"


@pytest.mark.parametrize("rate, ok", [("5.0", False), ("-0.1", False), ("1.0", False), ("linspace(0, 1)", False),
                                      ("linspace(0, 0.2)", True), ("0.5", True)])
def test_drop_path_is_a_rate_below_one(tmp_path, capsys, rate, ok):
    path = tmp_path / f"d{next(_NAMES)}.arch"
    path.write_text(f"{BLOCK}model m {{\n    drop_path = {rate}\n    input image(3, 8)\n"
                    "    stem { conv(4, 3) }\n    stage { repeat 2 rb(4) }\n}\n")
    status = main(["check", str(path)])
    err = capsys.readouterr().err
    assert status == (0 if ok else 2), err
    if not ok:
        assert f"{path.name}:3:17: error: drop_path must be at least 0 and below 1" in err


@pytest.mark.parametrize("args, message", [
    (["--in-chans", "0"], "argument --in-chans: must be at least 1, got 0"),
    (["--in-chans", "-3"], "argument --in-chans: must be at least 1, got -3"),
    (["--num-classes", "-1"], "argument --num-classes: must be at least 0, got -1"),
    (["--img-size", "8", "0"], "argument --img-size: must be at least 1, got 0"),
    (["--seed", str(2**63)], f"argument --seed: must be from 0 to {2**63 - 1}, got {2**63}"),
    (["--seed", "-1"], "argument --seed: must be from 0 to"),
])
def test_command_line_values_out_of_range(tmp_path, capsys, args, message):
    path = tmp_path / "m.arch"
    path.write_text("model m {\n    input image(3, 8)\n    stem { conv(4, 3) }\n}\n")
    command = "build" if args[0] == "--seed" else "check"
    with pytest.raises(SystemExit) as exc:
        main([command, str(path), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_in_chans_reaches_the_input_or_is_refused(tmp_path):
    path = tmp_path / "m.arch"
    path.write_text("model m {\n    input image(3, 8)\n    stem { conv(4, 3) }\n}\n")
    assert api.load(str(path), in_chans=1).input.channels == 1  # was ignored for 0, taken for -3
    for bad in (0, -3):
        with pytest.raises(ComposerError, match="in_chans must be a positive int"):
            api.load(str(path), in_chans=bad)


@pytest.mark.parametrize("value, message", [
    ("9" * 1_000_000, "the value is 1,000,000 characters long; the limit is 1,000"),
    ("10**10", "repeat count must be an int from 0 to"),
])
def test_huge_set_values(tmp_path, capsys, value, message):
    path = tmp_path / "m.arch"
    path.write_text("model m(depth = 2) {\n    input image(3, 8)\n    stem { conv(4, 3) }\n"
                    "    stage { repeat depth conv(4, 3) }\n}\n")
    assert main(["check", str(path), "--set", f"depth={value}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err) < 2000


# ---- layer names ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["call", "training", "program", "_modules", "eval"])
def test_layer_names_torch_modules_use_are_refused_at_check(tmp_path, capsys, name):
    status, err, file = run(tmp_path, capsys, f"conv(4, 1) as {name}")
    assert status == 2 and f"{file}:3:12: error: the layer name '{name}' cannot be used" in err, err
    status, err, _ = run(tmp_path, capsys, "train(4)", head="block train(c) { conv(c, 1) }\n")  # a block's name
    assert status == 2 and "the layer name 'train' cannot be used" in err and "as NAME" in err


def test_the_reserved_names_are_torchs():
    """naming.RESERVED (torch-free) holds every public attribute of the modules that hold layers."""
    from composer.builder import Sequence
    from composer.naming import RESERVED

    seq = Sequence([], "stem")
    public = {a for a in set(dir(seq)) | set(vars(seq)) if not a.startswith("_")}
    assert public <= RESERVED, sorted(public - RESERVED)


# ---- outputs: unwritable paths, signals --------------------------------------------------------

def test_unwritable_outputs_are_user_errors(tmp_path, capsys, monkeypatch):
    model = tmp_path / "m.arch"
    model.write_text("model m {\n    input image(3, 8)\n    stem { conv(4, 3) }\n}\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv in (["build", str(model), "-o", str(blocker / "w.safetensors")],
                 ["port", str(model), str(tmp_path / "none.safetensors"), "--from", "timm:x", "-o",
                  str(blocker / "w.safetensors")],
                 ["graph", str(model), "-o", str(blocker / "g.svg")],
                 ["build", str(model), "-o", str(tmp_path)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error: cannot write" in err and "internal error" not in err, err

    def refuse(*a):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.os, "replace", refuse)  # fmt's rename refused (a read-only folder)
    source = tmp_path / "f.arch"
    source.write_text("model m  {\n input image(3,8)\n    stem { conv(4, 3) }\n}\n")
    assert main(["fmt", str(source)]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["f.arch", "file", "m.arch"]  # no temporary file left


SLOW_WRITE = """
import sys, time
import safetensors.torch as st
from composer.cli import main
save = st.save_file
def slow(state, path, *a, **k):  # a slow disk: the file is half-written when the signal comes
    save(state, path, *a, **k)
    print("writing", flush=True)
    time.sleep(30)
st.save_file = slow
sys.exit(main(["build", sys.argv[1], "-o", sys.argv[2]]))
"""


def test_sigterm_during_build_o_leaves_no_temporary_file(tmp_path):
    model = tmp_path / "m.arch"
    model.write_text("model m {\n    input image(3, 32)\n    stem { conv(256, 3); conv(256, 3) }\n}\n")  # 2.4 MB
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(model), str(out / "w.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "writing" not in line and proc.poll() is None:
            line = proc.stdout.readline()
        assert any(name.endswith(".tmp") for name in os.listdir(out))  # caught mid-write
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == 128 + signal.SIGTERM, proc.stderr.read()
    assert os.listdir(out) == []


# ---- YAML: the core schema's booleans and numbers -----------------------------------------------

@pytest.mark.parametrize("value, message", [("yes", "unknown name 'yes'"), ("on", "'on'"),
                                            ("1:30", "unexpected ':'")])
def test_yaml_1_1_spellings_are_not_booleans_or_numbers(tmp_path, capsys, value, message):
    path = tmp_path / "m.yaml"
    path.write_text(f"models:\n  m:\n    params: {{depth: {value}}}\n    input: 'image(3, 8)'\n"
                    "    stem: 'conv(4, 3)'\n    stages:\n      - body: [{repeat: depth, block: 'conv(4, 3)'}]\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path.name}:3:" in err and message in err, err


def test_yaml_core_values_still_read(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text("models:\n  m:\n    params: {depth: 2, bias: true, p: 0.5, off: false}\n"
                    "    input: 'image(3, 8)'\n    stem: ['conv(4, 3, bias = bias)', 'dropout(p)']\n"
                    "    stages:\n      - body: [{repeat: depth, block: 'conv(4, 3, bias = off)'}]\n")
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    # 4 * 27 + 4 (bias) in the stem, 2 * 4 * 36 (no bias) in the stage
    assert "400 params" in capsys.readouterr().out


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, True])
def test_python_build_refuses_a_seed_torch_cannot_take(seed):
    with pytest.raises(ComposerError, match="seed must be an int from 0 to 2\\^63 - 1"):
        api.build("resnet18", seed=seed)
