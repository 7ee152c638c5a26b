"""numba kernels over packed firing bits and per-prompt activations, with numpy twins.

Bits are token-major uint64 words: neuron j of a token is bit j % 64 of word j // 64.
"""

import sys
import threading

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

NORMALISATIONS = ("pmi", "jaccard")
GPU_MIN_NEURONS = (
    4096  # co-activation of layers this wide runs on a GPU when one is there (core.kernels.coact_gpu)
)
# numba's fallback "workqueue" threading layer aborts the process when two threads (two browser
# sessions) run parallel kernels at once; the kernels use every core anyway, so take turns.


class _Parallel:
    """One parallel kernel at a time (numba's workqueue layer aborts on concurrent use), and torch's
    thread count put back afterwards: numba's OpenMP layer resets the setting the two share."""

    def __init__(self):
        self._lock = threading.Lock()
        self._threads = None

    def __enter__(self):
        self._lock.acquire()
        torch = sys.modules.get("torch")
        self._threads = torch.get_num_threads() if torch else None

    def __exit__(self, *exc):
        torch = sys.modules.get("torch")
        if torch is not None and self._threads:
            torch.set_num_threads(self._threads)
        self._lock.release()


_PARALLEL = _Parallel()


@intrinsic
def _popcount(typingctx, x):
    """popcount of a uint64 as LLVM's ctpop: one POPCNT, or VPOPCNTQ once vectorised."""
    if not (isinstance(x, types.Integer) and x.bitwidth == 64 and not x.signed):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(x), codegen


# --- kernels ------------------------------------------------------------------------


@njit(cache=True)
def _transpose64(a):
    """Transpose the 64 x 64 bit matrix (a[row] bit col) in place.

    Six rounds of masked swaps of off-diagonal blocks (Hacker's Delight, 7-3).
    """
    j = 32
    m = np.uint64(0x00000000FFFFFFFF)
    while j != 0:
        k = 0
        while k < 64:
            t = ((a[k] >> np.uint64(j)) ^ a[k + j]) & m
            a[k + j] ^= t
            a[k] ^= t << np.uint64(j)
            k = (k + j + 1) & ~j
        j >>= 1
        m ^= m << np.uint64(j)


@njit(cache=True, nogil=True)  # nogil: bricks partition two layers at once in threads
def _transpose_bits_kernel(token_bits, n_neurons):
    """out[j, t // 64] bit t % 64 = token_bits[t, j // 64] bit j % 64."""
    n_tokens, n_words = token_bits.shape
    n_token_words = (n_tokens + 63) // 64
    out = np.zeros((n_neurons, n_token_words), np.uint64)
    block = np.empty(64, np.uint64)
    for tw in range(n_token_words):
        rows = min(64, n_tokens - 64 * tw)
        for nw in range(n_words):
            for r in range(64):
                block[r] = token_bits[64 * tw + r, nw] if r < rows else np.uint64(0)
            _transpose64(block)
            for c in range(min(64, n_neurons - 64 * nw)):
                out[64 * nw + c, tw] = block[c]
    return out


@njit(cache=True)
def _coactivation_block(nb, i0, out):
    """Rows i0..i0+3 of C[i, j] = sum_w popcount(nb[i, w] & nb[j, w]) for j >= i0.

    Each value is mirrored to C[j, i]. A 4 x 2 tile of (i, j) pairs shares its loaded
    words, so row j is read n / 4 times, not n times; the word loop vectorises.
    """
    n, n_words = nb.shape
    i1 = min(i0 + 4, n)
    j = i0
    while i1 - i0 == 4 and j + 2 <= n:
        s0 = s1 = s2 = s3 = u0 = u1 = u2 = u3 = 0
        for w in range(n_words):
            b, c = nb[j, w], nb[j + 1, w]
            a0, a1, a2, a3 = nb[i0, w], nb[i0 + 1, w], nb[i0 + 2, w], nb[i0 + 3, w]
            s0 += _popcount(a0 & b)
            s1 += _popcount(a1 & b)
            s2 += _popcount(a2 & b)
            s3 += _popcount(a3 & b)
            u0 += _popcount(a0 & c)
            u1 += _popcount(a1 & c)
            u2 += _popcount(a2 & c)
            u3 += _popcount(a3 & c)
        for di, s, u in ((0, s0, u0), (1, s1, u1), (2, s2, u2), (3, s3, u3)):
            out[i0 + di, j] = out[j, i0 + di] = s
            out[i0 + di, j + 1] = out[j + 1, i0 + di] = u
        j += 2
    for i in range(i0, i1):  # ragged edges: an odd last column, or fewer than 4 rows
        for jj in range(max(j, i), n):
            s = 0
            for w in range(n_words):
                s += _popcount(nb[i, w] & nb[jj, w])
            out[i, jj] = out[jj, i] = s


@njit(parallel=True, cache=True)
def _coactivation_kernel(neuron_bits):
    """C[i, j] = sum_w popcount(neuron_bits[i, w] & neuron_bits[j, w]).

    Row blocks k and last - k go to the same task, so every task does equal work.
    """
    n = neuron_bits.shape[0]
    out = np.zeros((n, n), np.int32)
    n_blocks = (n + 3) // 4
    for k in prange((n_blocks + 1) // 2):
        _coactivation_block(neuron_bits, 4 * k, out)
        if n_blocks - 1 - k != k:
            _coactivation_block(neuron_bits, 4 * (n_blocks - 1 - k), out)
    return out


@njit(cache=True)
def _firing_counts_kernel(token_bits, n_neurons):
    """counts[j] = sum_t bit j % 64 of token_bits[t, j // 64]; padding bits ignored."""
    n_tokens, n_words = token_bits.shape
    counts = np.zeros(n_neurons, np.int64)
    for w in range(n_words):
        local = np.zeros(64, np.int64)
        for t in range(n_tokens):
            word = token_bits[t, w]
            for b in range(64):
                local[b] += np.int64((word >> np.uint64(b)) & np.uint64(1))
        for b in range(min(64, n_neurons - 64 * w)):
            counts[64 * w + b] = local[b]
    return counts


@njit(cache=True, nogil=True)
def _normalise_kernel(counts, n_tokens, jaccard):
    """C_ij / (C_ii + C_jj - C_ij) or log(C_ij N / (C_ii C_jj)); 0 where C_ij = 0.

    Jaccard is also 0 where its denominator is not positive (never, for real counts).
    """
    n = counts.shape[0]
    out = np.zeros((n, n), np.float32)
    for i in range(n):
        for j in range(n):
            cij = np.float64(counts[i, j])
            ci, cj = np.float64(counts[i, i]), np.float64(counts[j, j])
            if cij == 0:
                continue
            if jaccard:
                den = ci + cj - cij
                out[i, j] = cij / den if den > 0 else 0.0
            else:
                out[i, j] = np.log(cij * n_tokens / (ci * cj))
    return out


@njit(parallel=True, cache=True)
def _average_precision_kernel(scores, order, labels, n_categories):
    """AP[c, j] = 1 / P_c * sum over prompts p in c of TP_c(s_p) / N(s_p).

    s_p = scores[j, p], order[j] ranks them best first; N(s) counts the prompts scoring
    >= s, TP_c(s) those of them in c, P_c all prompts in c. Tied scores form one
    threshold, as in sklearn's average_precision_score. P_c = 0 gives NaN.
    """
    n_neurons, n_prompts = scores.shape
    positives = np.zeros(n_categories, np.int64)
    for p in range(n_prompts):
        positives[labels[p]] += 1
    out = np.empty((n_categories, n_neurons), np.float32)
    for j in prange(n_neurons):
        x, rank = scores[j], order[j]
        tp = np.zeros(n_categories, np.int64)
        total = np.zeros(n_categories, np.float64)
        start = 0
        while start < n_prompts:  # one group of tied scores [start, end) per step
            end = start + 1
            while end < n_prompts and x[rank[end]] == x[rank[start]]:
                end += 1
            for k in range(start, end):
                tp[labels[rank[k]]] += 1
            for k in range(start, end):
                total[labels[rank[k]]] += tp[labels[rank[k]]] / end
            start = end
        for c in range(n_categories):
            out[c, j] = total[c] / positives[c] if positives[c] > 0 else np.nan
    return out


# --- numpy twins: slow and obviously correct; the tests hold the kernels to them ----


def pack_bits(fired: np.ndarray) -> np.ndarray:
    """(rows, n) bool -> (rows, ceil(n / 64)) uint64 in the bits convention."""
    fired = np.asarray(fired, dtype=bool)
    padded = np.zeros((len(fired), -(-fired.shape[1] // 64) * 64), dtype=bool)
    padded[:, : fired.shape[1]] = fired
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").astype(np.uint64)


def unpack_bits(bits: np.ndarray, n_columns: int) -> np.ndarray:
    """Inverse of pack_bits: (rows, words) uint64 -> (rows, n_columns) bool."""
    as_bytes = np.ascontiguousarray(bits, dtype="<u8").view(np.uint8)
    return np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :n_columns] == 1


def transpose_bits_numpy(token_bits: np.ndarray, n_neurons: int) -> np.ndarray:
    return pack_bits(unpack_bits(token_bits, n_neurons).T)


def coactivation_counts_numpy(token_bits: np.ndarray, n_neurons: int) -> np.ndarray:
    fired = unpack_bits(token_bits, n_neurons).astype(np.int64)
    return (fired.T @ fired).astype(np.int32)


def firing_rates_numpy(token_bits: np.ndarray, n_neurons: int) -> np.ndarray:
    fired = unpack_bits(token_bits, n_neurons)
    return fired.mean(axis=0) if len(fired) else np.zeros(n_neurons)


def normalised_coactivation_numpy(counts, n_tokens: int, kind: str) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    d = np.diag(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "jaccard":
            den = d[:, None] + d[None, :] - c
            out = np.where((c > 0) & (den > 0), c / den, 0.0)
        else:
            out = np.where(c > 0, np.log(c * n_tokens / np.outer(d, d)), 0.0)
    return out.astype(np.float32)


def average_precision_numpy(X, labels, n_categories: int) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    out = np.full((n_categories, X.shape[1]), np.nan, dtype=np.float32)
    for c in range(n_categories):
        target = labels == c
        for j in range(X.shape[1] if target.any() else 0):
            ap, last_recall = 0.0, 0.0
            for threshold in np.unique(X[:, j])[::-1]:
                chosen = X[:, j] >= threshold
                recall = (target & chosen).sum() / target.sum()
                ap += (recall - last_recall) * (target & chosen).sum() / chosen.sum()
                last_recall = recall
            out[c, j] = ap
    return out


# --- wrappers: validate, convert, call the kernel -----------------------------------


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return int(value)


def _check_bits(bits, shape: tuple, what: str) -> np.ndarray:
    """Contiguous uint64 bits of `shape`; a str in `shape` names a free dimension."""
    bits = np.asarray(bits)
    fits = bits.ndim == 2 and all(
        isinstance(w, str) or w == g for w, g in zip(shape, bits.shape, strict=True)
    )
    if bits.dtype != np.uint64 or not fits:
        raise ValueError(
            f"{what} must be a uint64 array of shape ({shape[0]}, {shape[1]}), got "
            f"{bits.dtype} {bits.shape}. core.kernels.coact.pack_bits packs a bool matrix."
        )
    return np.ascontiguousarray(bits)


def _token_bits(token_bits, n_neurons) -> tuple[np.ndarray, int]:
    n_neurons = _check_count("n_neurons", n_neurons)
    shape = ("n_tokens", -(-n_neurons // 64))
    return _check_bits(token_bits, shape, "token_bits"), n_neurons


def transpose_bits(token_bits: np.ndarray, n_neurons: int) -> np.ndarray:
    """(n_tokens, ceil(n_neurons / 64)) -> (n_neurons, ceil(n_tokens / 64)) uint64."""
    return _transpose_bits_kernel(*_token_bits(token_bits, n_neurons))


def coactivation_counts(bits, n_neurons: int, *, neuron_major=False) -> np.ndarray:
    """int32 (n_neurons, n_neurons): C[i, j] = tokens where neurons i and j both fire.

    The diagonal holds each neuron's firing count (int32: fewer than 2**31 tokens).
    `bits` are token-major, or with neuron_major=True the output of transpose_bits.
    """
    if neuron_major:
        n_neurons = _check_count("n_neurons", n_neurons)
        bits = _check_bits(bits, (n_neurons, "n_token_words"), "neuron-major bits")
    else:
        bits, n_neurons = _token_bits(bits, n_neurons)
    if n_neurons >= GPU_MIN_NEURONS:  # a large layer: the torch path when a GPU is there
        from core.kernels import coact_gpu

        if coact_gpu.available():
            return coact_gpu.coactivation_counts(bits, n_neurons, neuron_major=neuron_major)
    if not neuron_major:
        bits = transpose_bits(bits, n_neurons)
    with _PARALLEL:
        return _coactivation_kernel(bits)


def symmetric_from_upper(packed: np.ndarray, n: int) -> np.ndarray:
    """The (n, n) symmetric matrix whose upper triangle, diagonal included, is `packed` (row-major, as
    `matrix[np.triu_indices(n)]`): how capture stores co-activation counts, half the bytes."""
    out = np.zeros((n, n), dtype=packed.dtype)
    out[np.triu_indices(n)] = packed
    lower = np.tril_indices(n, -1)
    out[lower] = out.T[lower]
    return out


def firing_rates(token_bits: np.ndarray, n_neurons: int) -> np.ndarray:
    """float64 (n_neurons,): the fraction of tokens each neuron fires on; 0 if none."""
    token_bits, n_neurons = _token_bits(token_bits, n_neurons)
    counts = _firing_counts_kernel(token_bits, n_neurons)
    return counts / max(len(token_bits), 1)


def normalised_coactivation(counts, n_tokens: int, kind: str = "pmi") -> np.ndarray:
    """float32 (n, n) from co-activation counts C over N tokens; 0 wherever C_ij = 0.

    "pmi": log(C_ij N / (C_ii C_jj)), signed (np.maximum(pmi, 0) gives PPMI); its
    diagonal is log(N / C_ii), the neuron's self-information. "jaccard": C_ij /
    (C_ii + C_jj - C_ij); its diagonal is 1. A neuron that never fires gets a zero row.
    """
    if kind not in NORMALISATIONS:
        raise ValueError(f"kind must be one of {NORMALISATIONS}, got {kind!r}.")
    n_tokens = _check_count("n_tokens", n_tokens)
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be a square matrix, got shape {counts.shape}.")
    if counts.size and not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"counts must hold integers, got {counts.dtype}.")
    if counts.size and (counts.min() < 0 or np.diag(counts).max() > n_tokens):
        raise ValueError(f"counts must lie in [0, n_tokens={n_tokens}]; wrong run?")
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    return _normalise_kernel(counts, n_tokens, kind == "jaccard")


_AP_CHUNK = 4096  # neurons per kernel call


def average_precision(X, labels, n_categories: int) -> np.ndarray:
    """float32 (n_categories, n_neurons): AP of prompts ranked by X[:, j], c vs rest.

    X is (n_prompts, n_neurons), e.g. mean |a| per prompt (float16 is fine; scores are
    compared as float32); labels are integers in [0, n_categories). Matches
    sklearn.metrics.average_precision_score, tied scores included. A category with no
    prompts gets NaN: AP is undefined without positives.
    """
    n_categories = _check_count("n_categories", n_categories)
    X, labels = np.asarray(X), np.asarray(labels)
    if X.ndim != 2 or X.dtype.kind not in "biuf":
        raise ValueError(f"X must be real (n_prompts, n_neurons), got {X.dtype} {X.shape}.")
    if labels.shape != (len(X),) or (labels.dtype.kind not in "iu" and labels.size):
        raise ValueError(
            f"labels must be {len(X)} integers, one per row of X; got {labels.dtype} {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_categories):
        raise ValueError(f"labels must lie in [0, n_categories={n_categories}).")
    if np.isnan(X).any():
        raise ValueError("X contains NaN; every prompt needs a score.")
    labels = labels.astype(np.int64)
    out = np.empty((n_categories, X.shape[1]), np.float32)
    for lo in range(0, X.shape[1], _AP_CHUNK):  # bounds the float32 copy and the ranks
        scores = np.ascontiguousarray(X[:, lo : lo + _AP_CHUNK].T, dtype=np.float32)
        order = np.argsort(-scores, axis=1)  # numpy's SIMD sort beats one in numba
        with _PARALLEL:
            out[:, lo : lo + _AP_CHUNK] = _average_precision_kernel(scores, order, labels, n_categories)
    return out
