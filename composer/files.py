"""Files: reading a blueprint safely (a regular file, size-capped, never blocking on a FIFO or
reading a device) and writing outputs atomically (a temporary file beside the target, then a
rename), so a reader or an interrupted run never sees a partial file."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import tempfile
import threading
from pathlib import Path

from .diagnostics import ComposerError, error
from .locate import BLUEPRINTS_DIR

MAX_SOURCE_BYTES = 4 * 1024 * 1024  # a blueprint of the zoo is under 10 KB; a 4 MB one is an accident


def read_source(path: str | Path, limit: int = MAX_SOURCE_BYTES) -> str:
    """The UTF-8 text of the regular file `path`. A FIFO, a device, a folder or a file over `limit`
    bytes is a located user error (opened without blocking, checked before reading)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error("io", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error("io", f"cannot read {path}: not a regular file", None,
                        "blueprints are plain .arch or .yaml files")
        if info.st_size > limit:
            raise error("io", f"{path} is {info.st_size:,} bytes; blueprints are limited to {limit:,}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error("io", f"{path} is over {limit:,} bytes; blueprints are limited to {limit:,}")
    try:  # newlines as Python's text mode reads them (\r\n and \r become \n)
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise error("io", f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | Path) -> None:
    """A user error now, before any work, when `path` cannot be a file we write: a folder, below
    something that is not a folder, or in a folder we may not write."""
    path = Path(path)
    if path.is_dir():
        raise error("io", f"cannot write {path}: it is a folder", None, "name a file")
    folder = next((p for p in path.parents if p.exists()), Path("."))
    if not folder.is_dir():
        raise error("io", f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error("io", f"cannot write {path}: {folder} is not writable")


class _Terminated(SystemExit):
    """SIGTERM (or SIGHUP) while a file is written: unwinds like Ctrl-C, so the temporary file is
    removed, then exits with the signal's status (128 + signal)."""


def _on_signal(signum, frame):
    raise _Terminated(128 + signum)


def write_atomic(path: str | Path, data: str | bytes | None = None, *, writer=None) -> None:
    """Write `data` (text is UTF-8, newlines as given) to `path` through a temporary file in the
    same folder, then rename it over `path`. `writer(tmp_path)` writes the file instead of `data`
    (safetensors' `save_file`). The file keeps the mode of the file it replaces; a new file gets
    the mode the umask allows (mkstemp alone would leave 0600). The temporary file is removed on
    any failure, on Ctrl-C (KeyboardInterrupt) and on SIGTERM or SIGHUP (their handlers raise
    while the file is written). A path that cannot be written is a user error (exit 2)."""
    path = Path(path)
    check_writable(path)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
            if sig is not None:
                handlers[sig] = signal.signal(sig, _on_signal)
    try:
        _write(path, data, writer)
    except OSError as exc:
        raise error("io", f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


def _write(path: Path, data, writer) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(folder))
    try:
        if writer is None:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        else:
            os.close(fd)
            writer(tmp)
        try:
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def blueprint_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The .arch and YAML blueprints of a folder; `*.port.yaml` files are weight maps, not blueprints.
    A link that leads out of the folder is left out (checking a folder reads nothing outside it);
    a FIFO or device with a blueprint's name is listed, and refused when read."""
    find = folder.rglob if recursive else folder.glob
    root = folder.resolve()

    def inside(p: Path) -> bool:
        real = p.resolve()
        return real == root or root in real.parents

    arch = sorted(p for p in find("*.arch") if inside(p))
    yaml = sorted(p for pattern in ("*.yaml", "*.yml") for p in find(pattern)
                  if not p.name.endswith(".port.yaml") and inside(p))
    return arch + yaml


def is_saved_folder(folder) -> bool:
    """Whether `folder` is a folder `composer.save` wrote: its config.json has a "composer" section
    (composer/saved.py)."""
    config = Path(folder) / "config.json"
    if not Path(folder).is_dir() or not config.is_file():
        return False
    try:
        return isinstance(json.loads(read_source(config)).get("composer"), dict)
    except (ValueError, AttributeError, ComposerError):
        return False


def zoo_file_of(model: str) -> Path | None:
    """The zoo's family file that defines `model` (a textual search of the zoo's .arch files: no
    parsing, for hints, `composer show` and a cached `composer check NAME`), or None."""
    pattern = re.compile(rf"^[ \t]*model[ \t]+{re.escape(model)}\b", re.M)
    for path in sorted(BLUEPRINTS_DIR.glob("*.arch")):
        if pattern.search(read_source(path)):
            return path
    return None
