"""Malformed input never ends in a traceback or a hang: random edits of real blueprints give
either a clean check (0) or a located user error (2), never an internal error (3)."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composer.cli import main
from helpers import REPO

SOURCES = [p.read_text() for p in sorted((REPO / "blueprints").glob("*.arch"))]
TOKENS = ["(", ")", "{", "}", "[", "]", ",", "=", "?", ":", ";", "\n", "0", "-1", "1.5", '"x"', "none", "as", "repeat",
          "stage", "let", "residual", "parallel", "conv", "attention", "window(0)", "heads", "from", "save", "**", "//",
          "99999", "alternate(1)", "linspace(0, 1)", "import \"lib/metaformer\""]


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SOURCES))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(1, 3))):
        pos = rng.randrange(len(text))
        action = rng.choice(["delete", "insert", "replace"])
        if action == "delete":
            text = text[:pos] + text[pos + rng.randint(1, 8):]
        elif action == "insert":
            text = text[:pos] + rng.choice(TOKENS) + text[pos:]
        else:
            words = text[pos:].split(None, 1)
            if words:
                text = text[:pos] + text[pos:].replace(words[0], rng.choice(TOKENS), 1)
    return text


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated())
def test_mutations_never_crash(tmp_path_factory, capsys, text):
    path = tmp_path_factory.mktemp("fuzz") / "m.arch"
    path.write_text(text)
    status = main(["check", str(path)])
    err = capsys.readouterr().err
    assert status in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err
