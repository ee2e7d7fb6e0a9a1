"""The README's zoo table is generated from the blueprints; this test fails when it is stale
(`python -m pytest tests/test_readme.py --update-goldens` rewrites it)."""

import re

from composer.catalog import listing, zoo_table
from helpers import REPO

BLOCK = re.compile(r"(<!-- zoo table:[^\n]*-->\n)(.*?)(<!-- zoo:end -->)", re.S)


def test_readme_zoo_table_is_current(update_goldens):
    readme = REPO / "README.md"
    text = readme.read_text()
    match = BLOCK.search(text)
    assert match, "README.md lost its zoo table markers"
    items = listing("models")
    table = zoo_table(items)
    if update_goldens:
        readme.write_text(text[:match.start(2)] + table + text[match.end(2):])
        return
    assert match.group(2) == table, "README's zoo table is stale: run pytest tests/test_readme.py --update-goldens"
    # every zoo model appears in it, and every family's paper
    for m in items:
        assert m["name"] in table
    assert table.count("\n") - 2 == len({m["file"] for m in items})
