"""Per-category functionality scores of every FFN neuron (the paper's average precision), the
top neurons they select, and the "resident" neurons that are strongly active for every category.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln
from scipy.stats import hypergeom

from core import prompts
from core.errors import BricklabError
from core.kernels import coact as kernels
from core.store import Store


def category_labels(store: Store, run_id: str | None) -> tuple[np.ndarray, list[str]]:
    """int32 label per prompt (index into the run's categories, -1 without one) and the names."""
    run = store.require_run(run_id)
    index = {name: i for i, name in enumerate(run.categories)}
    labels = [index.get(category, -1) for _, _, category, _ in store.prompts(run.run_id)]
    return np.asarray(labels, dtype=np.int32), list(run.categories)


def prompt_halves(store: Store, run_id: str | None, seed: int = 0) -> np.ndarray:
    """bool (n_prompts,): True for half A of the prompts, drawn per category so each half keeps
    the category mix (stability compares results computed on the two halves)."""
    labels, _ = category_labels(store, run_id)
    return prompts.halves(labels, seed)


def functionality_scores(
    store: Store, run_id: str | None, shuffled: bool = False, seed: int = 0, half: int | None = None
) -> np.ndarray:
    """float32 (n_categories, n_layers * d_ff): average precision of each neuron's per-prompt
    mean |a| for "prompt is in category c" against the rest. shuffled=True permutes the labels
    (seeded): the chance baseline of the paper's Fig. 8. half=0 or 1 scores only that half of
    `prompt_halves(seed)`. Cached in the store."""
    run = store.require_run(run_id)
    params = {"shuffled": bool(shuffled)}
    params |= {"seed": int(seed)} if shuffled or half is not None else {}
    params |= {"half": int(half)} if half is not None else {}
    cached = store.get_arrays(run.run_id, "functionality", params)
    if cached is not None:
        return cached[0]["scores"]
    labels, names = category_labels(store, run.run_id)
    if not names:
        raise BricklabError(
            f"Run '{run.run_id}' has no prompt categories, so there is nothing to score against.",
            "Capture a prompt set whose prompts have a 'category' field.",
        )
    X = store.prompt_activations(run.run_id)
    if half is not None:
        rows = prompt_halves(store, run.run_id, seed) == (half == 0)
        X, labels = X[rows], labels[rows]
    if shuffled:
        labels = np.random.default_rng(seed).permutation(labels)
    # Uncategorised prompts count as "rest" for every category: give them one extra label.
    extra = np.where(labels < 0, len(names), labels)
    scores = kernels.average_precision(X, extra, len(names) + 1)[: len(names)]
    store.put_arrays(run.run_id, "functionality", params, {"scores": scores})
    return scores


def top_neurons(scores: np.ndarray, percent: float, exclude: np.ndarray | None = None) -> list[np.ndarray]:
    """Per category, the sorted global ids (int32) of the top `percent`% neurons by score.

    The count is `percent`% of all neurons (at least one), so excluding some neurons does not
    shrink the sets; excluded neurons and NaN scores are never picked. Ties go to the lower id.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise BricklabError(f"scores must be (n_categories, n_neurons), got shape {scores.shape}.")
    if not 0 < percent <= 100:
        raise BricklabError(f"percent must be in (0, 100], got {percent}.", "Use e.g. 5 for the top 5%.")
    k = max(1, int(round(scores.shape[1] * percent / 100)))
    eligible = np.ones(scores.shape[1], dtype=bool)
    if exclude is not None:
        eligible[np.asarray(exclude, dtype=np.int64)] = False
    out = []
    for row in scores:
        ok = eligible & ~np.isnan(row)
        candidates = np.flatnonzero(ok)
        order = np.argsort(-row[candidates], kind="stable")[:k]
        out.append(np.sort(candidates[order]).astype(np.int32))
    return out


def resident_neurons(
    store: Store, run_id: str | None, quantile: float = 0.9, share: float = 0.8
) -> np.ndarray:
    """Sorted global ids (int32) of neurons that are strongly active for at least `share` of
    the prompts of every category: "strongly" means a per-prompt mean |a| above the
    `quantile` quantile of that prompt's values in the neuron's layer (a per-prompt threshold,
    so long and short prompts weigh alike). Cached in the store."""
    if not 0 < quantile < 1 or not 0 < share <= 1:
        raise BricklabError(
            f"quantile must be in (0, 1) and share in (0, 1], got {quantile} and {share}.",
            "The defaults are quantile 0.9, share 0.8.",
        )
    run = store.require_run(run_id)
    params = {"quantile": float(quantile), "share": float(share)}
    cached = store.get_arrays(run.run_id, "resident", params)
    if cached is not None:
        return cached[0]["ids"]
    labels, names = category_labels(store, run.run_id)
    acts = store.prompt_activations(run.run_id).reshape(run.n_prompts, run.n_layers, run.d_ff)
    strong = acts > np.quantile(acts, quantile, axis=2, keepdims=True).astype(acts.dtype)
    resident = np.ones(run.n_layers * run.d_ff, dtype=bool)
    for c in range(len(names)):
        rows = strong[labels == c].reshape(-1, run.n_layers * run.d_ff)
        resident &= rows.mean(axis=0) >= share if len(rows) else False
    ids = np.flatnonzero(resident).astype(np.int32) if names else np.zeros(0, np.int32)
    store.put_arrays(run.run_id, "resident", params, {"ids": ids})
    return ids


def enrichment(groups: list[np.ndarray], top_sets: list[np.ndarray], n_layers: int, d_ff: int) -> np.ndarray:
    """float64 (n_groups, n_categories): the p-value of a group holding at least as many of a
    category's top neurons as it does, were it drawn at random with the same number of neurons
    from each of its layers. Within one layer that is the hypergeometric test of Emergent
    Modularity; across layers the per-layer hypergeometric laws are convolved exactly, so a
    group is not called functional merely for sitting in layers rich in top neurons."""
    top = np.zeros((len(top_sets), n_layers * d_ff), dtype=bool)
    for c, ids in enumerate(top_sets):
        top[c, ids] = True
    per_layer = top.reshape(len(top_sets), n_layers, d_ff).sum(axis=2)  # (n_categories, n_layers)
    groups = [np.asarray(g, dtype=np.int64) for g in groups]
    hits = np.array([top[:, g].sum(axis=1) for g in groups]).reshape(len(groups), len(top_sets))
    first = np.array([g.min() // d_ff if len(g) else 0 for g in groups], dtype=np.int64)
    single = np.array([len(g) == 0 or g.min() // d_ff == g.max() // d_ff for g in groups], dtype=bool)
    sizes = np.array([len(g) for g in groups]).reshape(-1, 1)
    out = hypergeom.sf(hits - 1, d_ff, per_layer[:, first].T, sizes)  # groups within one layer
    for i in np.flatnonzero(~single):
        pmf = np.ones((len(top_sets), 1))
        for layer, n in zip(*np.unique(groups[i] // d_ff, return_counts=True), strict=True):
            k = per_layer[:, layer, None]
            support = np.arange(min(n, k.max()) + 1)  # at most k of a layer's top neurons
            pmf = _convolve_rows(pmf, _hypergeom_pmf(support, d_ff, k, n))
        out[i] = [min(1.0, row[x:].sum()) for row, x in zip(pmf, hits[i], strict=True)]
    return out


def _hypergeom_pmf(x: np.ndarray, total: int, good: np.ndarray, drawn: int) -> np.ndarray:
    """scipy's hypergeom.pmf through log-gamma: the same numbers, without its ~1 ms per call."""
    x, good = np.asarray(x, dtype=np.float64), np.asarray(good, dtype=np.float64)
    ok = (x <= good) & (drawn - x <= total - good)

    def log_choose(n, k):
        return gammaln(n + 1) - gammaln(k + 1) - gammaln(np.maximum(n - k, 0) + 1)

    logp = log_choose(good, x) + log_choose(total - good, drawn - x) - log_choose(total, drawn)
    return np.where(ok, np.exp(np.where(ok, logp, 0.0)), 0.0)


def _convolve_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise convolution of two (rows, *) arrays: the law of a sum of independent counts."""
    return np.stack([np.convolve(x, y) for x, y in zip(a, b, strict=True)])


def layer_summary(scores: np.ndarray, n_layers: int) -> dict[str, np.ndarray]:
    """Per layer over every (category, neuron) score: the best, the 5 per-mille quantile from
    the top (the paper's Fig. 8) and the mean; each float (n_layers,)."""
    per_layer = np.asarray(scores, dtype=np.float64).reshape(len(scores), n_layers, -1)
    per_layer = per_layer.transpose(1, 0, 2).reshape(n_layers, -1)
    return {
        "best": np.nanmax(per_layer, axis=1),
        "permille5": np.nanquantile(per_layer, 0.995, axis=1),
        "mean": np.nanmean(per_layer, axis=1),
    }


def layer_table(store: Store, run_id: str | None, functional: list[np.ndarray]) -> dict[str, dict]:
    """The paper's Fig. 8 in numbers: per layer, the best, 5 per-mille and mean functionality
    score over all neurons, and the count and mean score of the functional sets' neurons (one set
    per category, scored for it); under "real", and under "shuffled" the same statistics with
    shuffled labels (the shuffled sets are the top neurons of the shuffled scores)."""
    run = store.require_run(run_id)
    real = functionality_scores(store, run.run_id)
    fake = functionality_scores(store, run.run_id, shuffled=True)
    percent = 100 * np.mean([len(s) for s in functional]) / real.shape[1] if functional else 5.0
    out = {}
    for name, s, sets in (("real", real, functional), ("shuffled", fake, top_neurons(fake, percent))):
        n, mean = _set_scores(s, sets, run.n_layers, run.d_ff)
        out[name] = layer_summary(s, run.n_layers) | {"set_neurons": n, "set_mean": mean}
    return out


def _set_scores(scores: np.ndarray, sets: list[np.ndarray], n_layers: int, d_ff: int):
    """Per layer: the number of (category, neuron) pairs in the sets and their mean score."""
    layer = np.concatenate([np.asarray(ids) // d_ff for ids in sets]).astype(np.int64)
    value = np.concatenate([scores[c, ids] for c, ids in enumerate(sets)]).astype(np.float64)
    count = np.bincount(layer, minlength=n_layers)
    with np.errstate(invalid="ignore"):
        return count, np.bincount(layer, weights=value, minlength=n_layers) / count


# --- selection rules: which neurons count as a category's "top" neurons ---------------------------

RULES = ("ap", "contrastive", "no_resident", "per_layer", "validated")
RULE_NOTES = {
    "ap": "top by average precision, the category against all other prompts (the paper's rule)",
    "contrastive": "top by the worst average precision of the category against each other category alone",
    "no_resident": "top by average precision, leaving out neurons strongly active for every category",
    "per_layer": "top by average precision of activations divided by the prompt's mean in that layer",
    "validated": "average-precision candidates kept where zeroing them hurts the own category most "
    "on the selection half",
}
MODEL_FREE_RULES = ("ap", "contrastive", "no_resident", "per_layer")  # "validated" runs the model


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise BricklabError(f"Unknown selection rule {rule!r}.", f"Use one of {', '.join(RULES)}.")


def rule_scores(X: np.ndarray, labels: np.ndarray, n_categories: int, n_layers: int, rule: str) -> np.ndarray:
    """float32 (n_categories, n_neurons): the scores a rule ranks neurons by, from the prompts' mean
    |a| X (n_prompts, n_layers * d_ff). Uncategorised prompts (label -1) count as "rest" for the
    average-precision rules and are left out by the contrastive one; no_resident and validated rank
    by plain average precision (their difference lies in which neurons may be picked)."""
    check_rule(rule)
    if rule == "contrastive":
        return contrastive_scores(X, labels, n_categories)
    if rule == "per_layer":
        X = per_layer_normalised(X, n_layers)
    extra = np.where(labels < 0, n_categories, labels)
    return kernels.average_precision(X, extra, n_categories + 1)[:n_categories]


def contrastive_scores(X: np.ndarray, labels: np.ndarray, n_categories: int) -> np.ndarray:
    """float32 (n_categories, n_neurons): min over other categories d of AP(c against d alone).

    A neuron scores high for c only if it separates c from *every* other category, so neurons that
    c shares with one neighbour (prose for knowledge and writing, say) rank low."""
    out = np.full((n_categories, X.shape[1]), np.inf, dtype=np.float32)
    for c in range(n_categories):
        for d in range(c + 1, n_categories):
            rows = np.flatnonzero((labels == c) | (labels == d))
            if not len(rows):
                continue
            pair = kernels.average_precision(X[rows], (labels[rows] == d).astype(np.int32), 2)
            out[c] = np.fmin(out[c], pair[0])  # fmin: a pair without prompts (NaN) does not count
            out[d] = np.fmin(out[d], pair[1])
    out[np.isinf(out)] = np.nan
    return out


def per_layer_normalised(X: np.ndarray, n_layers: int) -> np.ndarray:
    """X (n_prompts, n_layers * d_ff) with each prompt's values in each layer divided by their mean:
    a prompt that drives a whole layer harder (long prose, say) no longer ranks high on every neuron."""
    P = X.reshape(len(X), n_layers, -1).astype(np.float32)
    return (P / np.maximum(P.mean(axis=2, keepdims=True), 1e-12)).reshape(len(X), -1)


def selectivity(matrix) -> list[float | None]:
    """Per category (row i of an ablation matrix of increases): own increase ÷ mean increase on the
    other categories; None where that mean is not positive (the ratio would mean nothing) or a value
    is missing."""
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=np.float64)
    n = len(m)
    out: list[float | None] = []
    for i in range(n):
        others = np.delete(m[i], i) if n > 1 else np.array([np.nan])
        own, mean = m[i, i], float(np.mean(others))
        ok = np.isfinite(own) and np.isfinite(mean) and mean > 0
        out.append(round(float(own / mean), 2) if ok else None)
    return out


def rule_top_neurons(
    store: Store,
    run_id: str | None,
    rule: str,
    percent: float,
    seed: int = 0,
    half: int | None = None,
    exclude_resident: bool = False,
) -> list[np.ndarray]:
    """`top_neurons` of a model-free rule over the run's prompts (or half 0/1 of `prompt_halves`), as
    functional bricks take them; "ap" is `functionality_scores`, the others are cached beside it."""
    check_rule(rule)
    if rule not in MODEL_FREE_RULES:
        raise BricklabError(
            f"The selection rule {rule!r} runs the model, and bricks are found without it.",
            f"Use one of {', '.join(MODEL_FREE_RULES)} here; the Paper analysis offers {rule!r}.",
        )
    run = store.require_run(run_id)
    exclude = resident_neurons(store, run.run_id) if exclude_resident or rule == "no_resident" else None
    if rule in ("ap", "no_resident"):
        return top_neurons(functionality_scores(store, run.run_id, seed=seed, half=half), percent, exclude)
    params = {"rule": rule} | ({"seed": int(seed), "half": int(half)} if half is not None else {})
    cached = store.get_arrays(run.run_id, "rule_scores", params)
    if cached is None:
        labels, names = category_labels(store, run.run_id)
        X = store.prompt_activations(run.run_id)
        if half is not None:
            rows = prompt_halves(store, run.run_id, seed) == (half == 0)
            X, labels = X[rows], labels[rows]
        s = rule_scores(X, labels, len(names), run.n_layers, rule)
        store.put_arrays(run.run_id, "rule_scores", params, {"scores": s})
    else:
        s = cached[0]["scores"]
    return top_neurons(s, percent, exclude)
