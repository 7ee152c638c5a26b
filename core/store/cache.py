"""The DuckDB cache: one file, one schema, `?` parameters, results as numpy arrays.

Arrays are stored as BLOBs per (run, prompt, layer) so a whole run reads back as one contiguous
buffer. DuckDB has one writer per process: writes go through `Store.write()`, which serialises
them; every thread reads through its own cursor.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from core import settings
from core.errors import BricklabError
from core.store import codec, doctor, faults
from core.store.arrays import ArrayFiles
from core.store.chunks import ChunkTables
from core.store.queries import NeuronQueries
from core.store.schema import DAMAGED, RUN_COLUMNS, RUN_TABLES, SCHEMA, Run, to_run

CHECKPOINT_THRESHOLD = "1GB"


class Store(ChunkTables, NeuronQueries, ArrayFiles):
    """One DuckDB file; safe to share between threads (each call uses its own cursor).

    The capture's chunk writes, the neuron and token queries and the bulk array files live in
    mixins, so that each module stays short.
    """

    def __init__(self, path: str | Path | None = None, read_only: bool = False):
        """Open (or create) the cache; a read-only file or file system opens read-only for viewing."""
        self.path = Path(path) if path else settings.db_path()
        self.read_only = read_only
        self._con = self._connect()
        self._write_lock = threading.RLock()
        self._run_locks: dict[str, threading.Lock] = {}
        self._readable: dict[tuple, bool] = {}  # (run_id, finished) -> its rows all read back
        if not self.read_only:
            try:
                self._con.execute(SCHEMA)
                # DuckDB checkpoints its WAL into the file every 16 MB by default: on an 8B shape that was
                # each chunk of a capture, 1.6 s of commit against 0.5 s with 4GB (H200, benchmarks/
                # gpu_capture.py --diagnose); fewer rewrites of growing row groups also leave fewer free
                # blocks. Closing the store checkpoints whatever is left.
                self._con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            except duckdb.Error as exc:
                self._con.close()
                raise faults.cache_error(self.path, exc) from exc

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self.path.is_file() and self.path.stat().st_size == 0:
            # DuckDB's "not a valid DuckDB database file" would hide that nothing was ever written
            raise faults.corrupt_error(self.path, "the file is empty: 0 bytes")
        try:
            if not self.read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            return duckdb.connect(str(self.path), read_only=self.read_only)
        except (duckdb.Error, OSError) as exc:
            if self.read_only or faults.kind(exc) != faults.READ_ONLY or not self.path.is_file():
                raise faults.cache_error(self.path, exc) from exc
            error = exc
        try:  # a read-only file still lists and shows its runs; writes say why they cannot happen
            con = duckdb.connect(str(self.path), read_only=True)
        except duckdb.Error as exc:
            raise faults.cache_error(self.path, exc) from error
        self.read_only = True
        return con

    def close(self) -> None:
        try:
            self._con.close()
        except duckdb.Error as exc:  # the final checkpoint can meet a full disk too
            raise faults.cache_error(self.path, exc) from exc

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return self._con.cursor()

    @contextmanager
    def write(self, needs: int | None = None):
        """One transaction, one writer at a time; rolled back whole on any error or kill.

        `needs`: the bytes the transaction writes, for the advice when the disk is full. A DuckDB or
        OS error becomes a `BricklabError`; the store stays usable and shows nothing of the write.
        """
        if self.read_only:
            raise faults.read_only_error(self.path)
        with self._write_lock:
            cur = self._con.cursor()
            try:
                cur.execute("BEGIN TRANSACTION")
                try:
                    yield cur
                except BaseException:
                    _rollback(cur)
                    raise
                try:
                    cur.execute("COMMIT")
                except duckdb.Error:
                    # a failed COMMIT has ended the transaction already; the ROLLBACK only makes sure
                    _rollback(cur)
                    raise
            except (duckdb.Error, OSError) as exc:
                if not faults.is_fault(exc):
                    raise
                raise faults.cache_error(self.path, exc, needs) from exc
            finally:
                cur.close()

    @contextmanager
    def run_lock(self, run_id: str):
        """Held while one thread computes a run, so a second request waits and then hits the cache."""
        with self._write_lock:
            lock = self._run_locks.setdefault(run_id, threading.Lock())
        with lock:
            yield

    # runs

    @faults.guarded
    def run(self, run_id: str) -> Run | None:
        row = self.cursor().execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return to_run(row) if row else None

    @faults.guarded
    def runs(self) -> list[Run]:
        """Every run, newest first; a complete run whose rows cannot all be read is listed as damaged."""
        rows = self.cursor().execute(f"SELECT {RUN_COLUMNS} FROM runs ORDER BY created DESC").fetchall()
        return [self._checked(to_run(r)) for r in rows]

    def _checked(self, run: Run) -> Run:
        """The run, or a copy marked damaged when its rows do not read back (checked once per run)."""
        if not run.complete:
            return run
        key = (run.run_id, run.finished)
        if key not in self._readable:
            self._readable[key] = not doctor.unreadable_tables(self.cursor(), run.run_id)
        return run if self._readable[key] else replace(run, status=DAMAGED)

    @faults.guarded
    def require_run(self, run_id: str | None = None, complete: bool = True) -> Run:
        """The named run, or the newest complete one; a clear error when there is none."""
        if run_id is None:
            runs = self.runs()
            done = [r for r in runs if r.complete]
            if not done and any(r.status == DAMAGED for r in runs):
                raise faults.corrupt_error(self.path, "no complete run reads back whole")
            if not done:
                raise BricklabError(
                    "There is no complete captured run yet.", "Capture one first: `python -m core capture`."
                )
            return done[0]
        run = self.run(run_id)
        if run is not None and complete and self._checked(run).status == DAMAGED:
            raise faults.corrupt_error(self.path, f"rows of run '{run_id}' cannot be read")
        if run is None:
            raise BricklabError(
                f"There is no run '{run_id}' in the cache.", "List runs with `python -m core runs`."
            )
        if complete and not run.complete:
            raise BricklabError(
                f"Run '{run_id}' is incomplete (its capture was interrupted).",
                "Resume it by running the same capture again.",
            )
        return run

    def create_run(self, cur, run: dict, prompts: list[tuple]) -> None:
        cols = ", ".join(run)
        cur.execute(f"INSERT INTO runs ({cols}) VALUES ({', '.join('?' * len(run))})", list(run.values()))
        self.insert(
            cur,
            "prompts",
            {
                "run_id": [run["run_id"]] * len(prompts),
                "prompt_idx": pa.array([p[0] for p in prompts], pa.int32()),
                "prompt_id": [p[1] for p in prompts],
                "category": pa.array([p[2] for p in prompts], pa.string()),
                "text": [p[3] for p in prompts],
            },
        )

    @faults.guarded
    def delete_run(self, run_id: str) -> None:
        with self.write() as cur:
            for table in RUN_TABLES:
                cur.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            cur.execute("DELETE FROM runs WHERE run_id = ?", [run_id])
        self.prune_arrays(run_id)

    # bulk inserts

    @staticmethod
    def insert(cur, table_name: str, columns: dict) -> None:
        """Insert columns (name -> list or pyarrow array) through Arrow, in column order."""
        table = pa.table(columns)
        cur.register("_incoming", table)
        try:
            cur.execute(f"INSERT INTO {table_name} ({', '.join(columns)}) SELECT * FROM _incoming")
        finally:
            cur.unregister("_incoming")

    # reads

    @faults.guarded
    def prompts(self, run_id: str) -> list[tuple]:
        sql = "SELECT prompt_idx, prompt_id, category, text FROM prompts WHERE run_id = ? ORDER BY prompt_idx"
        return self.cursor().execute(sql, [run_id]).fetchall()

    @faults.guarded
    def prompt_activations(self, run_id: str, layer: int | None = None) -> np.ndarray:
        """Mean |a| per prompt and neuron: float16 (n_prompts, n_layers * d_ff) or (n_prompts, d_ff).

        From each chunk's file (`chunk_files`); a run captured by an older bricklab has rows in
        `prompt_acts` instead, and one it resumed has both: every prompt is in one of them.
        """
        run = self.require_run(run_id)
        width = run.d_ff if layer is not None else run.n_layers * run.d_ff
        files = self.chunk_files(run_id, "prompt_acts")
        where, params = "run_id = ?", [run_id]
        if layer is not None:
            where, params = where + " AND layer = ?", params + [layer]
        sql = f"SELECT mean_abs FROM prompt_acts WHERE {where} ORDER BY prompt_idx, layer"
        if not files:
            return _blobs(self.cursor().sql(sql, params=params), np.float16).reshape(run.n_prompts, width)
        out = np.zeros((run.n_prompts, width), dtype=np.float16)
        filled = np.zeros(run.n_prompts, dtype=bool)
        for first, file in files:
            means = self.read_file(run_id, file)  # (prompts, layers, d_ff)
            part = means[:, layer] if layer is not None else means.reshape(len(means), -1)
            out[first : first + len(part)] = part
            filled[first : first + len(part)] = True
        if not filled.all():  # rows of chunks an older bricklab committed
            listed = f"SELECT DISTINCT prompt_idx FROM prompt_acts WHERE {where} ORDER BY prompt_idx"
            rows = np.array([r[0] for r in self.cursor().execute(listed, params).fetchall()], dtype=np.int64)
            out[rows] = _blobs(self.cursor().sql(sql, params=params), np.float16).reshape(len(rows), width)
            filled[rows] = True
        if not filled.all():
            raise faults.corrupt_error(self.path, f"prompts of run '{run_id}' have no mean activations")
        return out

    @faults.guarded
    def firing_bits(self, run_id: str, layer: int) -> np.ndarray:
        """Packed firing bits of one layer over the run's token sample (`sample_rows`; every token of a
        run whose sample is complete): uint64 (n_sample, words)."""
        run = self.require_run(run_id)
        sql = "SELECT bits FROM firing WHERE run_id = ? AND layer = ? ORDER BY prompt_idx"
        flat = _blobs(self.cursor().sql(sql, params=[run_id, layer]), np.uint64)
        return flat.reshape(-1, (run.d_ff + 63) // 64)

    @faults.guarded
    def token_prompts(self, run_id: str) -> np.ndarray:
        """Prompt index of every token of the run, in (prompt, position) order."""
        sql = "SELECT prompt_idx FROM tokens WHERE run_id = ? ORDER BY prompt_idx, pos"
        return self.cursor().execute(sql, [run_id]).fetchnumpy()["prompt_idx"].astype(np.int32)

    @faults.guarded
    def tokens(self, run_id: str, prompt_idx: int) -> list[tuple]:
        sql = "SELECT pos, token_id, token FROM tokens WHERE run_id = ? AND prompt_idx = ? ORDER BY pos"
        return self.cursor().execute(sql, [run_id, prompt_idx]).fetchall()

    @faults.guarded
    def layer_array(self, run_id: str, name: str, dtype=np.float32) -> np.ndarray:
        """A final per-layer array stacked over layers: (n_layers, ...)."""
        run = self.require_run(run_id)
        sql = "SELECT data FROM layer_arrays WHERE run_id = ? AND name = ? ORDER BY layer"
        flat = _blobs(self.cursor().sql(sql, params=[run_id, name]), dtype)
        return flat.reshape(run.n_layers, -1)

    @faults.guarded
    def top_examples(self, run_id: str, layer: int, neuron: int) -> list[tuple]:
        sql = (
            "SELECT rank, prompt_idx, pos, value FROM top_examples "
            "WHERE run_id = ? AND layer = ? AND neuron = ? ORDER BY rank"
        )
        return self.cursor().execute(sql, [run_id, layer, neuron]).fetchall()

    # derived results

    @faults.guarded
    def get_result(self, run_id: str, kind: str, params: dict) -> bytes | None:
        """The raw payload cached for (run, kind, params); `get_arrays` and `get_json` decode theirs."""
        sql = "SELECT payload FROM results WHERE run_id = ? AND kind = ? AND params = ?"
        row = self.cursor().execute(sql, [run_id, kind, _canon(params)]).fetchone()
        return bytes(row[0]) if row else None

    @faults.guarded
    def put_result(self, run_id: str, kind: str, params: dict, payload: bytes) -> None:
        with self.write(needs=len(payload)) as cur:
            cur.execute(
                "DELETE FROM results WHERE run_id = ? AND kind = ? AND params = ?",
                [run_id, kind, _canon(params)],
            )
            cur.execute(
                "INSERT INTO results (run_id, kind, params, payload) VALUES (?, ?, ?, ?)",
                [run_id, kind, _canon(params), payload],
            )

    @faults.guarded
    def clear_results(self, run_id: str | None = None) -> None:
        """Forget cached derived results (of one run, or all), so the next request computes afresh."""
        with self.write() as cur:
            if run_id is None:
                cur.execute("DELETE FROM results")
            else:
                cur.execute("DELETE FROM results WHERE run_id = ?", [run_id])

    @faults.guarded
    def has_result(self, run_id: str, kind: str, params: dict, arrays: bool = False) -> bool:
        """Whether a result is cached (`arrays`: one written by `put_arrays`), without reading it."""
        sql = "SELECT count(*) FROM results WHERE run_id = ? AND kind = ? AND params = ?"
        key = _codec_key(params) if arrays else params
        return self.cursor().execute(sql, [run_id, kind, _canon(key)]).fetchone()[0] > 0

    @faults.guarded
    def get_arrays(self, run_id: str, kind: str, params: dict) -> tuple[dict[str, np.ndarray], object] | None:
        """The (arrays, meta) cached by `put_arrays` for (run, kind, params); None on a miss."""
        payload = self.get_result(run_id, kind, _codec_key(params))
        return None if payload is None else codec.unpack(payload)

    @faults.guarded
    def put_arrays(
        self, run_id: str, kind: str, params: dict, arrays: dict[str, np.ndarray], meta=None
    ) -> None:
        """Cache named arrays and JSON-serialisable `meta` as one payload of `codec`."""
        self.put_result(run_id, kind, _codec_key(params), codec.pack(arrays, meta))

    @faults.guarded
    def get_json(self, run_id: str, kind: str, params: dict):
        """A result cached by `put_json`; None on a miss."""
        payload = self.get_result(run_id, kind, params)
        return None if payload is None else json.loads(payload)

    @faults.guarded
    def put_json(self, run_id: str, kind: str, params: dict, value) -> None:
        """Cache a JSON value as plain UTF-8 JSON, readable in DuckDB with `decode(payload)`."""
        self.put_result(run_id, kind, params, json.dumps(value).encode())

    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def _rollback(cur) -> None:
    """End the transaction if one is still open; never raise, so the error that led here is the one
    the user sees (DuckDB's "no transaction is active" hid "No space left on device")."""
    with suppress(duckdb.Error):
        cur.execute("ROLLBACK")


def _canon(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _codec_key(params: dict) -> dict:
    """The params key of a codec payload: it names the format, so a payload written in an older
    format (numpy's .npz before format 1) is never read as this one; it is simply recomputed."""
    return {**params, "codec": codec.VERSION}


def _blobs(result, dtype) -> np.ndarray:
    return codec.concat_blobs(result.to_arrow_table().column(0), dtype)
