"""Bulk arrays beside the cache file (issue #16): a run's co-activation counts, which grow with the
model's width (layers x d_ff^2), not with its tokens; and such a run's per-prompt means (prompt_acts),
float16 (prompts, layers, d_ff) a chunk, catalogued by `chunk_files`. A run whose sample holds every
token (the default run) keeps them as rows and has no folder.

They live as .npy files in `<cache>.arrays/<run_id>/`; the DuckDB table `arrays` is their catalog, so
DuckDB stays the one place that says what a run holds. A file is written (and synced) before the
transaction that names it commits, and files no committed row names are deleted afterwards, so a
kill at any point leaves the catalog naming whole files only. npy, not DuckDB BLOBs: on this disk
280 MB of counts took 1.06 s as npy against 7.45 s as BLOB rows (H3 study, issue #16), and BLOBs
replaced at every checkpoint leave their blocks free in the file for good. The per-prompt means were
BLOB rows until 2026-12-04: an 8B shape's chunk writes 58 MB of them, and once 1 GB of them had gone
through DuckDB's WAL its checkpoint held the capture for 15.6 s (H200 lease, benchmarks/gpu_capture.py
--whole-run 1000000); a file is written once.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.errors import BricklabError
from core.store import faults

ArrayRow = tuple[int, str, np.ndarray]  # (layer, name, array: or what np.asarray makes one of)
WRITERS = 4  # array files written (and synced) at once


def folder_of(cache: Path, run_id: str) -> Path:
    """Where the arrays of a run of the cache file `cache` live."""
    return cache.with_name(cache.name + ".arrays") / run_id


def chunk_file(name: str, chunk: int) -> str:
    """The file name of a chunk's array `name` (one per chunk: a chunk written again replaces it)."""
    return f"{name}-C{chunk:06d}.npy"


def write_file(folder: Path, file: str, array: np.ndarray) -> None:
    """Write an array as `folder/file`, synced to the disk before it takes that name: a kill leaves
    the old file or the new one whole (and at worst a `.partial` that `prune_arrays` deletes)."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (file + ".partial")
    with open(partial, "wb") as out:
        np.save(out, np.ascontiguousarray(array))
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, folder / file)


class Lazy:
    """An array made when numpy asks for it (`np.asarray`), by `make()`: in the thread that writes it
    (`_save_arrays`), so that a save of many large arrays holds a few at a time."""

    def __init__(self, make):
        self.make = make

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.make()
        return array if dtype is None else array.astype(dtype, copy=False)


def shard_arrays(path: Path, catalog: pa.Table) -> pa.Table:
    """The arrays a shard file's catalog names, from beside it: its catalog rows with the path of each
    array's file as `source` (each file is checked now; no array is read until it is needed)."""
    sources = []
    for row in catalog.to_pylist():
        file = folder_of(path, row["run_id"]) / row["file"]
        _shard_file(file)  # memory-mapped: every file is checked before anything is merged
        sources.append(str(file))
    return catalog.append_column("source", pa.array(sources, pa.string()))


def shard_rows(table: pa.Table) -> list[tuple[dict, Callable[[], np.ndarray]]]:
    """Each row of a `shard_arrays` table, and what gives its array: its file memory-mapped (opened
    when asked, so that only the arrays in use are mapped)."""
    rows = table.drop_columns(["source"]).to_pylist()
    sources = table["source"].to_pylist()
    return [(row, functools.partial(_shard_file, Path(f))) for row, f in zip(rows, sources, strict=True)]


def _shard_file(file: Path) -> np.ndarray:
    hint = "Copy the shard's '.arrays' folder beside it, or capture the shard again."
    return _mapped(file, "The shard's array file", hint)


def _mapped(path: Path, what: str, hint: str) -> np.ndarray:
    """The array file at `path`, memory-mapped read-only; when it cannot be read, an error saying so
    of `what` it is, with `hint`."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise BricklabError(f"{what} '{path}' is missing or unreadable ({exc}).", hint) from exc


class ArrayFiles:
    """Mixin of `Store`: the run's bulk arrays as files, named by the `arrays` table."""

    def arrays_folder(self, run_id: str) -> Path:
        return folder_of(self.path, run_id)

    def _save_arrays(self, cur, run_id: str, rows: list[ArrayRow], chunks: list[int]) -> None:
        """Inside a write transaction, before its chunks are inserted: write `rows` (sums over the run's
        `chunks`; each array made, when it is not one yet, by the thread that writes it: a few are held
        at a time) as new files and make them the run's catalog. The files they replace go only after
        the commit (`prune_arrays`)."""
        sql = "SELECT count(*) FROM chunks WHERE run_id = ?"
        tag = f"n{cur.execute(sql, [run_id]).fetchone()[0]:06d}"  # grows with every chunk committed
        folder = self.arrays_folder(run_id)

        def write(row: ArrayRow) -> tuple:
            layer, name, array = row
            array = np.asarray(array)  # an array, or what makes one when asked (core.capture.counts)
            file = f"{name}-L{layer:03d}-{tag}.npy"
            write_file(folder, file, array)
            shape = ",".join(map(str, array.shape))
            return (run_id, name, layer, file, array.dtype.str, shape, array.nbytes, list(chunks))

        with ThreadPoolExecutor(WRITERS, thread_name_prefix="arrays") as pool:  # the disk takes several
            catalog = list(pool.map(write, rows))
        cur.execute("DELETE FROM arrays WHERE run_id = ?", [run_id])
        names = ("run_id", "name", "layer", "file", "dtype", "shape", "bytes", "chunks")
        text, whole = pa.string(), pa.int64()
        types = (text, text, pa.int32(), text, text, text, whole, pa.list_(pa.int32()))
        columns = {
            n: pa.array([r[i] for r in catalog], t) for i, (n, t) in enumerate(zip(names, types, strict=True))
        }
        self.insert(cur, "arrays", columns)

    @faults.guarded
    def array_files(self, run_id: str) -> dict[tuple[str, int], str]:
        """(name, layer) -> file name of each array the run's catalog names."""
        sql = "SELECT name, layer, file FROM arrays WHERE run_id = ?"
        return {(n, layer): f for n, layer, f in self.cursor().execute(sql, [run_id]).fetchall()}

    @faults.guarded
    def array_chunks(self, run_id: str) -> set[int]:
        """The chunks the run's saved arrays sum over (none before its first save)."""
        sql = "SELECT DISTINCT unnest(chunks) FROM arrays WHERE run_id = ?"
        return {row[0] for row in self.cursor().execute(sql, [run_id]).fetchall()}

    def read_array(self, run_id: str, name: str, layer: int) -> np.ndarray | None:
        """One array of the run (memory-mapped, read-only); None when the catalog names none."""
        file = self.array_files(run_id).get((name, int(layer)))
        return None if file is None else self.read_file(run_id, file)

    def _add_chunk_file(self, cur, run_id: str, chunk: int, name: str, first_prompt: int, array) -> None:
        """Inside a chunk's write transaction: write one of its arrays as a file and name it in
        `chunk_files` (a file the transaction never names is deleted by `prune_arrays`)."""
        file = chunk_file(name, chunk)
        write_file(self.arrays_folder(run_id), file, array)
        shape = ",".join(map(str, array.shape))
        row = [run_id, chunk, name, file, first_prompt, array.dtype.str, shape, array.nbytes]
        cur.execute("INSERT INTO chunk_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)

    @faults.guarded
    def chunk_files(self, run_id: str, name: str) -> list[tuple[int, str]]:
        """(first prompt, file name) of each committed chunk's array `name`, in chunk order; none in a
        file of an older bricklab (no `chunk_files` table: its chunks wrote rows)."""
        if not self._has_table("chunk_files"):
            return []
        sql = "SELECT first_prompt, file FROM chunk_files WHERE run_id = ? AND name = ? ORDER BY chunk"
        return [(int(p), f) for p, f in self.cursor().execute(sql, [run_id, name]).fetchall()]

    def read_file(self, run_id: str, file: str) -> np.ndarray:
        """One array file of the run (memory-mapped, read-only)."""
        hint = "Keep the '.arrays' folder beside the cache file; or delete the run and capture it again."
        return _mapped(self.arrays_folder(run_id) / file, f"Run {run_id}'s array file", hint)

    def named_files(self, run_id: str) -> set[str]:
        """Every file of the run that a catalog names: its arrays and its chunks' files."""
        chunks = set()
        if self._has_table("chunk_files"):
            sql = "SELECT file FROM chunk_files WHERE run_id = ?"
            chunks = {row[0] for row in self.cursor().execute(sql, [run_id]).fetchall()}
        return set(self.array_files(run_id).values()) | chunks

    def _has_table(self, name: str) -> bool:
        sql = "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?"
        return self.cursor().execute(sql, [name]).fetchone()[0] > 0

    def prune_arrays(self, run_id: str) -> None:
        """Delete the run's array files that no catalog names (replaced, or written by a transaction
        that never committed)."""
        folder = self.arrays_folder(run_id)
        if self.read_only or not folder.is_dir():
            return
        keep = self.named_files(run_id)
        for path in folder.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
