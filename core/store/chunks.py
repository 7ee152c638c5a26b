"""The store's side of a capture: a chunk's rows committed in one transaction, its partial reductions
read back, the run finalised, and a shard's chunks copied in from another cache file.

Each write here is one `Store.write()` transaction, so a killed capture leaves whole chunks only and
resumes from them.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from core.errors import BricklabError
from core.store import codec, faults
from core.store.arrays import shard_arrays, shard_rows
from core.store.schema import CHUNK_ROW_TABLES, CHUNK_TABLES, TOP_ARRAYS


class ChunkTables:
    """Mixin of `Store`: the writes and reads of a capture in progress."""

    @faults.guarded
    def write_chunk(
        self,
        run_id: str,
        chunk: int,
        first_prompt: int,
        acts: list[list[np.ndarray]],
        bits: list[list[np.ndarray]],
        tokens: dict[str, list],
        partials: list[tuple[int, str, np.ndarray]],
        n_tokens: int,
        seconds: float,
        top_state: list[tuple[int, str, np.ndarray]] | None = None,
        arrays: list[tuple[int, str, np.ndarray]] | None = None,
        covered: list[int] | None = None,
        acts_file: bool = False,
    ) -> None:
        """Everything a chunk produced, in one transaction: it lands whole or not at all.

        acts and bits: per prompt of the chunk (from `first_prompt` on), per layer, the mean |a| and
        the packed firing bits. With `acts_file` (a run whose token sample is partial: its counts are
        beside the cache already) the means go to one file there (`chunk_files`), else to rows of
        `prompt_acts`. tokens: the columns prompt_idx, pos, token_id, token, truncated of
        the prompts' own tokens. partials: (layer, name, array) rows that `finish_run` sums.
        top_state: (layer, name, array) rows that replace the run's `top_state`, in the same transaction
        (its old rows' blocks are free for the next chunk once committed).
        arrays: (layer, name, array) the run's bulk arrays (co-activation counts) summed over the
        chunks `covered`, written as files that replace the run's (store.arrays) when it commits.
        """
        n_layers = len(acts[0]) if acts else 0
        prompt_idx = np.repeat(np.arange(first_prompt, first_prompt + len(acts), dtype=np.int32), n_layers)
        layer_idx = np.tile(np.arange(n_layers, dtype=np.int32), len(acts))
        if acts_file:
            means = np.array(acts, dtype=np.float16)  # (prompts, layers, d_ff)
        else:
            means = codec.blob_column([a for per_layer in acts for a in per_layer])
        packed = codec.blob_column([b for per_layer in bits for b in per_layer])
        token_columns = {
            "run_id": [run_id] * len(tokens["token_id"]),
            "prompt_idx": pa.array(tokens["prompt_idx"], pa.int32()),
            "pos": pa.array(tokens["pos"], pa.int32()),
            "token_id": pa.array(tokens["token_id"], pa.int32()),
            "token": pa.array([str(t) for t in tokens["token"]], pa.string()),
            "truncated": pa.array(tokens["truncated"], pa.bool_()),
        }
        partial_columns = {
            "run_id": [run_id] * len(partials),
            "chunk": pa.array([chunk] * len(partials), pa.int32()),
            "layer": pa.array([r[0] for r in partials], pa.int32()),
            "name": [r[1] for r in partials],
            "data": codec.blob_column([r[2] for r in partials]),
        }
        # the arrays' bytes, plus ~16 bytes a token row (ids, positions, short strings)
        needs = means.nbytes + packed.nbytes + partial_columns["data"].nbytes + 16 * len(tokens["token_id"])
        needs += sum(r[2].nbytes for r in top_state or ())
        with self.write(needs=needs) as cur:
            base = {"run_id": [run_id] * len(prompt_idx), "prompt_idx": prompt_idx, "layer": layer_idx}
            if not acts_file:
                self.insert(cur, "prompt_acts", {**base, "mean_abs": means})
            elif len(acts):
                self._add_chunk_file(cur, run_id, chunk, "prompt_acts", first_prompt, means)
            self.insert(cur, "firing", {**base, "bits": packed})
            self.insert(cur, "tokens", token_columns)
            self.insert(cur, "chunk_arrays", partial_columns)
            if top_state is not None:
                _replace_top_state(self, cur, run_id, top_state)
            if arrays is not None:
                self._save_arrays(cur, run_id, arrays, covered)
            cur.execute("INSERT INTO chunks VALUES (?, ?, ?, ?)", [run_id, chunk, n_tokens, seconds])
        if arrays is not None:
            self.prune_arrays(run_id)

    @faults.guarded
    def drop_chunks(self, run_id: str, chunks: list[int], chunk_prompts: int) -> None:
        """Delete the rows of committed `chunks` in one transaction, so they are captured again (a run
        resumes from its last saved counts, core.capture.run)."""
        with self.write() as cur:
            for name in CHUNK_TABLES:  # names from the schema's own constants, never from the caller
                if name in ("chunks", "chunk_arrays", "chunk_files"):
                    cur.execute(
                        f"DELETE FROM {name} WHERE run_id = ? AND chunk IN (SELECT unnest(?))",
                        [run_id, chunks],
                    )
                else:
                    where = "prompt_idx // ? IN (SELECT unnest(?))"
                    cur.execute(
                        f"DELETE FROM {name} WHERE run_id = ? AND {where}", [run_id, chunk_prompts, chunks]
                    )
        self.prune_arrays(run_id)  # the dropped chunks' files

    @faults.guarded
    def done_chunks(self, run_id: str) -> set[int]:
        rows = self.cursor().execute("SELECT chunk FROM chunks WHERE run_id = ?", [run_id]).fetchall()
        return {r[0] for r in rows}

    @faults.guarded
    def chunk_totals(self, run_id: str) -> tuple[int, float]:
        """Tokens and seconds summed over the run's committed chunks."""
        sql = "SELECT coalesce(sum(n_tokens), 0), coalesce(sum(seconds), 0) FROM chunks WHERE run_id = ?"
        n_tokens, seconds = self.cursor().execute(sql, [run_id]).fetchone()
        return int(n_tokens), float(seconds)

    @faults.guarded
    def chunk_partial_bytes(self, run_id: str) -> dict[int, int]:
        """Bytes of the run's chunk partials, per layer."""
        sql = "SELECT layer, sum(octet_length(data)) FROM chunk_arrays WHERE run_id = ? GROUP BY layer"
        return {int(layer): int(size) for layer, size in self.cursor().execute(sql, [run_id]).fetchall()}

    @faults.guarded
    def chunk_partials(self, run_id: str, layers: range) -> dict[int, dict[str, list[bytes]]]:
        """The partial reductions of the `layers`: layer -> name -> one payload per committed chunk, in
        chunk order. One query for several layers: each query reads the whole table's payloads (40
        chunks of an 8B shape: 0.43 s a query, so 14 s a layer at a time)."""
        sql = (
            "SELECT layer, name, data FROM chunk_arrays WHERE run_id = ? AND layer >= ? AND layer < ? "
            "ORDER BY layer, chunk"
        )
        parts: dict[int, dict[str, list[bytes]]] = {layer: {} for layer in layers}
        for layer, name, data in self.cursor().execute(sql, [run_id, layers.start, layers.stop]).fetchall():
            parts[layer].setdefault(name, []).append(bytes(data))
        return parts

    @faults.guarded
    def file_blocks(self) -> tuple[int, int, int]:
        """(used, free, bytes per block) of the cache file: deleted rows leave free blocks that DuckDB
        reuses for later writes but never gives back to the disk."""
        sql = "SELECT used_blocks, free_blocks, block_size FROM pragma_database_size()"
        used, free, size = self.cursor().execute(sql).fetchall()[0]
        return int(used), int(free), int(size)

    @faults.guarded
    def top_state(self, run_id: str, layer: int) -> dict[str, list[bytes]]:
        """One layer's running top examples: name -> [payload] ({} before the first chunk)."""
        sql = "SELECT name, data FROM top_state WHERE run_id = ? AND layer = ?"
        return {name: [bytes(data)] for name, data in self.cursor().execute(sql, [run_id, layer]).fetchall()}

    @faults.guarded
    def finish_run(
        self,
        run_id: str,
        layer_rows: list[tuple[int, str, np.ndarray]],
        top_rows: dict[str, np.ndarray],
        n_tokens: int,
        seconds: float,
    ) -> None:
        """In one transaction: the final per-layer arrays and top examples replace any earlier ones,
        the chunk partials and running top examples go, and the run is marked complete."""
        layer_columns = {
            "run_id": [run_id] * len(layer_rows),
            "layer": pa.array([r[0] for r in layer_rows], pa.int32()),
            "name": [r[1] for r in layer_rows],
            "data": codec.blob_column([r[2] for r in layer_rows]),
        }
        n_top = len(top_rows["layer"])  # ~1M rows on the default model: no Python list of ids
        needs = layer_columns["data"].nbytes + sum(np.asarray(v).nbytes for v in top_rows.values())
        with self.write(needs=needs) as cur:
            cur.execute("DELETE FROM layer_arrays WHERE run_id = ?", [run_id])
            cur.execute("DELETE FROM top_examples WHERE run_id = ?", [run_id])
            self.insert(cur, "layer_arrays", layer_columns)
            self.insert(cur, "top_examples", {"run_id": pa.repeat(pa.scalar(run_id), n_top), **top_rows})
            cur.execute("DELETE FROM chunk_arrays WHERE run_id = ?", [run_id])
            cur.execute("DELETE FROM top_state WHERE run_id = ?", [run_id])
            cur.execute(
                "UPDATE runs SET status = 'complete', n_tokens = ?, seconds = ?, "
                "finished = current_timestamp WHERE run_id = ?",
                [int(n_tokens), float(seconds), run_id],
            )

    @staticmethod
    def read_shard(path: str | Path) -> dict[str, pa.Table]:
        """Every run row and chunk row of a shard file, as Arrow tables, with its running top examples
        (`top_state`, empty in a shard or a file of an older bricklab) and the catalogs of its files
        beside it (`arrays`: its co-activation counts; `chunk_files`), each file's path as `source`."""
        path = Path(path)
        if not path.is_file():
            raise BricklabError(f"The shard '{path}' does not exist.", "Check the path.")
        try:
            con = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as exc:
            raise _not_a_shard(path, exc) from exc
        try:
            # the names come from the schema's own constants, never from the caller
            names = ["runs", "prompts", *CHUNK_ROW_TABLES]
            sql = "SELECT table_name FROM duckdb_tables() WHERE table_name IN (SELECT unnest(?))"
            optional = ["top_state", "arrays", "chunk_files"]  # tables an older bricklab's file lacks
            names += sorted(row[0] for row in con.execute(sql, [optional]).fetchall())
            tables = {name: con.sql(f"SELECT * FROM {name}").to_arrow_table() for name in names}
        except duckdb.Error as exc:
            raise _not_a_shard(path, exc) from exc
        finally:
            con.close()
        for name in ("arrays", "chunk_files"):  # counts over its chunks and its chunks' files, from
            if name in tables:  # beside the file
                tables[name] = shard_arrays(path, tables[name])
        return tables

    @faults.guarded
    def add_shard_chunks(
        self,
        run_id: str,
        tables: dict[str, pa.Table],
        chunks: list[int],
        chunk_prompts: int,
        new_run: tuple[dict, list[tuple]] | None = None,
        top_state: list[tuple[int, str, np.ndarray]] | None = None,
        arrays: tuple[list[tuple[int, str, np.ndarray]], list[int]] | None = None,
    ) -> None:
        """Copy the rows of a shard's `chunks` of one run into the cache in one transaction; with
        `new_run` = (runs row, prompt rows) the run is created in that same transaction. The chunks'
        top examples are not copied: `top_state` (the run's, with theirs merged in) replaces the run's;
        likewise `arrays` (the run's co-activation counts with theirs added, and the chunks they sum
        over) replace the run's."""
        with self.write() as cur:
            if new_run is not None:
                self.create_run(cur, *new_run)
            if arrays is not None:
                self._save_arrays(cur, run_id, *arrays)
            for name in CHUNK_ROW_TABLES:
                _insert_chunk_rows(cur, name, tables[name], run_id, chunks, chunk_prompts)
            files = tables.get("chunk_files")
            for row, array in [] if files is None else shard_rows(files):
                if row["run_id"] == run_id and row["chunk"] in chunks:
                    chunk, name, first = row["chunk"], row["name"], row["first_prompt"]
                    self._add_chunk_file(cur, run_id, chunk, name, first, array())
            if top_state is not None:
                _replace_top_state(self, cur, run_id, top_state)
        self.prune_arrays(run_id)


def _replace_top_state(store, cur, run_id: str, rows: list[tuple[int, str, np.ndarray]]) -> None:
    cur.execute("DELETE FROM top_state WHERE run_id = ?", [run_id])
    columns = {
        "run_id": [run_id] * len(rows),
        "layer": pa.array([r[0] for r in rows], pa.int32()),
        "name": [r[1] for r in rows],
        "data": codec.blob_column([r[2] for r in rows]),
    }
    store.insert(cur, "top_state", columns)


def _not_a_shard(path: Path, exc: Exception) -> BricklabError:
    return BricklabError(
        f"'{path}' is not a bricklab shard ({exc}).", "Give shard files written by capture --shard."
    )


def _insert_chunk_rows(cur, name, table, run_id, chunks, chunk_prompts) -> None:
    """Rows of one table that belong to the new chunks (prompt-keyed tables map prompts to chunks)."""
    if not chunks or table.num_rows == 0:
        return
    cur.register("_shard_rows", table)
    try:
        if name == "chunk_arrays":  # top examples: merged into top_state instead
            where = "chunk IN (SELECT unnest(?)) AND name NOT IN (SELECT unnest(?))"
            params = [run_id, chunks, list(TOP_ARRAYS)]
        elif "chunk" in table.column_names:
            where, params = "chunk IN (SELECT unnest(?))", [run_id, chunks]
        else:
            where, params = "prompt_idx // ? IN (SELECT unnest(?))", [run_id, chunk_prompts, chunks]
        columns = ", ".join(table.column_names)
        cur.execute(
            f"INSERT INTO {name} ({columns}) SELECT {columns} FROM _shard_rows WHERE run_id = ? AND {where}",
            params,
        )
    finally:
        cur.unregister("_shard_rows")
