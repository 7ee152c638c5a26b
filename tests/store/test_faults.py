"""Faults of the cache file and its disk, on damaged copies of a real cache: each gives one
BricklabError naming the file, its cause and the advice for it, and the store stays usable."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from core.errors import BricklabError
from core.store import Store, faults

BLOCK, HEADERS = 262144, 3 * 4096  # DuckDB's block size and its three header blocks
DAMAGES = ("empty", "4k", "half", "header", "block")


def damaged_copy(source: Path, folder: Path, how: str) -> Path:
    """A copy of the cache at `source`, damaged as `how` (one of DAMAGES) says."""
    path = folder / f"{how}.duckdb"
    shutil.copy(source, path)
    size = path.stat().st_size
    if how in ("empty", "4k", "half"):
        os.truncate(path, {"empty": 0, "4k": 4096, "half": size // 2}[how])
    elif how == "header":
        flip(path, 4096 + 16)  # inside the first database header, which carries a checksum
    elif how == "block":
        flip(path, HEADERS + (size - HEADERS) // BLOCK // 2 * BLOCK + 100)  # a data block in the middle
    return path


def flip(path: Path, offset: int, n: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def can_unshare() -> bool:
    """Whether this machine lets an unprivileged user namespace mount a tmpfs (no root needed)."""
    if not shutil.which("unshare"):
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def use(path: Path, run_id: str) -> None:
    """Open the cache, list its runs and read a run's arrays, as every page and command does."""
    store = Store(path)
    try:
        store.runs()
        store.prompt_activations(store.require_run(run_id).run_id)
    finally:
        store.close()


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_cache_names_the_file_and_the_doctor(small_run, tmp_path, how):
    source, run_id = small_run
    path = damaged_copy(source, tmp_path, how)
    with pytest.raises(BricklabError, match="is damaged") as err:
        use(path, run_id)
    assert str(path) in err.value.message
    assert "python -m core doctor" in err.value.hint
    assert "another process" not in str(err.value)


def test_an_empty_file_says_so(small_run, tmp_path):
    with pytest.raises(BricklabError, match="empty: 0 bytes"):
        Store(damaged_copy(small_run[0], tmp_path, "empty"))


def test_a_run_whose_arrays_cannot_be_read_is_not_listed_complete(small_run, tmp_path):
    source, run_id = small_run
    store = Store(damaged_copy(source, tmp_path, "block"))
    try:
        runs = store.runs()
        assert [r.run_id for r in runs] == [run_id]
        assert not runs[0].complete and runs[0].status == "damaged"
        with pytest.raises(BricklabError, match="doctor"):
            store.require_run()
    finally:
        store.close()


def read_only_connect(monkeypatch):
    """duckdb.connect as on a read-only file system: a writable open fails as DuckDB reports it."""
    real = duckdb.connect

    def connect(path, read_only=False, **kwargs):
        if not read_only:
            raise duckdb.IOException(f'IO Error: Cannot open file "{path}": Read-only file system')
        return real(path, read_only=True, **kwargs)

    monkeypatch.setattr(duckdb, "connect", connect)


def test_a_read_only_cache_opens_for_viewing_and_refuses_writes(small_run, tmp_path, monkeypatch):
    source, run_id = small_run
    path = tmp_path / "ro.duckdb"
    shutil.copy(source, path)
    read_only_connect(monkeypatch)
    store = Store(path)
    try:
        assert store.read_only
        assert [r.run_id for r in store.runs() if r.complete] == [run_id]
        assert store.prompt_activations(run_id).shape[0] == 21
        with pytest.raises(BricklabError, match="read-only") as err:
            store.put_json(run_id, "k", {}, 1)
        assert "--db" in err.value.hint and str(path) in err.value.message
    finally:
        store.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes files whatever their mode")
def test_a_file_without_write_permission_opens_read_only(small_run, tmp_path):
    path = tmp_path / "ro.duckdb"
    shutil.copy(small_run[0], path)
    path.chmod(0o444)
    store = Store(path)
    try:
        assert store.read_only and store.runs()
    finally:
        store.close()


class FullDiskCursor:
    """A cursor whose COMMIT fails as DuckDB's does on a full disk: the transaction is over, so a
    ROLLBACK after it raises "no transaction is active"."""

    def __init__(self, cur):
        self._cur = cur

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self._cur.execute("ROLLBACK")
            raise duckdb.TransactionException(
                "TransactionContext Error: Failed to commit: "
                'Could not write file "x.wal": No space left on device'
            )
        return self._cur.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._cur, name)


class FullDiskConnection:
    def __init__(self, con):
        self._con = con

    def cursor(self):
        return FullDiskCursor(self._con.cursor())

    def __getattr__(self, name):
        return getattr(self._con, name)


def test_a_full_disk_at_commit_says_so_and_leaves_the_store_usable(store, monkeypatch):
    store.put_json("r", "kept", {}, 1)
    monkeypatch.setattr(store, "_con", FullDiskConnection(store._con))
    with pytest.raises(BricklabError, match="is full") as err:
        store.put_result("r", "big", {}, b"x" * 3 * 2**20)
    assert "No space left on device" in err.value.message and "no transaction" not in str(err.value)
    assert "about 3.0 MiB" in err.value.hint and "resumes" in err.value.hint
    monkeypatch.undo()
    assert store.get_result("r", "big", {}) is None  # nothing half-written is visible
    store.put_json("r", "after", {}, 2)  # and the next write works
    assert store.get_json("r", "after", {}) == 2 and store.get_json("r", "kept", {}) == 1


FULL_DISK = textwrap.dedent(
    """
    import json, os, sys
    from core.errors import BricklabError
    from core.store import Store
    store = Store(sys.argv[1])
    store.put_json("r", "small", {}, 1)
    out = {}
    try:
        store.put_result("r", "big", {}, os.urandom(4 * 2**20))
    except BricklabError as exc:
        out["error"] = str(exc)
    out["big"] = store.get_result("r", "big", {}) is not None
    store.put_json("r", "after", {}, 2)
    out["after"] = store.get_json("r", "after", {})
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not can_unshare(), reason="no user namespaces to mount a small tmpfs without root")
def test_a_real_full_disk(tmp_path):
    """A 2 MiB tmpfs, mounted in a user namespace, fills up during a 4 MiB write."""
    mount = tmp_path / "small"
    mount.mkdir()
    script = f"mount -t tmpfs -o size=2m tmpfs {mount} && {sys.executable} -c '{FULL_DISK}' {mount}/c.duckdb"
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    out = __import__("json").loads(done.stdout.splitlines()[-1])
    assert "is full" in out["error"] and "No space left on device" in out["error"]
    assert out["big"] is False and out["after"] == 2


def test_causes_are_told_apart_by_errno_and_message():
    assert faults.kind(OSError(28, "No space left on device")) == faults.FULL
    assert faults.kind(OSError(30, "Read-only file system")) == faults.READ_ONLY
    assert (
        faults.kind(duckdb.IOException('Could not set lock on file "x": Conflicting lock')) == faults.LOCKED
    )
    assert faults.kind(duckdb.Error("Corrupt database file: computed checksum 1")) == faults.CORRUPT
    assert not faults.is_fault(duckdb.BinderException("Referenced column x not found"))


def test_a_wrong_statement_is_not_called_damage(store):
    with pytest.raises(duckdb.CatalogException), store.write() as cur:
        cur.execute("SELECT * FROM no_such_table")
    store.put_json("r", "after", {}, 1)  # rolled back, and the store goes on
    assert store.get_json("r", "after", {}) == 1
