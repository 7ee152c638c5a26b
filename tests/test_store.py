"""The DuckDB cache: schema, run look-ups and their errors, deletion, derived results and their
codec, a capture's chunk rows, one writer."""

import io
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from core import store as store_module
from core.errors import BricklabError
from core.store import Run, Store, codec


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


# the codec of cached arrays and results

CODEC_ARRAYS = {
    "f16": np.array([0.5, -1.0, np.inf], np.float16),
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f64": np.array(np.pi),  # 0-d
    "i8": np.array([-128, 0, 127], np.int8),
    "i64": np.array([[2**40, -(2**40)]], np.int64),
    "u64": np.array([2**64 - 1], np.uint64),
    "bool": np.array([True, False, True]),
    "c64": np.array([1 + 2j], np.complex64),
    "big_endian": np.array([1, 256], ">i4"),
    "text": np.array(["Ġthe", "▁Paris"]),
    "empty": np.zeros(0, np.int32),
    "empty_2d": np.zeros((3, 0), np.float32),
    "strided": np.arange(20, dtype=np.int16).reshape(4, 5).T[::2],  # not contiguous
}


def test_codec_round_trips_dtypes_shapes_and_meta():
    meta = {"fingerprint": "abc", "shape": [2, 3], "p": [0.5, None], "nested": {"k": ["a"]}}
    arrays, back = codec.unpack(codec.pack(CODEC_ARRAYS, meta))
    assert back == meta and list(arrays) == list(CODEC_ARRAYS)
    for name, original in CODEC_ARRAYS.items():
        assert arrays[name].dtype == original.dtype and arrays[name].shape == original.shape, name
        np.testing.assert_array_equal(arrays[name], original)
    arrays["f32"][0, 0] = 7  # writeable, as np.load gave, and no other array shares its bytes
    assert arrays["f32"][0, 0] == 7 and arrays["i8"][0] == -128
    assert codec.unpack(codec.pack({})) == ({}, None)


def test_codec_refuses_what_it_cannot_store_or_read():
    with pytest.raises(ValueError, match="dtype object"):
        codec.pack({"bad": np.array([{}], dtype=object)})
    with pytest.raises(ValueError, match="dtype"):
        codec.pack({"record": np.zeros(2, dtype=[("a", "i4")])})
    npz = io.BytesIO()
    np.savez(npz, coords=np.zeros(3))  # a payload from before the codec
    with pytest.raises(ValueError, match="not a bricklab result payload"):
        codec.unpack(npz.getvalue())
    payload = codec.pack({"x": np.arange(100)})
    with pytest.raises(ValueError, match="truncated"):
        codec.unpack(payload[:-8])
    newer = payload[:4] + (codec.VERSION + 1).to_bytes(2, "little") + payload[6:]
    with pytest.raises(ValueError, match=f"format {codec.VERSION + 1}"):
        codec.unpack(newer)


def test_cached_arrays_round_trip_and_ignore_payloads_of_an_older_format(store):
    params = {"a": 1, "b": [2, 3]}
    npz = io.BytesIO()
    np.savez(npz, scores=np.ones(3))
    store.put_result("r", "functionality", params, npz.getvalue())  # as an older bricklab cached it
    assert store.get_arrays("r", "functionality", params) is None  # a miss: recomputed, never misread
    store.put_arrays("r", "functionality", params, {"scores": np.arange(3.0)}, {"n": 3})
    arrays, meta = store.get_arrays("r", "functionality", {"b": [2, 3], "a": 1})
    np.testing.assert_array_equal(arrays["scores"], [0, 1, 2])
    assert meta == {"n": 3}
    assert store.get_arrays("r", "functionality", {"a": 2, "b": [2, 3]}) is None
    assert store.get_arrays("r", "resident", params) is None


def test_json_results_stay_plain_json(store):
    assert store.get_json("r", "analysis.overlap", {"k": 1}) is None
    store.put_json("r", "analysis.overlap", {"k": 1}, {"matrix": [[1.0, None]], "names": ["a"]})
    assert store.get_json("r", "analysis.overlap", {"k": 1}) == {"matrix": [[1.0, None]], "names": ["a"]}
    raw = store.get_result("r", "analysis.overlap", {"k": 1})
    assert json.loads(raw) == {"matrix": [[1.0, None]], "names": ["a"]}  # caches of older versions still read


# the capture's chunk rows


def write_chunk(s: Store, chunk: int, n_tokens, partial: float = 1.0, acts_file=False) -> None:
    """A chunk of one prompt (prompt index = chunk) over one layer of 4 neurons, with 2 tokens."""
    s.write_chunk(
        "r", chunk, chunk,
        acts=[[np.full(4, chunk, np.float16)]], bits=[[np.zeros((2, 1), np.uint64)]],
        tokens={"prompt_idx": [chunk] * 2, "pos": [0, 1], "token_id": [5, 6], "token": ["Ġa", "b"],
                "truncated": [False, False]},
        partials=[(0, "sum_abs", np.full(4, partial))], n_tokens=n_tokens, seconds=0.5, acts_file=acts_file,
    )  # fmt: skip


def test_prompt_means_read_back_from_chunk_files_rows_or_both(store):
    """A partial sample's chunks write their prompt means to a file beside the cache; a run an older
    bricklab began has rows for its first chunks: either way every prompt reads back in order."""
    add_run(store, "r", status="incomplete", n_prompts=3)
    write_chunk(store, 2, n_tokens=2, acts_file=True)
    write_chunk(store, 0, n_tokens=2)  # rows, as before
    write_chunk(store, 1, n_tokens=2, acts_file=True)
    assert count(store, "prompt_acts", "r") == 1 and count(store, "chunk_files", "r") == 2
    assert store.chunk_files("r", "prompt_acts") == [
        (1, "prompt_acts-C000001.npy"),
        (2, "prompt_acts-C000002.npy"),
    ]
    folder = store.arrays_folder("r")
    (folder / "prompt_acts-C000009.npy").write_bytes(b"a file no transaction named")
    store.cursor().execute("UPDATE runs SET status = 'complete' WHERE run_id = 'r'")
    np.testing.assert_array_equal(store.prompt_activations("r"), np.repeat(np.arange(3), 4).reshape(3, 4))
    np.testing.assert_array_equal(store.prompt_activations("r", 0)[:, 1], [0, 1, 2])
    store.drop_chunks("r", [1], 1)  # a resume drops a chunk: its catalog row and its file go
    assert store.chunk_files("r", "prompt_acts") == [(2, "prompt_acts-C000002.npy")]
    assert sorted(p.name for p in folder.iterdir()) == ["prompt_acts-C000002.npy"]  # the stray one too
    with pytest.raises(BricklabError, match="damaged.*no mean activations"):
        store.prompt_activations("r")
    with pytest.raises(Exception, match="(?i)convert|cast"):  # its last statement fails: no row, and
        store.write_chunk(  # the file it wrote is deleted by the next prune (a capture's resume)
            "r", 1, 1, acts=[[np.ones(4, np.float16)]], bits=[[np.zeros((2, 1), np.uint64)]],
            tokens={"prompt_idx": [1], "pos": [0], "token_id": [5], "token": ["a"], "truncated": [False]},
            partials=[], n_tokens="not a number", seconds=0.5, acts_file=True,
        )  # fmt: skip
    assert count(store, "chunk_files", "r") == 1 and (folder / "prompt_acts-C000001.npy").exists()
    store.prune_arrays("r")
    assert sorted(p.name for p in folder.iterdir()) == ["prompt_acts-C000002.npy"]
    store.delete_run("r")
    assert not folder.exists()


def test_chunks_are_written_read_back_in_chunk_order_and_finished(store):
    add_run(store, "r", status="incomplete")
    assert store.chunk_totals("r") == (0, 0.0)
    write_chunk(store, 1, n_tokens=2, partial=2.0)  # committed out of order, as shards may be
    write_chunk(store, 0, n_tokens=2, partial=1.0)
    assert store.done_chunks("r") == {0, 1} and store.chunk_totals("r") == (4, 1.0)
    parts = store.chunk_partials("r", range(1))[0]
    assert list(parts) == ["sum_abs"] and store.chunk_partials("r", range(1, 3)) == {1: {}, 2: {}}
    assert [np.frombuffer(b, np.float64)[0] for b in parts["sum_abs"]] == [1.0, 2.0]  # chunk order
    assert store.prompt_tokens("r", [1, 0]) == {0: ["Ġa", "b"], 1: ["Ġa", "b"]}
    assert store.prompt_tokens("r", []) == {}
    # one top example: neuron (0, 0) at rank 0 peaks on prompt 1, position 1 (token "b")
    top = {name: np.array([v], np.int32) for name, v in (("layer", 0), ("neuron", 0), ("rank", 0))}
    top |= {"prompt_idx": np.ones(1, np.int32), "pos": np.ones(1, np.int32), "value": np.ones(1, np.float32)}
    means = np.array([0.25, 0.5, 0.75, 1.0], np.float32)
    store.finish_run("r", [(0, "mean_abs", means)], top, n_tokens=4, seconds=1.0)
    run = store.require_run("r")
    assert run.complete and run.n_tokens == 4 and run.seconds == 1.0
    np.testing.assert_array_equal(store.prompt_activations("r")[:, 0], [0, 1])
    assert store.firing_bits("r", 0).shape == (4, 1)
    assert store.chunk_partials("r", range(1)) == {0: {}}  # partials are dropped once summed
    np.testing.assert_array_equal(store.layer_array("r", "mean_abs"), [means])
    assert store.neuron_stats("r", 0, 2) == {"mean_abs": 0.75}
    assert store.neuron_examples("r", 0, 0) == [(0, 1, "id1", "math", 1, 1.0)]
    assert store.search_tokens("r", "b", exact=True, limit=5) == [(0, 0, 1, 1, 1.0)]


def test_a_chunk_that_fails_halfway_leaves_no_row(store):
    add_run(store, "r", status="incomplete")
    with pytest.raises(Exception, match="(?i)convert|cast"):
        write_chunk(store, 0, n_tokens="not a number")  # its last statement fails
    assert store.done_chunks("r") == set()
    assert all(count(store, t, "r") == 0 for t in ("prompt_acts", "firing", "tokens", "chunk_arrays"))


def test_prompt_text(store):
    add_run(store, "r")
    assert store.prompt_text("r", 1) == "text 1" and store.prompt_text("r", 5) is None


def test_clear_results_forgets_one_run_or_all(store):
    for run_id in ("a", "b"):
        store.put_json(run_id, "report", {"k": 1}, {"run": run_id})
    store.clear_results("a")
    assert store.get_json("a", "report", {"k": 1}) is None
    assert store.get_json("b", "report", {"k": 1}) == {"run": "b"}
    store.clear_results()
    assert store.get_json("b", "report", {"k": 1}) is None
