"""The finalise step of a capture: summing the chunks' partial reductions into the run's arrays.

Writes `--chunks` chunks of an 8B-shaped run (32 layers x 14,336 neurons, 64 prompts of 512 tokens a
chunk; their rows stand-ins, as large as capture writes them) through capture's own ChunkWriter into
a new cache, then finalises copies of it twice: as capture does (as many layers' chunk partials a
query as `reduce.PARTIALS_BYTES` hold) and one layer a query (the baseline: each query reads the whole
table's payloads). Both must give the same run. Prints the timings and, as its last line, one JSON
object.
Run: python benchmarks/finalise.py [--chunks 40] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from core.capture import reduce
from core.capture import run as capture
from core.capture.reduce import top_rows
from core.capture.writer import ChunkWriter
from core.prompts import Encoded
from core.store import Store, sample

SHAPES = {"llama3-8b": (32, 14336, 64, 512), "tiny": (2, 96, 4, 16)}  # layers, d_ff, prompts a chunk, tokens


class _Chunk:
    """What ChunkWriter reads of a ChunkReducer: per prompt and layer, mean |a| and firing words."""

    def __init__(self, rng, n_layers: int, d_ff: int, n_prompts: int, seq: int, rate: float):
        self.shape, self.rate = (n_prompts, n_layers, d_ff), rate
        self.words = rng.integers(0, 2**63, (seq, d_ff // 64)).view(np.uint64)
        self.new_means(rng)
        self.n_tokens = n_prompts * seq

    def new_means(self, rng) -> None:
        """Every prompt's and layer's own means and firing words, as a capture's are: one array repeated
        compresses in DuckDB's checkpoints (a dictionary of one value), which then cost far less."""
        means = rng.random(self.shape, dtype=np.float32).astype(np.float16)
        self.prompt_means = {i: list(means[i]) for i in range(self.shape[0])}
        keys = rng.integers(0, 2**63, self.shape[:2]).view(np.uint64)
        made = (lambda key: self.words ^ key) if self.rate >= 1 else (lambda key: _Words(self.words, key))
        self.prompt_bits = {i: [made(key) for key in keys[i]] for i in range(self.shape[0])}


class _Words:
    """One prompt's and layer's firing words: a shared array XOR a key of their own, made only for
    the rows the writer takes (the run's token sample), so that no two are alike (a run keeping every
    token's bits gets them whole)."""

    def __init__(self, words: np.ndarray, key: np.uint64):
        self.words, self.key = words, key

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, rows) -> np.ndarray:
        return self.words[rows] ^ self.key


class _Tokens:
    @staticmethod
    def convert_ids_to_tokens(ids):
        return [str(i) for i in ids]


def write_run(path: Path, shape: str, n_chunks: int) -> list[float]:
    """A run of `n_chunks` chunks committed as capture commits them, its top examples saved at the end;
    the seconds of each chunk's commit."""
    n_layers, d_ff, n_prompts, seq = SHAPES[shape]
    rng = np.random.default_rng(0)
    encoded = [Encoded(rng.integers(0, 1000, seq).tolist(), 0, seq, False) for _ in range(n_prompts)]
    rows = []
    for layer in range(n_layers):
        rows += [(layer, name, rng.random(d_ff)) for name in ("sum_act", "sum_abs", "fire_count")]
        rows += [(layer, name, rng.integers(0, 100, 100)) for name in ("hist_abs", "hist_out")]
    top = (
        rng.random((n_layers, 20, d_ff)).astype(np.float32),
        rng.integers(0, n_chunks * n_prompts, (n_layers, 20, d_ff)).astype(np.int32),
        rng.integers(0, seq, (n_layers, 20, d_ff)).astype(np.int32),
    )
    config = capture.CaptureConfig()
    rate = sample.sample_rate(config.sample_bytes, 10**7, n_layers, d_ff)  # a 10M-token run's sample
    chunk = _Chunk(rng, n_layers, d_ff, n_prompts, seq, rate)
    store, each = Store(path), []
    try:
        row = {"run_id": "bench", "settings": json.dumps(config.__dict__), "n_layers": n_layers,
               "d_ff": d_ff, "n_prompts": n_chunks * n_prompts, "categories": "[]", "status": "capturing",
               "n_tokens": 0}  # fmt: skip
        with store.write() as cur:
            store.create_run(cur, row, [])
        with ChunkWriter(store, "bench", _Tokens(), rate, None, set(), "cpu") as writer:
            for c in range(n_chunks):
                chunk.new_means(rng)  # each chunk its own
                state = top_rows(top) if c == n_chunks - 1 else None
                t0 = time.perf_counter()
                writer._write(c, c * n_prompts, encoded, chunk, list(rows), state, 0.0, None, None)
                each.append(time.perf_counter() - t0)
    finally:
        store.close()
    return each


def finalise(path: Path, n_layers: int, budget: int) -> tuple[float, dict]:
    """Seconds to finalise the run in `path` with PARTIALS_BYTES = budget, and what it stored."""
    reduce.PARTIALS_BYTES, default = budget, reduce.PARTIALS_BYTES
    store = Store(path)
    try:
        t0 = time.perf_counter()
        capture.finalise(store, "bench", n_layers, capture.CaptureConfig())
        seconds = time.perf_counter() - t0
        stored = {
            name: store.cursor()
            .execute(f"SELECT * FROM {name} WHERE run_id = 'bench' ORDER BY ALL")
            .fetchall()
            for name in ("layer_arrays", "top_examples")
        }
    finally:
        store.close()
        reduce.PARTIALS_BYTES = default
    return seconds, stored


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--smoke", action="store_true", help="a tiny shape, 3 chunks")
    args = p.parse_args()
    shape, n_chunks = ("tiny", 3) if args.smoke else ("llama3-8b", args.chunks)
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / "written.duckdb"
        t0 = time.perf_counter()
        each = write_run(written, shape, n_chunks)
        write_s = time.perf_counter() - t0
        times, results = {}, {}
        for name, budget in (("grouped", reduce.PARTIALS_BYTES), ("a_layer_a_query", 1)):
            copy = Path(tmp) / f"{name}.duckdb"
            shutil.copy(written, copy)
            times[name], results[name] = finalise(copy, SHAPES[shape][0], budget)
            copy.unlink()
    same = results["grouped"] == results["a_layer_a_query"]
    print(f"{n_chunks} chunks of {shape} written in {write_s:.1f} s; finalise {times['grouped']:.2f} s "
          f"against {times['a_layer_a_query']:.2f} s a layer a query; same run: {same}")  # fmt: skip
    print(json.dumps({
        "shape": shape, "chunks": n_chunks, "write_s": write_s, "finalise_s": times["grouped"],
        "baseline_s": times["a_layer_a_query"], "speedup": times["a_layer_a_query"] / times["grouped"],
        "same_run": same, "commit_s_median": float(np.median(each)), "commit_s_max": max(each),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
