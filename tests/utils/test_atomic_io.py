"""ovd.utils.io: atomic_open / atomic_write replace the file only on success and never leave a temporary."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from ovd.utils.io import DiskFullError, atomic_open, atomic_write


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_success_replaces_the_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with atomic_open(target) as f:
        f.write("new")
    atomic_write(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"\x01\x02"))
    assert target.read_text() == "new"
    assert (tmp_path / "b.bin").read_bytes() == b"\x01\x02"
    assert _names(tmp_path) == ["a.txt", "b.bin"]


@pytest.mark.parametrize("kind", ["open", "write"])
def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path, kind):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(ValueError, match="boom"):
        if kind == "open":
            with atomic_open(target) as f:
                f.write("half")
                raise ValueError("boom")
        else:

            def writer(tmp: str) -> None:
                Path(tmp).write_text("half")
                raise ValueError("boom")

            atomic_write(target, writer)
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["a.txt"]


@pytest.mark.parametrize("kind", ["open", "write"])
def test_a_full_disk_raises_disk_full_error_naming_the_file(tmp_path, kind):
    target = tmp_path / "a.txt"
    target.write_text("old")
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFullError, match="a.txt") as info:
        if kind == "open":
            with atomic_open(target):
                raise full
        else:
            atomic_write(target, lambda tmp: (_ for _ in ()).throw(full))
    assert info.value.__cause__ is full
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["a.txt"]
