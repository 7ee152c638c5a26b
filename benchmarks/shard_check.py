"""Check sharded capture on one machine: N shard processes (one per GPU when there are several),
merged, against an unsharded capture of the same prompts; prints timings and equality as JSON.

Usage: python benchmarks/shard_check.py --model DIR [--shards 2] [--limit 40] [--device cuda]
       python benchmarks/shard_check.py --smoke   (a tiny random model, 4 prompts, on the CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.store import Store


def cli(args: list[str], env: dict) -> None:
    subprocess.run([sys.executable, "-m", "core", *args], env=env, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="a hub id or a local folder (required unless --smoke)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model and 4 prompts, on the CPU")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpus", type=int, default=1, help="spread shards over this many GPUs")
    a = p.parse_args()
    if not (a.model or a.smoke):
        p.error("--model is required (or --smoke)")
    with tempfile.TemporaryDirectory() as tmp:
        result = check(a, Path(tmp))
    print(json.dumps(result))


def check(a, tmp: Path) -> dict:
    """Capture unsharded and in shards into files under tmp, merge the shards, compare the two runs."""
    if a.smoke:
        import _tiny  # beside this file

        a.model, a.limit, a.device = _tiny.save(tmp / "tiny"), 4, "cpu"
    common = ["capture", "--model", a.model, "--limit", str(a.limit), "--device", a.device, "--quiet"]
    t0 = time.perf_counter()
    cli(["--db", str(tmp / "ref.duckdb"), *common], dict(os.environ))
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = []
    for i in range(a.shards):
        env = (
            dict(os.environ, CUDA_VISIBLE_DEVICES=str(i % a.gpus)) if a.device == "cuda" else dict(os.environ)
        )
        cmd = [
            sys.executable,
            "-m",
            "core",
            "--db",
            str(tmp / f"s{i}.duckdb"),
            *common,
            "--shard",
            f"{i}/{a.shards}",
        ]
        procs.append(subprocess.Popen(cmd, env=env))
    assert all(proc.wait() == 0 for proc in procs)
    sharded_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cli(
        ["--db", str(tmp / "merged.duckdb"), "merge", *[str(tmp / f"s{i}.duckdb") for i in range(a.shards)]],
        dict(os.environ),
    )
    merge_s = time.perf_counter() - t0
    ref, merged = Store(tmp / "ref.duckdb"), Store(tmp / "merged.duckdb")
    run = ref.runs()[0]
    equal = bool(np.array_equal(ref.prompt_activations(run.run_id), merged.prompt_activations(run.run_id)))
    for layer in range(run.n_layers):
        equal &= bool(
            np.array_equal(ref.firing_bits(run.run_id, layer), merged.firing_bits(run.run_id, layer))
        )
    q = "SELECT layer, neuron, rank, prompt_idx, pos, value FROM top_examples WHERE run_id = ? ORDER BY ALL"
    equal &= (
        ref.cursor().execute(q, [run.run_id]).fetchall()
        == merged.cursor().execute(q, [run.run_id]).fetchall()
    )
    ref.close()
    merged.close()
    return {"shards": a.shards, "gpus": a.gpus, "device": a.device, "prompts": a.limit,
            "single_s": single_s, "sharded_s": sharded_s, "merge_s": merge_s,
            "merged_equals_single": equal, "run_id": run.run_id}  # fmt: skip


if __name__ == "__main__":
    main()
