"""`python -m core doctor`: check a cache file run by run, table by table, and copy what still
reads back into a fresh file.

DuckDB checksums every block, so a damaged block fails the query that reads it; a row is readable
when a query that hashes every column of it succeeds.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from core.errors import BricklabError
from core.store import faults
from core.store.arrays import folder_of
from core.store.schema import RUN_TABLES, SCHEMA

_ROW_TABLES = tuple(t for t in RUN_TABLES if t != "results")  # results are checked one by one


@dataclass
class RunHealth:
    run_id: str
    status: str
    bad_tables: list[str]  # the run's tables with rows that cannot be read
    results: list[tuple[str, str]] = field(default_factory=list)  # readable (kind, params)
    bad_results: int = 0  # results (or the listing of them) that cannot be read

    @property
    def readable(self) -> bool:
        return not self.bad_tables


@dataclass
class Diagnosis:
    path: Path
    cause: str = ""  # why the file or its run list cannot be read at all; "" when it can
    runs: list[RunHealth] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.cause and all(r.readable and not r.bad_results for r in self.runs)


def unreadable_tables(cur, run_id: str) -> list[str]:
    """The run's tables (results aside) with a row that cannot be read back."""
    bad = []
    present = {row[0] for row in cur.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    for table in _ROW_TABLES:  # names from the schema's own constants, never from the caller
        if table not in present:  # a file of an older format (no `arrays`): the run has no rows there
            continue
        try:
            cur.execute(f"SELECT count(*), max(hash(COLUMNS(*))) FROM {table} WHERE run_id = ?", [run_id])
            cur.fetchall()
        except duckdb.Error:
            bad.append(table)
    return bad


def check(path: str | Path) -> Diagnosis:
    """Which runs and results of the cache at `path` read back; the file is opened read-only."""
    path = Path(path)
    if not path.is_file():
        raise BricklabError(f"There is no cache file '{path}'.", "Give the file with --db.")
    if path.stat().st_size == 0:
        return Diagnosis(path, "the file is empty: 0 bytes")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        if faults.kind(exc) == faults.LOCKED:
            raise faults.cache_error(path, exc) from exc
        return Diagnosis(path, faults.cause(exc))
    try:
        return _check_runs(con, path)
    finally:
        con.close()


def _check_runs(con, path: Path) -> Diagnosis:
    try:
        rows = con.execute("SELECT run_id, status FROM runs ORDER BY created").fetchall()
    except duckdb.Error as exc:
        return Diagnosis(path, f"the list of runs cannot be read: {faults.cause(exc)}")
    diagnosis = Diagnosis(path)
    for run_id, status in rows:
        health = RunHealth(run_id, status, unreadable_tables(con, run_id))
        _check_results(con, health)
        diagnosis.runs.append(health)
    return diagnosis


def _check_results(con, health: RunHealth) -> None:
    try:
        keys = con.execute("SELECT kind, params FROM results WHERE run_id = ?", [health.run_id]).fetchall()
    except duckdb.Error:
        health.bad_results = 1  # not even the list of results reads back
        return
    for kind, params in keys:
        try:
            sql = "SELECT hash(payload) FROM results WHERE run_id = ? AND kind = ? AND params = ?"
            con.execute(sql, [health.run_id, kind, params]).fetchall()
            health.results.append((kind, params))
        except duckdb.Error:
            health.bad_results += 1


def recover(diagnosis: Diagnosis, target: str | Path) -> int:
    """Copy the readable runs (with their readable results) into the new file `target`, in one
    transaction; the number of runs copied. The fresh file holds nothing when the copy fails."""
    target = Path(target)
    if target.exists():
        raise BricklabError(f"'{target}' already exists.", "Give a new file with --out.")
    keep = [r for r in diagnosis.runs if r.readable]
    try:
        con = duckdb.connect(str(target))
        try:
            con.execute(SCHEMA)
            con.execute("ATTACH ? AS damaged (READ_ONLY)", [str(diagnosis.path)])
            con.execute("BEGIN TRANSACTION")
            for health in keep:
                _copy_run(con, health, diagnosis.path, target)
            con.execute("COMMIT")
        finally:
            con.close()
    except (duckdb.Error, OSError) as exc:
        target.unlink(missing_ok=True)
        raise faults.cache_error(target, exc) from exc
    return len(keep)


def _copy_run(con, health: RunHealth, damaged: Path, target: Path) -> None:
    sql = "SELECT table_name FROM duckdb_tables() WHERE database_name = 'damaged'"
    present = {row[0] for row in con.execute(sql).fetchall()}
    for table in ("runs", *_ROW_TABLES):
        if table not in present:
            continue
        con.execute(
            f"INSERT INTO {table} BY NAME SELECT * FROM damaged.{table} WHERE run_id = ?", [health.run_id]
        )
    for kind, params in health.results:
        sql = "SELECT * FROM damaged.results WHERE run_id = ? AND kind = ? AND params = ?"
        con.execute(f"INSERT INTO results BY NAME {sql}", [health.run_id, kind, params])
    if folder_of(damaged, health.run_id).is_dir():  # the run's bulk arrays (store.arrays) go along
        shutil.copytree(
            folder_of(damaged, health.run_id), folder_of(target, health.run_id), dirs_exist_ok=True
        )
