"""One-line descriptions of neurons and bricks, made offline from the run, each with a score that
says how far to trust it.

A description names the input tokens most distinctive for the unit (core.bricks.distinctive), the
tokens its output promotes (core.bricks.vocab, when a model is at hand) and the prompt category it
leans to. The score is honest and cheap: the distinctive tokens are chosen on one half of the run's
prompts (`scores.prompt_halves`), and on the other, held-out half a simulation that predicts each
prompt's activity as the share of its tokens that are among them is compared with the real activity
(the capture's mean |a| per prompt, averaged over a brick's neurons) by Pearson's r. r near 0: the
tokens do not predict where the unit is active; the promoted tokens and the category are not scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from core.bricks import distinctive, scores, vocab
from core.bricks.firing import RunFiring
from core.bricks.neurons import check_neuron, display_token
from core.models import LoadedModel, mismatch
from core.progress import Progress
from core.store import Run, Store

VERSION = 2  # part of the cache key
N_TOKENS = 5  # distinctive tokens a description names and its simulation matches
N_PROMOTED = 3
LEAN = 1.5  # a category is named when the unit's average precision is this many times chance
TRUST = ((0.5, "good"), (0.25, "fair"), (-1.0, "weak"))  # (lowest r, word) from the top


@dataclass(frozen=True)
class Explanation:
    subject: str  # "neuron 15:100" or "brick coact-L03-07"
    text: str  # the one-line description
    score: float  # Pearson r of the simulation with the real activity on held-out prompts; nan: none
    tokens: tuple[str, ...]  # the distinctive input tokens (display text) the simulation matches
    promoted: tuple[str, ...]  # tokens its output promotes most (empty without a model)
    category: str | None  # the category it leans to (a brick: its label)
    n_held_out: int  # prompts the score is computed on

    @property
    def trust(self) -> str:
        if not np.isfinite(self.score):
            return "none"
        return next(word for low, word in TRUST if self.score >= low)

    def to_dict(self) -> dict:
        return {
            **vars(self),
            "tokens": list(self.tokens),
            "promoted": list(self.promoted),
            "trust": self.trust,
        }


def describe(tokens, promoted, category: str | None) -> str:
    """The sentence: 'fires on "Paris", "France"; promotes "city"; leans to knowledge prompts'."""
    parts = []
    if tokens:
        parts.append("fires on " + ", ".join(f'"{t.strip() or t}"' for t in tokens))
    if promoted:
        parts.append("promotes " + ", ".join(f'"{t.strip() or t}"' for t in promoted))
    if category:
        parts.append(f"leans to {category} prompts")
    return "; ".join(parts) if parts else "no distinctive input tokens, no clear category"


# --- the simulation score ------------------------------------------------------------------------


def _halves(store: Store, run: Run, tokens: distinctive.RunTokens) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows: bool per token of the run, held-out prompts: bool per prompt)."""
    fit = scores.prompt_halves(store, run.run_id)
    return fit[tokens.prompt], ~fit


def _prompt_shares(run: Run, tokens: distinctive.RunTokens) -> sparse.csr_matrix:
    """(n_prompts, n_types): the share of each prompt's tokens that are of each type."""
    shape = (run.n_prompts, len(tokens.token_ids))
    counts = sparse.csr_matrix((np.ones(len(tokens.kind)), (tokens.prompt, tokens.kind)), shape=shape)
    length = np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1)
    return sparse.diags(1 / length) @ counts


def pearson(sim: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Column-wise Pearson r of (n, m) arrays; nan where either column is constant."""
    sim, real = sim - sim.mean(axis=0), real - real.mean(axis=0)
    norm = np.sqrt((sim**2).sum(axis=0) * (real**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (sim * real).sum(axis=0) / norm, np.nan)


def _picked(chosen: list[np.ndarray], n_types: int) -> sparse.csr_matrix:
    """(n_types, n_units) indicator of each unit's chosen types."""
    cols = np.repeat(np.arange(len(chosen)), [len(c) for c in chosen])
    rows = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_types, len(chosen)))


# --- neurons: one layer at a time, cached ---------------------------------------------------------


def layer_explanations(store: Store, run_id: str | None, layer: int) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays behind every description of one layer's neurons, cached per (run, layer):
    'tokens' int32 (d_ff, N_TOKENS) type indices (-1: none), 'score' float32 (d_ff,) and 'control'
    float32 (d_ff,), the score each neuron gets with another neuron's tokens (what a description that
    is not about it scores); meta holds the type texts and the number of held-out prompts."""
    run = store.require_run(run_id)
    key = {"layer": int(layer), "n": N_TOKENS, "version": VERSION}
    if (cached := store.get_arrays(run.run_id, "explain", key)) is not None:
        return cached
    tokens = distinctive.run_tokens(store, run)
    fit_rows, held_out = _halves(store, run, tokens)
    fit_tokens = distinctive.run_tokens(store, run, fit_rows)
    counts = distinctive.layer_counts(RunFiring(store, run), int(layer), tokens, fit_rows)
    chosen = distinctive.top_types(distinctive.log_odds_z(counts, fit_tokens.counts), N_TOKENS)
    shares, real = _prompt_shares(run, tokens), store.prompt_activations(run.run_id, int(layer))
    real = real.astype(np.float32)[held_out]
    sim = (shares @ _picked(chosen, len(tokens.token_ids))).toarray()[held_out]
    score = pearson(sim, real).astype(np.float32)
    # the control: each neuron scored with another neuron's tokens (a derangement of the layer)
    cycle = np.random.default_rng(int(layer)).permutation(run.d_ff)
    other = np.empty_like(cycle)
    other[cycle] = np.roll(cycle, -1)  # one random cycle through the layer: nobody keeps their own
    control = pearson(sim[:, other], real).astype(np.float32)
    table = np.full((run.d_ff, N_TOKENS), -1, np.int32)
    for i, c in enumerate(chosen):
        table[i, : len(c)] = c
    meta = {"texts": tokens.texts.tolist(), "held_out": int(held_out.sum())}
    arrays = {"tokens": table, "score": score, "control": control}
    if not store.read_only:
        store.put_arrays(run.run_id, "explain", key, arrays, meta)
    return arrays, meta


def all_explanations(store: Store, run_id: str | None, progress: Progress | None = None) -> np.ndarray:
    """Compute (or read) every layer's descriptions; returns every neuron's score, float32 (n_neurons,)."""
    run = store.require_run(run_id)
    report = progress or (lambda done, total, message: None)
    out = []
    for layer in range(run.n_layers):
        report(layer, run.n_layers, f"explaining layer {layer}")
        out.append(layer_explanations(store, run.run_id, layer)[0]["score"])
    report(run.n_layers, run.n_layers, "explained")
    return np.concatenate(out)


def _leaning(store: Store, run: Run, column: np.ndarray) -> str | None:
    """The category whose average precision is highest over chance, if LEAN times chance or more."""
    if not run.categories:
        return None
    labels, _ = scores.category_labels(store, run.run_id)
    chance = np.array([max(np.mean(labels == c), 1e-9) for c in range(len(run.categories))])
    lift = column / chance
    best = int(np.argmax(lift))
    return run.categories[best] if lift[best] >= LEAN else None


def _usable(lm: LoadedModel | None, run: Run) -> bool:
    return lm is not None and mismatch(run, lm.info, "run") is None


def explain_neuron(
    store: Store, run_id: str | None, layer: int, neuron: int, lm: LoadedModel | None = None
) -> Explanation:
    """The neuron's description and its score; with `lm` (the run's model) also its promoted tokens."""
    run = check_neuron(store, run_id or store.require_run().run_id, layer, neuron)
    arrays, meta = layer_explanations(store, run.run_id, layer)
    texts = meta["texts"]
    tokens = tuple(display_token(texts[t]) for t in arrays["tokens"][neuron] if t >= 0)
    promoted = ()
    if _usable(lm, run):
        found = vocab.neuron_tokens(lm, layer * run.d_ff + neuron, N_PROMOTED, store)
        promoted = tuple(t for t, _ in found["promoted"])
    category = None
    if run.categories:
        column = scores.functionality_scores(store, run.run_id)[:, layer * run.d_ff + neuron]
        category = _leaning(store, run, column)
    return Explanation(
        f"neuron {layer}:{neuron}", describe(tokens, promoted, category), float(arrays["score"][neuron]),
        tokens, promoted, category, int(meta["held_out"]),
    )  # fmt: skip


def explain_brick(store: Store, run_id: str | None, brick, lm: LoadedModel | None = None) -> Explanation:
    """A brick's (a core.bricks.candidates.Candidate) description and score: its tokens are chosen
    from its neurons' summed firings, its real activity is its neurons' mean per-prompt |a|, and its
    promoted tokens are those of its summed output, each column weighted by the neuron's mean
    signed activation over the run."""
    run = store.require_run(run_id)
    key = {"brick": brick.brick_id, "neurons": _digest(brick.neurons), "n": N_TOKENS, "version": VERSION}
    cached = store.get_json(run.run_id, "explain_brick", key)
    if cached is None:
        cached = _brick_tokens(store, run, brick.neurons)
        if not store.read_only:
            store.put_json(run.run_id, "explain_brick", key, cached)
    tokens = tuple(display_token(t) for t in cached["tokens"])
    promoted = ()
    if _usable(lm, run):
        mean_act = store.layer_array(run.run_id, "mean_act").reshape(-1)[brick.neurons]
        promoted = tuple(
            t for t, _ in vocab.group_tokens(lm, brick.neurons, mean_act, N_PROMOTED)["promoted"]
        )
    score = float("nan") if cached["score"] is None else float(cached["score"])
    return Explanation(
        f"brick {brick.brick_id}", describe(tokens, promoted, brick.label), score, tokens, promoted,
        brick.label, int(cached["held_out"]),
    )  # fmt: skip


def _brick_tokens(store: Store, run: Run, neurons: np.ndarray) -> dict:
    tokens = distinctive.run_tokens(store, run)
    fit_rows, held_out = _halves(store, run, tokens)
    fit_tokens = distinctive.run_tokens(store, run, fit_rows)
    counts = distinctive.group_counts(store, run, [np.asarray(neurons)], tokens, fit_rows)
    chosen = distinctive.top_types(distinctive.log_odds_z(counts, fit_tokens.counts), N_TOKENS)
    sim = (_prompt_shares(run, tokens) @ _picked(chosen, len(tokens.token_ids))).toarray()[:, 0]
    ids = np.asarray(neurons, np.int64)
    real = np.zeros(run.n_prompts, np.float64)
    for layer in np.unique(ids // run.d_ff):
        acts = store.prompt_activations(run.run_id, int(layer)).astype(np.float32)
        real += acts[:, ids[ids // run.d_ff == layer] % run.d_ff].sum(axis=1)
    r = pearson(sim[held_out, None], real[held_out, None] / max(len(ids), 1))[0]
    texts = tokens.texts[chosen[0]].tolist()
    return {"tokens": texts, "score": None if np.isnan(r) else float(r), "held_out": int(held_out.sum())}


def _digest(neurons: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(neurons, np.int64).tobytes()).hexdigest()[:16]
