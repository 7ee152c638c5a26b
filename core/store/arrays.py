"""Bulk arrays beside the cache file (issue #16): a run's co-activation counts, which grow with the
model's width (layers x d_ff^2), not with its tokens.

They live as .npy files in `<cache>.arrays/<run_id>/`; the DuckDB table `arrays` is their catalog, so
DuckDB stays the one place that says what a run holds. A file is written (and synced) before the
transaction that names it commits, and files no committed row names are deleted afterwards, so a
kill at any point leaves the catalog naming whole files only. npy, not DuckDB BLOBs: on this disk
280 MB of counts took 1.06 s as npy against 7.45 s as BLOB rows (H3 study, issue #16), and BLOBs
replaced at every checkpoint leave their blocks free in the file for good.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.errors import BricklabError
from core.store import faults

ArrayRow = tuple[int, str, np.ndarray]  # (layer, name, array)
WRITERS = 4  # array files written (and synced) at once


def folder_of(cache: Path, run_id: str) -> Path:
    """Where the arrays of a run of the cache file `cache` live."""
    return cache.with_name(cache.name + ".arrays") / run_id


def decoded(row: dict) -> np.ndarray:
    """The array of a `shard_arrays` row."""
    return np.frombuffer(row["data"], row["dtype"]).reshape([int(n) for n in row["shape"].split(",")])


def shard_arrays(path: Path, catalog: pa.Table) -> pa.Table:
    """The arrays a shard file's catalog names, read from beside it: its catalog rows with each
    array's bytes as `data`, what travels with its chunks to be merged (`read_shard`)."""
    data = []
    for row in catalog.to_pylist():
        file = folder_of(path, row["run_id"]) / row["file"]
        try:
            data.append(np.ascontiguousarray(np.load(file)).tobytes())
        except (OSError, ValueError) as exc:
            raise BricklabError(
                f"The shard's array file '{file}' is missing or unreadable ({exc}).",
                "Copy the shard's '.arrays' folder beside it, or capture the shard again.",
            ) from exc
    return catalog.append_column("data", pa.array(data, pa.binary()))


class ArrayFiles:
    """Mixin of `Store`: the run's bulk arrays as files, named by the `arrays` table."""

    def arrays_folder(self, run_id: str) -> Path:
        return folder_of(self.path, run_id)

    def _save_arrays(self, cur, run_id: str, rows: list[ArrayRow], chunks: list[int]) -> None:
        """Inside a write transaction, before its chunks are inserted: write `rows` (sums over the run's
        `chunks`) as new files and make them the run's catalog. The files they replace go only after
        the commit (`prune_arrays`)."""
        sql = "SELECT count(*) FROM chunks WHERE run_id = ?"
        tag = f"n{cur.execute(sql, [run_id]).fetchone()[0]:06d}"  # grows with every chunk committed
        folder = self.arrays_folder(run_id)
        folder.mkdir(parents=True, exist_ok=True)

        def write(row: ArrayRow) -> tuple:
            layer, name, array = row
            file = f"{name}-L{layer:03d}-{tag}.npy"
            partial = folder / (file + ".partial")
            with open(partial, "wb") as out:
                np.save(out, np.ascontiguousarray(array))
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, folder / file)
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
        if file is None:
            return None
        path = self.arrays_folder(run_id) / file
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise BricklabError(
                f"The array file '{path}' of run '{run_id}' is missing or unreadable ({exc}).",
                "Keep the '.arrays' folder beside the cache file; or delete the run and capture it again.",
            ) from exc

    def prune_arrays(self, run_id: str) -> None:
        """Delete the run's array files that its catalog does not name (replaced, or written by a
        transaction that never committed)."""
        folder = self.arrays_folder(run_id)
        if self.read_only or not folder.is_dir():
            return
        keep = set(self.array_files(run_id).values())
        for path in folder.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
