"""Co-activation counts three ways: numba popcounts, float32 BLAS, scipy.sparse.

All three must agree exactly. Prints the timings and, as its last line, one JSON object
with the speedups. Run: python benchmarks/coactivation.py [--quick] [--structured]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core import kernels

GROUP = 32  # --structured: neurons that fire together


def make_firing(n_tokens, n_neurons, rate, structured, seed=0):
    """(n_tokens, n_neurons) bool firing at about `rate`, independent or in groups."""
    rng = np.random.default_rng(seed)
    if not structured:
        return rng.random((n_tokens, n_neurons), dtype=np.float32) < rate
    group_on = rng.random((n_tokens, -(-n_neurons // GROUP)), dtype=np.float32) < rate
    on = np.repeat(group_on, GROUP, axis=1)[:, :n_neurons]
    noise = rng.random((n_tokens, n_neurons), dtype=np.float32)
    background = 0.2 * rate / (1 - rate)  # keeps the mean rate at `rate`
    return np.where(on, noise < 0.8, noise < background)


def best_of(reps, fn):
    """(fastest wall time in seconds over `reps` calls, the last result)."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def time_coactivation(fired, reps, sparse_reps):
    n_tokens, n_neurons = fired.shape
    bits = kernels.pack_bits(fired)  # what the capture stores
    dense = fired.astype(np.float32)  # the baselines get their input ready, untimed
    csr = sp.csr_matrix(fired, dtype=np.int32)

    start = time.perf_counter()  # compiles, or loads numba's on-disk cache
    kernels.coactivation_counts(bits[:1], n_neurons)
    first_call = time.perf_counter() - start
    from_cache = sum(kernels._coactivation_kernel.stats.cache_hits.values()) > 0

    t_numba, counts = best_of(reps, lambda: kernels.coactivation_counts(bits, n_neurons))
    t_transpose, by_neuron = best_of(reps, lambda: kernels.transpose_bits(bits, n_neurons))
    t_kernel, _ = best_of(
        reps,
        lambda: kernels.coactivation_counts(by_neuron, n_neurons, neuron_major=True),
    )
    t_blas, blas = best_of(reps, lambda: dense.T @ dense)
    t_sparse, sparse = best_of(sparse_reps, lambda: csr.T @ csr)

    assert np.array_equal(counts, blas), "numba and BLAS counts differ"
    assert np.array_equal(counts, sparse.toarray()), "numba and sparse counts differ"
    return {
        "n_tokens": n_tokens,
        "n_neurons": n_neurons,
        "firing_rate": round(float(fired.mean()), 4),
        "threads": numba.get_num_threads(),
        "numba_first_call_s": round(first_call, 3),
        "numba_first_call_from_cache": from_cache,
        "numba_s": round(t_numba, 5),  # transpose_bits included: the honest figure
        "numba_excluding_transpose_s": round(t_kernel, 5),
        "transpose_s": round(t_transpose, 5),
        "blas_float32_s": round(t_blas, 5),
        "sparse_s": round(t_sparse, 5),
        "speedup_vs_blas": round(t_blas / t_numba, 1),
        "speedup_vs_sparse": round(t_sparse / t_numba, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--structured", action="store_true", help="grouped firing")
    parser.add_argument("--tokens", type=int, default=30_000)
    parser.add_argument("--neurons", type=int, default=1536)
    parser.add_argument("--rate", type=float, default=0.1)
    args = parser.parse_args(argv)
    reps, sparse_reps = (3, 1) if args.quick else (7, 3)

    fired = make_firing(args.tokens, args.neurons, args.rate, args.structured)
    result = {
        "structured": args.structured,
        **time_coactivation(fired, reps, sparse_reps),
    }
    # The brick pipeline on a real cached run will be timed here and merged in.
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
