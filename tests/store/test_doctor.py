"""The doctor: which runs and results of a damaged cache read back, and their copy into a fresh file."""

import os
import shutil

import pytest

from core.errors import BricklabError
from core.store import Store, doctor
from tests.store.test_faults import damaged_copy, flip

MARKER = b"BRICKLAB-DOCTOR-TEST-PAYLOAD"


def with_damaged_result(source, folder):
    """A copy of the cache whose run gains a result, which is then damaged on disk. (DuckDB checks
    whole blocks, so results sharing the damaged block cannot be read either.)"""
    path = folder / "results.duckdb"
    shutil.copy(source, path)
    store = Store(path)
    run_id = store.runs()[0].run_id
    store.clear_results()  # results other tests cached on the shared run would share the block
    store.put_result(run_id, "lost", {}, MARKER + os.urandom(600_000))
    store.close()
    data = path.read_bytes()
    flip(path, data.index(MARKER) + 1000)  # inside the payload, away from the run's own tables
    return path, run_id


def copied(small_run, folder):
    """A private copy of the shared run's cache: other tests may hold the original open."""
    return shutil.copy(small_run[0], folder / "copy.duckdb")


def test_a_healthy_cache_is_healthy(small_run, tmp_path):
    found = doctor.check(copied(small_run, tmp_path))
    assert found.healthy and [r.run_id for r in found.runs] == [small_run[1]]


def test_damaged_results_are_left_behind_and_the_run_copied(small_run, tmp_path):
    path, run_id = with_damaged_result(small_run[0], tmp_path)
    found = doctor.check(path)
    assert not found.healthy and not found.cause
    (run,) = found.runs
    assert run.readable and run.results == [] and run.bad_results == 1
    fresh = tmp_path / "fresh.duckdb"
    assert doctor.recover(found, fresh) == 1
    store = Store(fresh)
    try:
        assert [(r.run_id, r.status) for r in store.runs()] == [(run_id, "complete")]
        assert store.get_result(run_id, "lost", {}) is None
        assert store.prompt_activations(run_id).shape[0] == 21
    finally:
        store.close()


@pytest.mark.parametrize("how", ("empty", "4k", "header"))
def test_a_file_that_does_not_open_has_nothing_readable(small_run, tmp_path, how):
    found = doctor.check(damaged_copy(small_run[0], tmp_path, how))
    assert found.cause and not found.runs and not found.healthy


def test_a_damaged_block_names_the_table(small_run, tmp_path):
    found = doctor.check(damaged_copy(small_run[0], tmp_path, "block"))
    assert found.cause or found.runs[0].bad_tables


def test_recover_never_overwrites(small_run, tmp_path):
    found = doctor.check(copied(small_run, tmp_path))
    taken = tmp_path / "taken.duckdb"
    taken.write_bytes(b"x")
    with pytest.raises(BricklabError, match="already exists"):
        doctor.recover(found, taken)
    assert taken.read_bytes() == b"x"
