"""The check-result cache: what `composer check` printed for a blueprint file, kept on disk and
printed again while neither the file nor anything its check depends on has changed (as ruff and
mypy keep their results per file).

An entry is found by a hash of the file's path (as written and resolved), the check's options and
composer itself: the text of every module of the package, the grammar, Lark's and pydantic's
versions and Python's (that hash is kept beside the entries with the stamps of the files it
read, `composer.stamps`, and used again while they stay: a check reads none of them). It holds
what the check printed (stdout and stderr, in order) and what it read: the text hash and the
resolved path of the file and of every file it imports (depth first, under every path the
imports named: a file reached through two symlinked folders is listed under both), and the paths
an import looked in first and found nothing (a file put there later would be imported instead).
An entry is used only when every file still has its hash and resolves to the same file and
every such path is still empty; otherwise the file is checked again and the entry replaced. The
hashes kept are taken after the check, of files not changed since shortly before it began (the
racy rule below), so they are of the text the check read.

Only a check that succeeded without a warning is kept, a warning counted whether Python showed it
or not (a deprecation note is shown once per process and place, so it cannot be replayed
faithfully, and a check whose note was not shown this time would print it in another process):
an error is found by checking each time. Only
.arch files are cached. `COMPOSER_NO_CACHE=1` switches it off, with the parsed-file cache, whose
folder it shares (`check/` beside `parse/`; composer/parse_cache.py). Entries are JSON, never
code; a missing, stale, unreadable or corrupt entry is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

from .disk_cache import RACY_NS, folder, hash_files, real_path, write_entry
from .locate import GRAMMAR_DIR

FORMAT = b"composer-check-2\n"
MAX_ENTRY_BYTES = 4 * 1024 * 1024
_PACKAGE = Path(__file__).parent
_state: dict = {}  # "composer": the hash of composer's code and its front end's libraries


def composer_files() -> tuple[list[Path], list[str]]:
    """The files of composer's code, and of the front end's libraries those that hold their version
    (its __init__; pydantic's version.py, which also names the pydantic_core it needs), and the
    libraries not found."""
    import importlib.util

    files = sorted(_PACKAGE.rglob("*.py")) + sorted(GRAMMAR_DIR.glob("*.lark"))
    missing = []
    for lib in ("lark", "pydantic", "pydantic_core", "yaml", "networkx"):
        try:
            init = Path(importlib.util.find_spec(lib).origin)
        except (ImportError, AttributeError, TypeError, ValueError):
            missing.append(lib)
            continue
        files += [init] + [f for f in (init.parent / "version.py",) if f.is_file()]
    return files, missing


def _composer(where: Path | None = None) -> bytes:
    """The hash of everything besides the blueprints that decides a check (once per process). With
    a cache folder `where`, the hash its files had is kept there with their stamps (modification
    and change times, size, inode) and used again while every stamp is the same and none changed
    lately (the racy rule below): a check then reads no file of composer's code."""
    known = _state.get("composer")
    if known is not None:
        return known
    from . import __version__

    files, missing = composer_files()
    stamps = hashlib.sha256(FORMAT)
    stamps.update(f"{__version__}\0{sys.version}\0{missing}\0".encode())
    newest = 0
    try:
        for f in files:
            st = os.stat(f)
            stamps.update(f"{f}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_size}\0{st.st_ino}\0".encode())
            newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        where = None  # a file gone: hashed as missing below, nothing kept
    settled = time.time_ns() - newest >= RACY_NS
    record = where / "composer.stamps" if where is not None else None
    if record is not None and settled:
        try:
            data = record.read_bytes()
            if len(data) == 64 and data[:32] == stamps.digest():
                known = _state["composer"] = data[32:]
                return known
        except OSError:
            pass
    h = hashlib.sha256(FORMAT)
    h.update(f"{__version__}\0{sys.version}\0".encode())
    for lib in missing:
        h.update(f"\0no {lib}\0".encode())
    hash_files(h, files, lambda f: str(f.relative_to(_PACKAGE) if f.is_relative_to(_PACKAGE) else f.name))
    known = _state["composer"] = h.digest()
    if record is not None and settled:
        write_entry(where, record, stamps.digest() + known)
    return known


class CheckCache:
    """Entries for one `composer check` run with the options `options` (a string)."""

    def __init__(self, options: str):
        self.where = folder("check")
        self.options = options
        self._hashes: dict[str, str | None] = {}  # a file's text hash when the entries were looked up
        self._kept: dict = {}  # resolved path -> (its stamp, its text hash) as a stored entry took it

    def _entry(self, path: str, name) -> tuple[Path, bytes]:
        h = hashlib.sha256(_composer(self.where))
        h.update(f"{path}\0{real_path(path)}\0{name}\0{self.options}".encode("utf-8", "surrogatepass"))
        key = h.digest()
        return self.where / (key.hex()[:40] + ".json"), key

    def _hash(self, path: str) -> str | None:
        """The text hash of `path` at look-up (once per run: the entries are all looked up first)."""
        if path not in self._hashes:
            self._hashes[path] = _text_hash(path)
        return self._hashes[path]

    def usable(self, target) -> bool:
        path, name = target
        return self.where is not None and str(path).endswith(".arch") and (name is None or isinstance(name, str))

    def lookup(self, target) -> list | None:
        """What the check of `target` (path, model name or None) printed, if nothing changed since."""
        if not self.usable(target):
            return None
        entry, key = self._entry(str(target[0]), target[1])
        try:
            with open(entry, "rb") as fh:
                data = fh.read(MAX_ENTRY_BYTES + 1)
            if len(data) > MAX_ENTRY_BYTES or not data.startswith(FORMAT + key):
                return None
            found = json.loads(data[len(FORMAT) + len(key):].decode("utf-8"))
            deps, absent, events = found["deps"], found["absent"], found["events"]
            if any(self._hash(p) != h or real_path(p) != real for p, real, h in deps) \
                    or any(os.path.lexists(p) for p in absent):
                return None
            if all(s in (1, 2) and isinstance(t, str) for s, t in events):
                return events
        except Exception:  # noqa: BLE001 - missing, unreadable or corrupt: checked again
            return None
        return None

    @staticmethod
    def replay(events: list) -> int:
        for stream, text in events:
            (sys.stdout if stream == 1 else sys.stderr).write(text)
        return 0

    def record(self, target, check) -> int:
        """`check()` (it prints its output and returns its failures), its output kept when it
        succeeded without a warning."""
        if not self.usable(target):
            return check()
        from .diagnostics import warnings_issued

        events: list = []
        shown: list = []
        issued = warnings_issued()
        out, err, show = sys.stdout, sys.stderr, warnings.showwarning
        sys.stdout, sys.stderr = _Tee(1, out, events), _Tee(2, err, events)
        warnings.showwarning = lambda *a, **k: (shown.append(True), show(*a, **k))
        start = time.time_ns()
        try:
            failed = check()
        finally:
            sys.stdout, sys.stderr, warnings.showwarning = out, err, show
        if not failed and not shown and warnings_issued() == issued:
            self._store(target, events, start)
        return failed

    def _store(self, target, events: list, start: int) -> None:
        from .loader import RACY_NS, import_closure  # the loader's rule, read as the loader reads it

        path, name = str(target[0]), target[1]
        try:
            files, absent = import_closure(path)
            # hashed now, not at look-up (a file edited between its look-up and its check, in a long
            # folder's check, was read by the check as it is now), then the racy rule: a file
            # changed since shortly before the check began may not be what the check read (an edit
            # during it, or within the file system clock's tick): not kept, as git's racy rule
            deps = []
            for f, real in files:
                st = os.stat(real)
                if max(st.st_mtime_ns, st.st_ctime_ns) >= start - RACY_NS:
                    return
                deps.append((str(f), real, self._text_hash(real, st)))
            if any(h is None for _, _, h in deps):
                return
        except Exception:  # noqa: BLE001 - nothing kept
            return
        entry, key = self._entry(path, name)
        body = json.dumps({"deps": deps, "absent": [str(a) for a in absent], "events": events})
        data = FORMAT + key + body.encode("utf-8", "surrogatepass")
        if len(data) <= MAX_ENTRY_BYTES:
            write_entry(self.where, entry, data)

    def _text_hash(self, real: str, st) -> str | None:
        """The text hash of a file the check read, stamped `st` (not changed within RACY_NS before
        the check began), read once per run while its stamp stays (a library file imported by
        many): read, then its stamp taken again, so a file edited meanwhile is not kept."""
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        kept = self._kept.get(real)
        if kept is not None and kept[0] == stamp:
            return kept[1]
        text = _text_hash(real)
        after = os.stat(real)
        if (after.st_mtime_ns, after.st_size, after.st_ino, after.st_ctime_ns) != stamp:
            return None
        self._kept[real] = (stamp, text)
        return text


def _text_hash(path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


class _Tee:
    """Writes through to a stream and keeps what is written, in order, in `events`."""

    def __init__(self, stream: int, real, events: list):
        self.stream, self.real, self.events = stream, real, events

    def write(self, text: str) -> int:
        self.events.append((self.stream, text))
        return self.real.write(text)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name):  # encoding, errors, fileno, isatty ...: the real stream's
        return getattr(self.real, name)
