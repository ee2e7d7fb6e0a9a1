"""Where the grammar and the zoo live: inside the installed package, or beside it in a checkout."""

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    inside = _HERE / name  # a wheel puts grammar/ and blueprints/ inside the package
    return inside if inside.is_dir() else _HERE.parent / name


GRAMMAR_DIR = _find("grammar")
BLUEPRINTS_DIR = _find("blueprints")
