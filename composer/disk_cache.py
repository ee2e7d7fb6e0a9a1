"""Where composer keeps its caches on disk (the parsed-file cache, composer/parse_cache.py, and the
check-result cache, composer/check_cache.py), and how an entry is written: atomically, never
partly, the folder kept bounded. Imports nothing of composer: a cached check starts fast."""

from __future__ import annotations

import os
from pathlib import Path

RACY_NS = 2_000_000_000  # a file changed this recently may change again within its clock's tick
MAX_ENTRIES = 4096  # above this many entries, the oldest half are removed (once per process, on a write)
_pruned: set = set()  # the folders pruned in this process


def folder(kind: str = "parse") -> Path | None:
    """The folder of a cache (`parse`, or `check`: composer/check_cache.py), or None when switched
    off (`COMPOSER_NO_CACHE` set to anything but 0)."""
    if os.environ.get("COMPOSER_NO_CACHE", "") not in ("", "0"):
        return None
    base = os.environ.get("COMPOSER_CACHE_DIR")
    if base:
        return Path(base) / kind
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "composer" / kind


def real_path(path: str | Path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return os.path.abspath(str(path))


def write_entry(where: Path, entry: Path, data: bytes) -> None:
    """Write a cache entry atomically (a temporary file, then a rename), with the mode the umask
    gives; any failure (read-only or full disk, a file in the folder's place) leaves no entry
    behind. The first write of a process keeps the folder bounded (`_prune`)."""
    tmp = None
    try:
        where.mkdir(parents=True, exist_ok=True)
        if where not in _pruned:
            _pruned.add(where)
            _prune(where)
        tmp = where / f".{entry.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, entry)
        tmp = None
    except Exception:  # noqa: BLE001 - the cache is an optimisation: a failed write costs nothing else
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _prune(where: Path) -> None:
    """Keep the folder bounded: over MAX_ENTRIES entries, remove the least recently written half."""
    with os.scandir(where) as it:
        entries = [e for e in it if e.name.endswith((".pickle", ".json", ".tmp"))]
    if len(entries) <= MAX_ENTRIES:
        return
    dated = []
    for e in entries:
        try:
            dated.append((e.stat().st_mtime_ns, e.path))
        except OSError:
            pass
    dated.sort()
    for _, p in dated[: len(dated) - MAX_ENTRIES // 2]:
        try:
            os.unlink(p)
        except OSError:
            pass


def hash_files(h, files, label) -> None:
    """Feed hash `h` each file's `label(file)` and its bytes (a mark for a file that cannot be read):
    the code and data a cached result depends on."""
    for f in files:
        h.update(label(f).encode() + b"\0")
        try:
            h.update(f.read_bytes())
        except OSError:
            h.update(b"\0missing\0")
