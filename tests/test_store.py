"""The DuckDB cache: schema, run look-ups and their errors, deletion, derived results, one writer."""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from core import store as store_module
from core.errors import BricklabError
from core.store import Run, Store


def add_run(s: Store, run_id: str, status: str = "complete", n_prompts: int = 2) -> None:
    row = {
        "run_id": run_id, "model_id": "m", "model_type": "llama", "fingerprint": "f", "prompt_set": "p",
        "prompt_hash": "h", "settings": "{}", "n_layers": 1, "d_ff": 4, "n_prompts": n_prompts, "n_chunks": 1,
        "categories": json.dumps(["math"]), "status": status,
    }  # fmt: skip
    with s.write() as cur:
        s.create_run(cur, row, [(i, f"id{i}", "math", f"text {i}") for i in range(n_prompts)])


def tables(s: Store) -> dict[str, list[str]]:
    sql = (
        "SELECT table_name, column_name FROM information_schema.columns ORDER BY table_name, ordinal_position"
    )
    rows = s.cursor().execute(sql).fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(table, []).append(column)
    return out


def test_schema_is_created_once_and_matches_the_run_record(tmp_path):
    s = Store(tmp_path / "c.duckdb")
    s.close()
    s = Store(tmp_path / "c.duckdb")  # opening again keeps the tables (CREATE ... IF NOT EXISTS)
    found = tables(s)
    s.close()
    assert set(found) == {"runs", *store_module.RUN_TABLES}
    assert set(Run.__dataclass_fields__) <= set(found["runs"])
    assert all("run_id" in columns for columns in found.values())


def test_require_run_errors(store):
    with pytest.raises(BricklabError, match="no complete captured run"):
        store.require_run()
    with pytest.raises(BricklabError, match="no run 'nope'"):
        store.require_run("nope")
    add_run(store, "half", status="incomplete")
    with pytest.raises(BricklabError, match="'half' is incomplete") as err:
        store.require_run("half")
    assert "Resume" in err.value.hint
    assert store.require_run("half", complete=False).status == "incomplete"
    with pytest.raises(BricklabError, match="no complete"):
        store.require_run()
    add_run(store, "done")
    run = store.require_run()
    assert run.run_id == "done" and run.complete and run.categories == ["math"] and run.settings == {}
    assert [p[1] for p in store.prompts("done")] == ["id0", "id1"]


def count(s: Store, table: str, run_id: str) -> int:
    return s.cursor().execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id]).fetchone()[0]


def test_delete_run_removes_every_row_of_that_run_only(small_run, tmp_path):
    path, run_id = small_run
    copy = tmp_path / "copy.duckdb"
    shutil.copy(path, copy)
    s = Store(copy)
    try:
        add_run(s, "other")
        s.put_result(run_id, "bricks", {"k": 1}, b"payload")
        filled = ("prompts", "tokens", "prompt_acts", "firing", "top_examples", "results")
        assert all(count(s, t, run_id) > 0 for t in filled)
        s.delete_run(run_id)
        assert all(count(s, t, run_id) == 0 for t in (*store_module.RUN_TABLES, "runs"))
        assert s.run(run_id) is None and [r.run_id for r in s.runs()] == ["other"]
        assert len(s.prompts("other")) == 2
    finally:
        s.close()


def test_results_round_trip(store):
    payload = np.arange(5, dtype=np.float32).tobytes()
    assert store.get_result("r", "map", {"a": 1, "b": [2, 3]}) is None
    store.put_result("r", "map", {"a": 1, "b": [2, 3]}, payload)
    assert store.get_result("r", "map", {"b": [2, 3], "a": 1}) == payload  # key order does not matter
    assert store.get_result("r", "map", {"a": 2, "b": [2, 3]}) is None
    assert store.get_result("r", "bricks", {"a": 1, "b": [2, 3]}) is None
    store.put_result("r", "map", {"a": 1, "b": [2, 3]}, b"newer")
    assert store.get_result("r", "map", {"a": 1, "b": [2, 3]}) == b"newer"
    assert store.cursor().execute("SELECT count(*) FROM results").fetchone()[0] == 1


def test_a_failed_write_changes_nothing(store):
    with pytest.raises(RuntimeError), store.write() as cur:
        cur.execute("INSERT INTO results (run_id, kind, params) VALUES ('r', 'k', '{}')")
        raise RuntimeError("killed halfway")
    assert store.cursor().execute("SELECT count(*) FROM results").fetchone()[0] == 0


def test_arrays_read_back_in_prompt_and_layer_order(store):
    add_run(store, "r", n_prompts=3)
    rows = [(p, layer) for p in (2, 0, 1) for layer in (0,)]  # inserted out of order
    with store.write() as cur:
        for p, layer in rows:
            cur.execute(
                "INSERT INTO prompt_acts VALUES ('r', ?, ?, ?)",
                [p, layer, np.full(4, p, np.float16).tobytes()],
            )
    acts = store.prompt_activations("r")
    assert acts.dtype == np.float16 and acts.shape == (3, 4)
    np.testing.assert_array_equal(acts[:, 0], [0, 1, 2])


HOLDER = (
    "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('open', flush=True); time.sleep(60)"
)


def test_a_file_held_by_another_process_gets_a_clear_error(tmp_path):
    path = tmp_path / "held.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"open"
        with pytest.raises(BricklabError, match="open in another process") as err:
            Store(path)
        assert "BRICKLAB_DB" in err.value.hint
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    Store(path).close()
