"""detector.utils.files: atomic writes, run folders."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from detector.utils.files import atomic_write, atomic_write_csv, increment_path


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


def test_increment_path_numbers_past_the_highest_taken(tmp_path):
    base = tmp_path / "runs" / "exp"
    assert [increment_path(base).name for _ in range(3)] == ["exp", "exp2", "exp3"]
    (tmp_path / "runs" / "exp2").rmdir()
    assert increment_path(base).name == "exp4"  # never an older number in between
    assert increment_path(base, exist_ok=True) == base
    assert increment_path(base, mkdir=False).name == "exp5" and not (tmp_path / "runs" / "exp5").exists()
    dangling = tmp_path / "other" / "exp"
    dangling.parent.mkdir()
    dangling.symlink_to(tmp_path / "nowhere")  # a broken link still takes the name
    assert increment_path(dangling).name == "exp2"


def _claim(base, barrier, names):
    barrier.wait()
    names.put(increment_path(base).name)


@pytest.mark.skipif(os.name == "nt", reason="fork")
def test_runs_started_at_the_same_moment_each_get_their_own_folder(tmp_path):
    """A shell loop starting trainings with '&': each must claim a folder of its own, not share one."""
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        base = tmp_path / str(round_) / "exp"
        if round_ % 2:
            base.mkdir(parents=True)  # the numbered names race too
        barrier, names = context.Barrier(6), context.Queue()
        workers = [context.Process(target=_claim, args=(base, barrier, names)) for _ in range(6)]
        for worker in workers:
            worker.start()
        claimed = [names.get(timeout=30) for _ in workers]
        for worker in workers:
            worker.join(timeout=30)
        assert len(set(claimed)) == 6, claimed
