"""Atomic file writes: a reader (or a crash) never sees a half-written bundle or statistics file.

A write goes to a hidden temp file `.<name>.<8 random characters>.partial` in the target folder, is fsynced,
renamed over the target, and the folder is fsynced so the rename itself survives a power cut. The file gets the
permissions a plain open() would give it (the target's own mode when it replaces one, else 0666 minus the umask),
not mkstemp's 0600. A temp file left by a crash (power cut, killed process) is removed by remove_stale_partials,
which the node calls when it lists the folder.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

STALE_PARTIAL_SECONDS = 24 * 3600
# mkstemp's names: prefix, 8 characters from [a-z0-9_], suffix.
_PARTIAL = re.compile(r"^\..+\.[a-z0-9_]{8}\.partial$")
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # Linux: read it without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it (briefly, under a lock)
        old = os.umask(0o022)
        os.umask(old)
    return old


def _normal_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync_dir(folder: Path):
    """Make a rename in `folder` durable; not possible (and not needed) on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write to a temp file in the target folder, fsync, then rename over `path` (same file system, so the rename
    is atomic) and fsync the folder. On any failure, interrupts included, the temp file is removed and `path` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _normal_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_partials(folder, max_age_s: float = STALE_PARTIAL_SECONDS) -> list:
    """Delete temp files of interrupted atomic writes (hidden `*.partial` files named as atomic_write_bytes names
    them) older than max_age_s in `folder`; a younger one may belong to a write in progress. -> removed paths."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not _PARTIAL.match(e.name):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > max_age_s:
                os.unlink(e.path)
                removed.append(e.path)
        except OSError:
            continue
    return removed


def check_writable(folder, need_bytes: int):
    """Raise OSError-derived errors with a plain message unless a file of need_bytes can be written in `folder`:
    the folder is created if missing, a temp file is written and removed, and the free space is compared."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".calibatt-write-check.", suffix=".partial", dir=folder)
    try:
        os.write(fd, b"\0")
    finally:
        os.close(fd)
        os.unlink(tmp)
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OSError(28, f"{free / 2**20:.0f} MB free in {folder}, the bundle needs about "
                          f"{need_bytes / 2**20:.0f} MB")
