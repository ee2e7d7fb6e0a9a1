"""The check path (check, list, load) works with torch made unimportable."""

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
