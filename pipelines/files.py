"""Files that readers never see half-written: write beside the final path, then rename into place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(final: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file in `final`'s folder (created if missing), then rename it to `final`.

    A rename within one folder is atomic on POSIX: a reader sees the old file or the new one, never a part. A
    retried writer replaces its own file instead of adding a copy. The temporary name is hidden (`.name.*.tmp`),
    so globs such as `part-*.parquet` never match it; it is removed if `write` fails.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final
