"""The input tokens distinctive for a neuron or a group of neurons: the tokens at which they fire,
weighed against how often each token occurs in the run.

Each firing of a neuron (its bit in the capture's firing bits, read through core.bricks.firing over
the run's token sample: every token today) counts once for the token at that position; a group's
counts are its neurons' summed. The counts are compared with the token frequencies of the same
tokens by the log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008,
"Fightin' Words"), as a z-score: a token ranks high when the group fires on it far more often than
its frequency predicts, and rare tokens need more evidence than common ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from core.bricks.firing import RunFiring
from core.kernels import coact
from core.store import Run, Store

PRIOR = 100.0  # the prior's weight, in tokens: how much evidence a token needs to stand out
MIN_Z = 2.0  # tokens below this z-score are not distinctive
_ROWS = 8192  # firing rows unpacked at a time: (8192, d_ff) float32


@dataclass(frozen=True)
class RunTokens:
    """The run's tokens as types, and which of them the firing sample holds."""

    prompt: np.ndarray  # int32 (n_tokens,) prompt index of every token of the run
    kind: np.ndarray  # int64 (n_tokens,) index of its type
    token_ids: np.ndarray  # int32 (n_types,) vocabulary id of each type
    texts: np.ndarray  # object (n_types,) stored token text of each type
    counts: np.ndarray  # float64 (n_types,) occurrences among the sampled tokens kept (`run_tokens`)
    sample: np.ndarray  # int64 (n_sample,) the tokens the firing sample's rows belong to


def run_tokens(store: Store, run: Run, rows: np.ndarray | None = None) -> RunTokens:
    """The run's token types; `counts` over the sampled tokens where `rows` (bool per token) is True:
    the background that firings counted over the same tokens are weighed against."""
    prompt, ids, texts = store.run_tokens(run.run_id)
    token_ids, first, kind = np.unique(ids, return_index=True, return_inverse=True)
    sample = RunFiring(store, run).sample_index
    kept = kind[sample] if rows is None else kind[sample][rows[sample]]
    counts = np.bincount(kept, minlength=len(token_ids)).astype(np.float64)
    return RunTokens(prompt, kind.astype(np.int64), token_ids.astype(np.int32), texts[first], counts, sample)


def firing_by_type(bits: np.ndarray, kind: np.ndarray, n_types: int, d_ff: int, rows=None) -> np.ndarray:
    """float32 (n_types, d_ff): how often each neuron of a layer fires at each token type, over the
    firing rows where `rows` (bool) is True (all when None)."""
    out = np.zeros((n_types, d_ff), np.float32)
    picked = np.arange(len(kind)) if rows is None else np.flatnonzero(rows)
    for lo in range(0, len(picked), _ROWS):
        chunk = picked[lo : lo + _ROWS]
        fired = coact.unpack_bits(bits[chunk], d_ff).astype(np.float32)
        one_hot = sparse.csr_matrix(
            (np.ones(len(chunk), np.float32), (kind[chunk], np.arange(len(chunk)))),
            shape=(n_types, len(chunk)),
        )
        out += one_hot @ fired
    return out


def log_odds_z(counts: np.ndarray, background: np.ndarray, prior: float = PRIOR) -> np.ndarray:
    """z-scores (n_types, n_groups) of each group's token counts (n_types, n_groups) against the
    background token counts (n_types,):

        a_t = prior * n_t / N                                  the prior, shaped like the background
        d_t = log((y_t + a_t) / (Y + prior - y_t - a_t)) - log((n_t + a_t) / (N + prior - n_t - a_t))
        z_t = d_t / sqrt(1 / (y_t + a_t) + 1 / (n_t + a_t))

    with y the group's counts, Y their total, n the background's and N its total."""
    y = np.asarray(counts, np.float32)  # float32: ranks, not digits, are what the z-scores are for
    y = y[:, None] if y.ndim == 1 else y
    n = np.asarray(background, np.float32)[:, None]
    total = max(float(n.sum()), 1.0)
    a = np.float32(prior / total) * n
    big_y = y.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.float32(total + prior) - n - a
        delta = np.log((y + a) / (big_y + np.float32(prior) - y - a)) - np.log((n + a) / rest)
        z = delta / np.sqrt(1 / (y + a) + 1 / (n + a))
    return np.where(np.isfinite(z) & (n > 0), z, -np.inf)


def top_types(z: np.ndarray, k: int, min_z: float = MIN_Z) -> list[np.ndarray]:
    """Per column of z (n_types, n_groups): the indices of its k highest types with z >= min_z."""
    if k == 0 or z.shape[0] == 0:
        return [np.zeros(0, np.int64) for _ in range(z.shape[1])]
    k = min(k, z.shape[0])
    rows = -np.ascontiguousarray(z.T)  # (n_groups, n_types): partitioning along rows is fast
    best = np.argpartition(rows, k - 1, axis=1)[:, :k]  # unordered
    order = np.argsort(np.take_along_axis(rows, best, axis=1), axis=1, kind="stable")
    best = np.take_along_axis(best, order, axis=1)
    keep = -np.take_along_axis(rows, best, axis=1) >= min_z
    return [b[ok] for b, ok in zip(best, keep, strict=True)]


def layer_counts(
    firing: RunFiring, layer: int, tokens: RunTokens, rows: np.ndarray | None = None
) -> np.ndarray:
    """float32 (n_types, d_ff): how often each neuron of a layer fires at each token type, over the
    sampled tokens where `rows` (bool per token of `tokens`) is True (all when None)."""
    kind, picked = tokens.kind[tokens.sample], None if rows is None else rows[tokens.sample]
    return firing_by_type(firing.sample(layer), kind, len(tokens.token_ids), firing.run.d_ff, picked)


def group_counts(
    store: Store, run: Run, groups: list[np.ndarray], tokens: RunTokens, rows: np.ndarray | None = None
) -> np.ndarray:
    """float32 (n_types, n_groups): the groups' summed firings per token type (global neuron ids),
    over the sampled tokens where `rows` is True; one pass over the layers the groups touch."""
    firing = RunFiring(store, run)
    ids = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, np.int64)
    member = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    out = np.zeros((len(tokens.token_ids), len(groups)), np.float32)
    for layer in np.unique(ids // run.d_ff):
        mine = ids // run.d_ff == layer
        membership = sparse.csr_matrix(
            (np.ones(int(mine.sum()), np.float32), (ids[mine] % run.d_ff, member[mine])),
            shape=(run.d_ff, len(groups)),
        )
        per_type = layer_counts(firing, int(layer), tokens, rows)
        out += np.asarray(membership.T @ per_type.T).T
    return out


def distinctive_tokens(store: Store, run: Run, groups: list[np.ndarray], n: int) -> list[list[str]]:
    """Per group of global neuron ids: its n most distinctive input tokens (stored token text),
    best first; fewer when fewer stand out."""
    if n == 0 or not groups:
        return [[] for _ in groups]
    tokens = run_tokens(store, run)
    z = log_odds_z(group_counts(store, run, groups, tokens), tokens.counts)
    return [tokens.texts[t].tolist() for t in top_types(z, n)]
