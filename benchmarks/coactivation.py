"""Co-activation counts three ways: numba popcounts, float32 BLAS, scipy.sparse; or, with --device cuda,
the torch path of kernels.coact_gpu on a large layer (14336 neurons x 1M tokens) against numba on slices.

All must agree exactly. Prints the timings and, as its last line, one JSON object with the speedups.
Run: python benchmarks/coactivation.py [--quick | --smoke] [--structured] [--device cuda]
"""

import argparse
import json
import time

import numba
import numpy as np
import scipy.sparse as sp

from core.kernels import coact as kernels
from core.kernels import coact_gpu

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


def random_bits_on_device(n_tokens, n_neurons, rate, device, seed=0):
    """Host uint64 bits of independent firing at `rate`, drawn and packed on the device in blocks."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    out = np.empty((n_tokens, -(-n_neurons // 64)), np.uint64)
    for lo in range(0, n_tokens, 65536):
        rows = min(65536, n_tokens - lo)
        fired = torch.rand((rows, n_neurons), generator=g, device=device) < rate
        out[lo : lo + rows] = coact_gpu.pack(fired).cpu().numpy().view(np.uint64)
    return out


def numba_counts(bits, n_neurons):
    """The CPU kernel itself, whatever the layer width (kernels.coactivation_counts would pick the GPU)."""
    with kernels._PARALLEL:
        return kernels._coactivation_kernel(kernels.transpose_bits(bits, n_neurons))


def time_gpu(n_tokens, n_neurons, rate, reps, check_neurons=1024, check_tokens=4096):
    """End to end (host bits in, host counts out) and device-resident; numba on a neuron and a token slice."""
    import torch

    bits = random_bits_on_device(n_tokens, n_neurons, rate, "cuda")
    coact_gpu.coactivation_counts(bits[:4096], n_neurons)  # warm-up: cuBLAS handles, allocator
    torch.cuda.reset_peak_memory_stats()
    t_host, counts = best_of(reps, lambda: coact_gpu.coactivation_counts(bits, n_neurons))
    on_device = torch.from_numpy(bits.view(np.int64)).cuda()
    t_device, _ = best_of(reps, lambda: coact_gpu.coactivation_counts(on_device, n_neurons))
    words = check_neurons // 64  # all tokens, the first `check_neurons` neurons: a corner of the matrix
    start = time.perf_counter()
    corner = numba_counts(np.ascontiguousarray(bits[:, :words]), check_neurons)
    t_corner = time.perf_counter() - start
    start = time.perf_counter()  # all neurons, the first `check_tokens` tokens
    head = numba_counts(bits[:check_tokens], n_neurons)
    t_head = time.perf_counter() - start
    width = 64 * bits.shape[1]
    return {
        "device": torch.cuda.get_device_name(),
        "n_tokens": n_tokens,
        "n_neurons": n_neurons,
        "firing_rate": round(float(counts.diagonal().sum() / (n_tokens * n_neurons)), 4),
        "gpu_s": round(t_host, 4),  # host bits to host counts, transfers included
        "gpu_device_resident_s": round(t_device, 4),
        "int8_tops": round(2 * width**2 * n_tokens / t_device / 1e12, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "equal_on_neuron_slice": bool(np.array_equal(counts[:check_neurons, :check_neurons], corner)),
        "equal_on_token_slice": bool(
            np.array_equal(coact_gpu.coactivation_counts(bits[:check_tokens], n_neurons), head)
        ),
        "check_slices": [f"{check_neurons} neurons x {n_tokens} tokens", f"{n_neurons} x {check_tokens}"],
        "numba_threads": numba.get_num_threads(),
        "numba_token_slice_s": round(t_head, 3),
        "numba_neuron_slice_s": round(t_corner, 3),
        "numba_extrapolated_s": round(t_head * n_tokens / check_tokens, 1),  # linear in tokens
        "speedup_vs_numba_extrapolated": round(t_head * n_tokens / check_tokens / t_host, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--smoke", action="store_true", help="1 repetition of 2048 tokens x 256 neurons (CPU)"
    )
    parser.add_argument("--structured", action="store_true", help="grouped firing")
    parser.add_argument("--tokens", type=int, help="default 30000, or 1000000 with --device cuda")
    parser.add_argument("--neurons", type=int, help="default 1536, or 14336 with --device cuda")
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument(
        "--device", default="cpu", help="cpu (three CPU ways) or cuda (core.kernels.coact_gpu)"
    )
    args = parser.parse_args(argv)
    reps, sparse_reps = (1, 1) if args.smoke else (3, 1) if args.quick else (7, 3)
    if args.smoke:  # the CPU ways only: the GPU path is left to a machine with one
        args.device, args.tokens, args.neurons = "cpu", args.tokens or 2048, args.neurons or 256
    if args.device != "cpu":
        result = time_gpu(args.tokens or 1_000_000, args.neurons or 14336, args.rate, reps)
        for key, value in result.items():
            print(f"{key:>30}: {value}")
        print(json.dumps(result))
        return
    args.tokens, args.neurons = args.tokens or 30_000, args.neurons or 1536

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
