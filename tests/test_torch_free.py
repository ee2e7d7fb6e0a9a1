"""The check path (check, list, load, info, diff, graph) works with torch made unimportable."""

import json
import subprocess
import sys

from helpers import REPO

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_torch_is_really_blocked():
    out = run("import torch")
    assert out.returncode != 0 and "import of torch halted" in out.stderr


def test_check_without_torch():
    out = run("from composer.cli import main; sys.exit(main(['check', 'blueprints']))")
    assert out.returncode == 0, out.stderr
    assert "swin_t  28,288,354 params" in out.stdout


def test_list_without_torch():
    for what in ("ops", "mixers", "blocks", "models"):
        out = run(f"from composer.cli import main; sys.exit(main(['list', '{what}', '--format', 'json']))")
        assert out.returncode == 0, out.stderr
        items = json.loads(out.stdout)
        assert items, what
    out = run("from composer.cli import main; sys.exit(main(['list', 'models']))")
    assert "timm:swin_tiny_patch4_window7_224" in out.stdout


def test_load_without_torch():
    out = run("import composer; p = composer.load('caformer_s18'); print(p.params); "
              "assert 'torch' not in sys.modules or sys.modules['torch'] is None")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "26341656"


def test_schema_and_highlight_without_torch():
    """`composer schema` (composer/schema.py) and the Pygments lexer (composer/highlight.py)."""
    out = run("from composer.cli import main; sys.exit(main(['schema']))")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["definitions"]["op.conv"]["required"] == ["out"]
    out = run("import composer.highlight, composer.schema; composer.schema.json_schema(); "
              "print(sys.modules.get('torch'))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


# check-path modules that are imported on their own (not through the CLI's check): each must work
# with torch made unimportable
CHECK_PATH_MODULES = ["composer.lsp", "composer.lsp_check", "composer.lsp_facts", "composer.lsp_complete"]


def test_check_path_modules_without_torch():
    code = ("import importlib\n"
            f"for m in {CHECK_PATH_MODULES!r}: importlib.import_module(m)\n"
            "from composer.lsp import make_server\n"
            "from composer.lsp_check import Checker\n"
            "from composer.lsp_facts import hover\n"
            "from composer.lsp_complete import complete\n"
            "make_server()\n"
            "a = Checker().check('/tmp/t.arch', 'model t { input image(3, 8); stem { conv(4, 3) } }')\n"
            "print(a.problems, hover(a, 0, 44), len(complete(a.text, 0, 37, a.path, a.unit)) > 100)\n")
    out = run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[] **output** `(4, 8x8)`") and out.stdout.strip().endswith("True")


def test_info_diff_graph_without_torch(tmp_path):
    """`info` (unless --build), `diff` and `graph` read the plan only: torch is never imported."""
    cases = [(["info", "swin_t"], 0), (["diff", "swin_t", "swin_s"], 1),
             (["graph", "resnet18", "-o", str(tmp_path / "r.svg")], 0)]
    for argv, status in cases:
        out = run(f"from composer.cli import main; rc = main({argv!r}); "
                  "assert 'torch' not in sys.modules or sys.modules['torch'] is None; sys.exit(rc)")
        assert out.returncode == status, (argv, out.stderr)
    out = run("from composer.cli import main; sys.exit(main(['info', 'swin_t']))")
    assert "parameters: 28,288,354" in out.stdout and "counted from the plan" in out.stdout
    out = run("from composer.cli import main; sys.exit(main(['info', 'swin_t', '--build']))")
    assert out.returncode != 0  # a build needs torch
