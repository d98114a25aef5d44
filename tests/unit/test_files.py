"""detector.utils.files: atomic writes."""

from __future__ import annotations

import os
import stat

import pytest

from detector.utils.files import atomic_write, atomic_write_csv


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")  # what open() gives under this process's umask
    atomic = tmp_path / "atomic.txt"
    atomic_write(atomic, lambda f: f.write(b"new"))
    assert atomic.read_bytes() == b"new"
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert not list(tmp_path.glob(".atomic.txt.*"))  # no temporary file left behind


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert not list(tmp_path.glob(".results.csv.*"))


def test_atomic_write_csv_writes_the_header_and_fills_missing_keys(tmp_path):
    path = tmp_path / "table.csv"
    atomic_write_csv(path, ["a", "b"], [{"a": "1", "b": "2"}, {"a": "3", "extra": "x"}])
    assert path.read_text() == "a,b\n1,2\n3,\n"
    atomic_write_csv(path, [], [])
    assert path.read_text() == ""
