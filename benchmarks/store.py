"""Reading a whole run's per-prompt activations back as one numpy array, against two naive layouts.

`Store.prompt_activations` (one BLOB per prompt and layer, concatenated through Arrow without a Python
loop) vs (a) fetchall of the same rows and np.frombuffer per row, and (b) a long table with one row
per (prompt, layer, neuron). All three must give the same array. Works on a COPY of the cache.
Prints the timings and, as its last line, one JSON object.
Run: python benchmarks/store.py [--db COPY.duckdb] [--run RUN_ID] [--reps R] [--no-long] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from core import settings
from core.store import Store

ROWS_SQL = "SELECT mean_abs FROM prompt_acts WHERE run_id = ? ORDER BY prompt_idx, layer"
LONG_SCHEMA = (
    "CREATE TABLE acts_long (run_id VARCHAR, prompt_idx INTEGER, layer INTEGER, neuron INTEGER, value REAL)"
)
LONG_SQL = "SELECT value FROM acts_long WHERE run_id = ? ORDER BY prompt_idx, layer, neuron"


def interleaved(reps: int, methods: dict) -> tuple[dict, dict]:
    """Time each method once per repetition, in turn, so machine load hits all alike.

    Returns ({name: [seconds per repetition]}, {name: last result}).
    """
    times: dict[str, list[float]] = {name: [] for name in methods}
    results = {}
    for _ in range(reps):
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, results


def read_fetchall(store: Store, run) -> np.ndarray:
    """The obvious way: every row to Python, one np.frombuffer each, then concatenate."""
    rows = store.cursor().execute(ROWS_SQL, [run.run_id]).fetchall()
    flat = np.concatenate([np.frombuffer(r[0], dtype=np.float16) for r in rows])
    return flat.reshape(run.n_prompts, run.n_layers * run.d_ff)


def build_long_table(store: Store, run, acts: np.ndarray) -> float:
    """One row per (prompt, layer, neuron), as a normalised schema would hold it; returns seconds."""
    start = time.perf_counter()
    n_prompts, width = acts.shape
    columns = {
        "prompt_idx": np.repeat(np.arange(n_prompts, dtype=np.int32), width),
        "layer": np.tile(np.repeat(np.arange(run.n_layers, dtype=np.int32), run.d_ff), n_prompts),
        "neuron": np.tile(np.arange(run.d_ff, dtype=np.int32), n_prompts * run.n_layers),
        "value": acts.astype(np.float32).reshape(-1),
    }
    cur = store.cursor()
    cur.execute(LONG_SCHEMA)
    cur.register("_long", pa.table(columns))
    cur.execute("INSERT INTO acts_long SELECT ?, * FROM _long", [run.run_id])
    cur.unregister("_long")
    return time.perf_counter() - start


def read_long(store: Store, run) -> np.ndarray:
    values = store.cursor().execute(LONG_SQL, [run.run_id]).fetchnumpy()["value"]
    return values.astype(np.float16).reshape(run.n_prompts, run.n_layers * run.d_ff)


def run_benchmark(path: Path, run_id: str | None, reps: int, long: bool) -> dict:
    store = Store(path)
    try:
        run = store.require_run(run_id)
        methods = {
            "store": lambda: store.prompt_activations(run.run_id),
            "fetchall": lambda: read_fetchall(store, run),
        }
        if long:
            build_s = build_long_table(store, run, store.prompt_activations(run.run_id))
            print(f"long table (one row per prompt, layer, neuron) built in {build_s:.1f} s")
            methods["long_table"] = lambda: read_long(store, run)
        times, results = interleaved(reps, methods)
        acts = results["store"]
        for name, value in results.items():
            np.testing.assert_array_equal(value, acts)
            print(f"{name}: best {min(times[name]):.4f} s, median {statistics.median(times[name]):.4f} s")
        print(f"array: {acts.shape} {acts.dtype}, {acts.nbytes / 2**20:.1f} MiB")
        result = {
            "run_id": run.run_id, "n_prompts": run.n_prompts, "n_neurons": run.n_layers * run.d_ff,
            "mib": acts.nbytes / 2**20, "reps": reps,
        }  # fmt: skip
        for name, values in times.items():
            result[f"{name}_s"] = min(values)
            result[f"{name}_median_s"] = statistics.median(values)
            if name != "store":
                result[f"speedup_vs_{name}"] = min(values) / min(times["store"])
        if long:
            result["long_build_s"] = build_s
        return result
    finally:
        store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", help="a copy of a cache to read (default: a temp copy of the app's cache)")
    p.add_argument("--run", help="run id (default: the newest complete run)")
    p.add_argument(
        "--reps", type=int, default=10, help="interleaved repetitions; the fastest counts (default 10)"
    )
    p.add_argument("--no-long", action="store_true", help="skip the long-table baseline (slow to build)")
    p.add_argument("--smoke", action="store_true", help="a fresh run of a tiny random model, 2 repetitions")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            import _tiny  # beside this file

            path, run_id = _tiny.run(_tiny.model(), tmp)
            print(json.dumps(run_benchmark(path, run_id, 2, not args.no_long)))
            return
        path = Path(tmp) / "copy.duckdb"
        source = Path(args.db or settings.db_path())
        shutil.copy(source, path)  # the long table is added to the copy only
        if source.with_name(source.name + ".wal").exists():
            shutil.copy(source.with_name(source.name + ".wal"), path.with_name(path.name + ".wal"))
        result = run_benchmark(path, args.run, args.reps, not args.no_long)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
