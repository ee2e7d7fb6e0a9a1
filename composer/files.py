"""Files: reading a blueprint safely (a regular file, size-capped, never blocking on a FIFO or
reading a device) and writing outputs atomically (a temporary file beside the target, then a
rename), so a reader or an interrupted run never sees a partial file."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .diagnostics import error

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


def write_atomic(path: str | Path, data: str | bytes | None = None, *, writer=None) -> None:
    """Write `data` (text is UTF-8, newlines as given) to `path` through a temporary file in the
    same folder, then rename it over `path`. `writer(tmp_path)` writes the file instead of `data`
    (safetensors' `save_file`). The file keeps the mode of the file it replaces; a new file gets
    the mode the umask allows (mkstemp alone would leave 0600). The temporary file is removed on
    any failure, KeyboardInterrupt included."""
    path = Path(path)
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
