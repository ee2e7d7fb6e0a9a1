"""The command line as a user meets it: output, exit codes, files written."""

import json

import pytest

from composer.cli import main, make_parser
from helpers import write


def run(argv, capsys):
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def test_build_swin_t_prints_timm_count(capsys):
    status, out, _ = run(["build", "swin_t"], capsys)
    assert status == 0
    assert "parameters: 28,288,354" in out
    assert "forward: input (1, 3, 224, 224) -> output (1, 1000)" in out
    assert "drop_path per block: 0.000 0.018" in out


def test_info_prints_the_build_count(capsys):
    status, out, _ = run(["info", "swin_t"], capsys)  # timm's count, from the plan (no torch: test_torch_free)
    assert status == 0 and "parameters: 28,288,354" in out and "counted from the plan" in out


def test_info_build_counts_on_the_meta_device(capsys):
    """`--build` counts a model built on the meta device: the same table, per section, as the plan's."""
    status, planned, _ = run(["info", "resnet18", "--img-size", "64"], capsys)
    assert status == 0
    status, built, _ = run(["info", "resnet18", "--img-size", "64", "--build"], capsys)
    assert status == 0 and "parameters: 11,689,512" in built  # torchvision's resnet18
    assert built.splitlines()[-1] == "(built on the meta device: no weights allocated)"
    assert built.splitlines()[:-1] == planned.splitlines()[:-1]


def test_info_on_a_billion_parameters_allocates_nothing():
    import subprocess
    import sys

    # vit_ti widened to 2048 channels and 24 blocks: 24 * 12 * 2048^2 weights ~ 1.2 billion (4.8 GB in float32)
    # the peak of this process's own memory: /proc's VmHWM where there is one (ru_maxrss keeps the
    # peak of the forked copy of the parent it was before exec: a pytest process grown by other tests)
    code = ("import resource, sys; from composer.cli import main; "
            "rc = main(['info', 'vit_ti', '--set', 'dim=2048', '--set', 'depth=24', '--set', 'heads=16']); "
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')] "
            "if sys.platform == 'linux' else []; "
            "print('maxrss_kb', hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    params = int(out.stdout.split("parameters: ")[1].split()[0].replace(",", ""))
    assert params > 1_000_000_000
    rss_kb = int(out.stdout.split("maxrss_kb ")[1])
    assert rss_kb < 1_500_000  # far below the 4.8 GB the weights would take


def test_build_writes_safetensors(tmp_path, capsys):
    from safetensors.torch import load_file

    target = tmp_path / "atto.safetensors"
    status, out, _ = run(["build", "convnext_atto", "--img-size", "64", "-o", str(target)], capsys)
    assert status == 0 and target.is_file()
    weights = load_file(target)
    assert weights["stem.patch_embed.proj.weight"].shape == (40, 3, 4, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["atto.safetensors"]  # no temporary file left


def test_failed_build_writes_nothing(tmp_path, capsys):
    target = tmp_path / "x.safetensors"
    status, _, err = run(["build", "swin_t", "--set", "win=5", "-o", str(target)], capsys)
    assert status == 2 and "window 5 does not divide feature size 56" in err
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_set_overrides(capsys):
    status, out, _ = run(["build", "convnext_atto", "--set", "depths=[1, 1, 1, 1]", "--num-classes", "10",
                          "--img-size", "64"], capsys)
    assert status == 0 and "(10)" in out


def test_list_models_json(capsys):
    status, out, _ = run(["list", "models", "--format", "json"], capsys)
    models = {m["name"]: m for m in json.loads(out)}
    assert models["swin_t"]["params"] == 28288354
    assert models["swin_t"]["reference"] == "timm:swin_tiny_patch4_window7_224"
    assert models["swin_t"]["paper"] == "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows (ICCV 2021)"


def test_list_ops_shows_docs(capsys):
    status, out, _ = run(["list", "ops"], capsys)
    assert status == 0
    assert "attention(heads = none, head_dim = none" in out
    assert "Multi-head attention over tokens, with pluggable parts." in out


def test_check_reports_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.arch"
    line = "model m { input image(3, 32); stem conv(8, 3, strid = 2) }"
    bad.write_text(line + "\n")
    status, _, err = run(["check", str(bad)], capsys)
    assert status == 2
    column = line.index("strid") + 1  # 1-based column of the misspelt keyword
    assert f"{bad}:1:{column}: error: 'conv' has no parameter 'strid'" in err
    assert "did you mean 'stride'?" in err


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


@pytest.mark.parametrize("command", ["check", "build", "info", "list"])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: composer " + command in out
    for action in make_parser()._subparsers._group_actions[0].choices[command]._actions:
        for flag in action.option_strings:
            assert flag in out


def test_ops_reference_is_current(capsys):
    from helpers import REPO

    status, out, _ = run(["list", "ops", "--format", "markdown"], capsys)
    assert status == 0
    assert (REPO / "docs" / "ops.md").read_text() == out, (
        "docs/ops.md is stale: run `composer list ops --format markdown > docs/ops.md`")


def test_a_layer_named_like_a_module_method_is_a_located_error(tmp_path, capsys):
    path = write(tmp_path, "model m {\n    input image(3, 16)\n    stem { conv(8, 3) as half; relu }\n}\n")
    assert main(["build", path]) == 2
    err = capsys.readouterr().err
    assert "m.arch:3:12: error: the layer name 'half' cannot be used" in err and "internal error" not in err


def test_the_program_exits_with_mains_status_its_objects_left_out_of_the_last_collections(monkeypatch):
    """`composer` (pyproject's script and `python -m composer`) is `cli.run`: main's exit status,
    with what the process made frozen first, so that Python's exit does not walk it again
    (0.3-0.4 s after a check of the zoo)."""
    import gc
    import tomllib
    from pathlib import Path

    from composer import cli

    scripts = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["composer"] == "composer.cli:run"
    monkeypatch.setattr(cli, "main", lambda: 2)
    assert gc.get_freeze_count() == 0
    try:
        with pytest.raises(SystemExit) as exc:
            cli.run()
        assert exc.value.code == 2
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_torch_free_command_ends_at_once_its_output_and_exit_functions_kept(tmp_path):
    """Without torch imported, `cli.run` ends the process itself after main (os._exit: no freeing of
    what the check kept): exit functions still run, output buffered for a pipe still arrives, the
    status is main's."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    bad = tmp_path / "bad.arch"
    bad.write_text("model m {\n    stem { conv(8,, }\n}\n")
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('exit functions ran'))\n"

            "from composer import cli\n"
            "sys.argv = ['composer', 'check', sys.argv[1], sys.argv[2]]\n"
            "cli.run()\n")
    swin = str(REPO / "blueprints" / "swin.arch")
    out = subprocess.run([sys.executable, "-c", code, swin, str(bad)], capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
                              "COMPOSER_NO_CACHE": "1"}, timeout=120)  # stdout buffered, as for a pipe
    assert out.returncode == 2, out.stderr
    assert out.stdout.count("ok  ") == 3 and out.stdout.rstrip().endswith("exit functions ran")
    assert "bad.arch:2:" in out.stderr and "Traceback" not in out.stderr
