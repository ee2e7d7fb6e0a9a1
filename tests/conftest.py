"""Shared pytest configuration: `--update-goldens` for golden-file tests, one torch thread per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# The parsed-file cache (composer/parse_cache.py) of this test session: a folder of its own, never
# the user's (commands the tests run inherit it); removed at the end.
if "COMPOSER_CACHE_DIR" not in os.environ:
    os.environ["COMPOSER_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="composer-test-cache.")
else:
    _CACHE = None


def pytest_sessionfinish(session, exitstatus):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        default=False,
        help="rewrite golden files (tests/data/**/*.expected) from the current output instead of comparing",
    )


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))


def check_golden(expected: Path, actual: str, update: bool) -> None:
    """The golden-file harness: rewrite `expected` with `actual` when `update`, else compare them exactly.
    It lives here, not in helpers.py, so that pytest rewrites its asserts (a failure shows the diff)."""
    if update:
        expected.write_text(actual, encoding="utf-8")
        return
    assert expected.is_file(), f"missing {expected.name}; run pytest with --update-goldens"
    assert actual == expected.read_text(encoding="utf-8")


@pytest.fixture
def golden(update_goldens: bool) -> Callable[[Path, str], None]:
    """`golden(expected_path, actual_text)`: compare with the golden file, or rewrite it under --update-goldens."""
    return lambda expected, actual: check_golden(expected, actual, update_goldens)


@pytest.fixture(autouse=True)
def _one_thread():
    """Test models are tiny: one intra-op thread is as fast, and far faster on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
