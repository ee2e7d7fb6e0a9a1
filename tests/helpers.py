"""Small helpers shared by the tests."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "m.arch") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
