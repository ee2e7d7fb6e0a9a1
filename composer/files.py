"""Writing output files: atomically (a temporary file beside the target, then a rename), so a
reader or an interrupted run never sees a partial file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
