"""Atomic writes: normal permissions, the folder fsynced after the rename, stale temp files of crashed saves
removed, and the pre-calibration writability / free-space check."""

import os
import stat
import time

import pytest

from calibatt.masks import atomic
from calibatt.masks.atomic import atomic_write_bytes, check_writable, remove_stale_partials


def test_new_file_gets_the_umask_mode_and_a_replaced_file_keeps_its_own(tmp_path):
    old = os.umask(0o027)
    try:
        p = atomic_write_bytes(tmp_path / "a.safetensors", b"one")
        assert stat.S_IMODE(p.stat().st_mode) == 0o640  # 0666 & ~027, not mkstemp's 0600
        os.chmod(p, 0o604)
        atomic_write_bytes(p, b"two")
        assert stat.S_IMODE(p.stat().st_mode) == 0o604 and p.read_bytes() == b"two"
    finally:
        os.umask(old)


def test_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", None))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


def test_stale_partials_are_removed_young_ones_and_other_files_kept(tmp_path):
    stale = tmp_path / ".wan.safetensors.ab12cd_9.partial"
    young = tmp_path / ".wan.safetensors.zz12cd_9.partial"
    other = tmp_path / "notes.partial"  # not our naming: never touched
    bundle = tmp_path / "wan.safetensors"
    for f in (stale, young, other, bundle):
        f.write_bytes(b"x")
    day_ago = time.time() - atomic.STALE_PARTIAL_SECONDS - 60
    os.utime(stale, (day_ago, day_ago))
    os.utime(other, (day_ago, day_ago))
    assert remove_stale_partials(tmp_path) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, other.name, bundle.name])
    assert remove_stale_partials(tmp_path / "missing") == []


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "folder", 1024)  # created
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())
    with pytest.raises(OSError, match="MB free"):
        check_writable(tmp_path, 1 << 62)
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        check_writable(blocker / "sub", 1)
