"""Which tokens keep their firing bits (issue #16): a deterministic, byte-budgeted token sample.

A run keeps the bits of a token when a hash of (prompt, position) falls below the run's rate, the
share of the run's tokens whose bits fit in the capture's `sample_bytes`. The rule depends on nothing
but the token's place and the rate, so chunks, shards and readers agree on the sample without storing
it, and a run whose bits fit in the budget keeps every token (rate 1: the sample is the whole run).
"""

from __future__ import annotations

import numpy as np

_SCALE = 1 << 32


def sample_rate(sample_bytes: int | None, n_tokens: int, n_layers: int, d_ff: int) -> float:
    """The share of tokens whose packed bits, over every layer, fit in `sample_bytes` (at most 1).
    None: a run of an older format, which kept every token's bits."""
    if sample_bytes is None:
        return 1.0
    per_token = n_layers * ((d_ff + 63) // 64) * 8
    return min(1.0, sample_bytes / max(1, n_tokens * per_token))


def count_rate(count_tokens: int, n_tokens: int, sample_rate: float = 0.0) -> float:
    """The share of tokens whose co-activations a run with a partial sample counts: every token when
    they number at most `count_tokens` (0: every token), else a hashed sample of that many, and never
    fewer than the tokens whose bits it keeps (`sample_rate`: the same hash, so those are among them)."""
    if count_tokens <= 0:
        return 1.0
    return max(sample_rate, min(1.0, count_tokens / max(1, n_tokens)))


def in_sample(prompt_idx, pos, rate: float) -> np.ndarray:
    """bool per token: whether (prompt_idx, pos) is in a sample of `rate` (splitmix64 of the pair)."""
    prompt_idx, pos = np.asarray(prompt_idx, np.int64), np.asarray(pos, np.int64)
    if rate >= 1.0:
        return np.ones(np.broadcast(prompt_idx, pos).shape, dtype=bool)
    x = (prompt_idx.astype(np.uint64) << np.uint64(32)) | pos.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)) < np.uint64(int(rate * _SCALE))
