"""A run's last save of its co-activation counts (core.capture.counts): every layer's two triangles
written beside a new cache, as each is taken off the counts when written (what a run's last save does
since 2026-12-04) against a copy of all of them first (what every save did before, and a save during
the run still does, since the capture goes on counting).

Each way runs in a process of its own, on the CPU, over counts of `--layers` x `--d-ff` filled with
random integers; it reports the seconds from the counts to the files and the host memory the save
added at its peak (VmHWM after the save less before it). Both must write the same files. Prints
the figures and, as its last line, one JSON object.
Run: python benchmarks/counts_save.py [--layers 8 --d-ff 4096] [--smoke]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.capture.counts import CoactCounts
from core.store import Store

MODES = ("copied", "last")


def peak_kib() -> int:
    """The process's peak RSS (VmHWM: it starts again at exec, where ru_maxrss keeps the parent's)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))


def one(mode: str, n_layers: int, d_ff: int) -> dict:
    counts = CoactCounts(n_layers, d_ff, np.array([True, False]))
    gen = torch.Generator().manual_seed(0)
    for per_half in counts.out:
        for matrix in per_half:
            matrix.copy_(torch.randint(0, 2**20, matrix.shape, generator=gen, dtype=torch.int32))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "save.duckdb")
        with store.write() as cur:  # the database's own memory, before the save's
            store._save_arrays(cur, "warm", [(0, "coact_a", np.zeros(1, np.int32))], [0])
        before = peak_kib()
        t0 = time.perf_counter()
        rows = counts.arrays(last=mode == "last")
        with store.write() as cur:
            store._save_arrays(cur, "bench", rows, [0])
        seconds = time.perf_counter() - t0
        peak = peak_kib()
        digest = hashlib.sha256()
        for (name, layer), file in sorted(store.array_files("bench").items()):
            digest.update(
                f"{name}{layer}".encode() + np.ascontiguousarray(store.read_file("bench", file)).tobytes()
            )
        store.close()
    return {"save_s": seconds, "added_peak_mib": (peak - before) / 1024, "sha256": digest.hexdigest()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=4096)
    p.add_argument("--smoke", action="store_true", help="2 layers of 256 neurons")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child process's single save
    args = p.parse_args()
    n_layers, d_ff = (2, 256) if args.smoke else (args.layers, args.d_ff)
    if args.one:
        print(json.dumps(one(args.one, n_layers, d_ff)))
        return
    argv = [sys.executable, __file__, "--layers", str(n_layers), "--d-ff", str(d_ff), "--one"]
    result = {}
    for mode in MODES:
        done = subprocess.run([*argv, mode], capture_output=True, text=True, check=True)
        result[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        got = result[mode]
        print(f"{mode:>6}: {got['save_s']:.2f} s, +{got['added_peak_mib']:.0f} MiB at the peak")
    triangles = 2 * n_layers * d_ff * (d_ff + 1) // 2 * 4
    print(json.dumps({
        "layers": n_layers, "d_ff": d_ff, "triangles_mib": triangles / 2**20, **result,
        "same_files": result["copied"]["sha256"] == result["last"]["sha256"],
        "time_ratio_last_over_copied": result["last"]["save_s"] / result["copied"]["save_s"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
