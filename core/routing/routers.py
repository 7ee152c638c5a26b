"""Router parameters, fitting and the cache: static (one neuron set), category (a classifier on the
prompt's first layers and a set per category) and token routers (co-activation bricks, with an oracle,
a learned map or the gate proposing them per token), fitted on the selection half of a run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from core import models
from core.bricks import scores
from core.errors import BricklabError
from core.progress import Progress
from core.routing import token_map
from core.routing.token_map import MAP_ARRAYS, MAP_KIND, brick_assignment
from core.store import Store

Kind = Literal["static", "category", "token"]
KINDS = ("static", "category", "token")
RESULT_KIND = "router"  # store.put_arrays kind of routers
MAP_FIELDS = ("brick_size", "router_rank", "fit_prompts")


@dataclass(frozen=True)
class RouterParams:
    kind: Kind = "category"
    budget: float = 0.35  # share of each layer's FFN neurons that run (token: per token)
    rank: Literal["mass", "score"] = "mass"  # static/category: order neurons by the category's mean
    # output magnitude |a| * ||W_down[:, i]|| ("mass") or by its functionality score ("score")
    profile_layers: int = 4  # category: layers whose mean |a| profile classifies a prompt
    brick_size: int = 32  # token: co-activation brick size (BrickParams "coact"); 1 routes neurons
    oracle: bool = False  # token: the true activation mass picks the bricks (a quality bound)
    proposed: float = 1.0  # token, learned or gate: bricks proposed per kept brick; above 1 their
    # true mass picks the kept ones among them (only proposed bricks are computed)
    gate: bool = False  # token: every neuron's gate activation |act(gate_i . x)| proposes the bricks
    # (as in CATS; nothing to fit); up and down run only for the proposed and kept neurons
    router_rank: int = 128  # token: rank of the learned linear map x -> brick mass (0: full rank)
    fit_prompts: int = 0  # token: selection-half prompts the learned map is fitted on (0: all)
    seed: int = 0  # the selection/held-out halves (scores.prompt_halves) and the fit sample

    def __post_init__(self):
        problems = [
            (self.kind not in KINDS, f"kind {self.kind!r} is not one of {KINDS}"),
            (not 0 < self.budget <= 1, f"budget {self.budget} must be in (0, 1]"),
            (self.rank not in ("mass", "score"), f"rank {self.rank!r} is not 'mass' or 'score'"),
            (self.profile_layers < 1, f"profile_layers {self.profile_layers} must be >= 1"),
            (self.brick_size < 1, f"brick_size {self.brick_size} must be >= 1"),
            (min(self.router_rank, self.fit_prompts) < 0, "router_rank and fit_prompts must be >= 0"),
            (not self.proposed >= 1, f"proposed {self.proposed} must be >= 1"),
            (self.gate and self.oracle, "gate and oracle exclude each other"),
        ]
        for bad, problem in problems:
            if bad:
                raise BricklabError(f"Invalid router parameters: {problem}.", "Fix the value and try again.")

    def key(self) -> dict:
        """The fields that shape this kind of router: its cache key."""
        own = {
            "static": ("budget", "rank"),
            "category": ("budget", "rank", "profile_layers"),
            "token": ("budget", "brick_size", "oracle") + self._proposer(),
        }[self.kind]
        return {k: v for k, v in asdict(self).items() if k in (*own, "kind", "seed")}

    def _proposer(self) -> tuple[str, ...]:
        """Token routing: the fields of what proposes the bricks ("gate" only when set, so that the
        keys of routers stored before it existed still match)."""
        return () if self.oracle else ("gate", "proposed") if self.gate else ("proposed", *MAP_FIELDS)

    def map_key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in (*MAP_FIELDS, "seed")}


@dataclass(frozen=True, eq=False)
class Router:
    params: RouterParams
    run_id: str
    fingerprint: str  # the model it was fitted for
    shape: tuple[int, int]  # (n_layers, d_ff)
    categories: tuple[str, ...]
    arrays: dict[str, np.ndarray]  # static: keep (L, d_ff); category: keep (C, L, d_ff) and the
    # classifier coef (C, F), intercept (C,), mean/std (F,); token: brick_of (L, d_ff), and for the
    # learned map w_in (L, d_model, r), w_out (L, r, n_bricks), bias (L, n_bricks)

    def ref(self) -> dict:
        """What a configuration's `source` holds to find this router again."""
        return {"kind": RESULT_KIND, "run_id": self.run_id, "params": self.params.key()}


def fit(
    lm: models.LoadedModel,
    store: Store,
    run_id: str | None,
    params: RouterParams,
    progress: Progress | None = None,
) -> Router:
    """The router for (run, params): read from the cache, else fitted on the selection half and stored."""
    run = store.require_run(run_id)
    models.check_match(run, lm.info, f"Run '{run.run_id}'", "Fit routers on a run of the loaded model.")
    if (cached := load(store, {"run_id": run.run_id, "params": params.key()})) is not None:
        return cached
    with store.run_lock(f"{run.run_id}:router"):
        if (cached := load(store, {"run_id": run.run_id, "params": params.key()})) is not None:
            return cached
        fitter = {"static": _fit_static, "category": _fit_category, "token": _fit_token}[params.kind]
        arrays = fitter(lm, store, run, params, progress)
        router = Router(
            params, run.run_id, run.fingerprint, (run.n_layers, run.d_ff), tuple(run.categories), arrays
        )
        store.put_arrays(run.run_id, RESULT_KIND, params.key(), *_to_arrays(router))
    return router


def selection_half(store: Store, run_id: str, seed: int = 0) -> np.ndarray:
    """bool (n_prompts,): the prompts routers are fitted on; the rest is held out for evaluation."""
    return scores.prompt_halves(store, run_id, seed)


def _ranking(store: Store, run, params: RouterParams, lm) -> np.ndarray:
    """float (C, L, d_ff): per category, higher = kept first."""
    half = selection_half(store, run.run_id, params.seed)
    if params.rank == "score":
        out = scores.functionality_scores(store, run.run_id, half=0, seed=params.seed)
        return np.nan_to_num(out, nan=-1.0).reshape(-1, run.n_layers, run.d_ff)
    acts = store.prompt_activations(run.run_id)[half].astype(np.float32)
    labels, names = scores.category_labels(store, run.run_id)
    norms = torch.stack([models.down_column_norms(lm.model, layer) for layer in range(run.n_layers)]).numpy()
    means = [acts[labels[half] == c].mean(axis=0) for c in range(len(names))]
    return np.stack(means).reshape(-1, run.n_layers, run.d_ff) * norms


def _top_per_layer(rank: np.ndarray, budget: float, resident: np.ndarray) -> np.ndarray:
    """bool (L, d_ff): the resident neurons, then the best-ranked, up to `budget` of each layer."""
    n_layers, d_ff = rank.shape
    k = max(1, int(round(budget * d_ff)))
    keep = np.zeros((n_layers, d_ff), dtype=bool)
    keep.reshape(-1)[resident] = True
    for layer in range(n_layers):
        order = np.argsort(-rank[layer], kind="stable")
        room = max(0, k - int(keep[layer].sum()))
        keep[layer, order[~keep[layer, order]][:room]] = True
    return keep


def _category_keep(lm, store, run, params) -> np.ndarray:
    rank = _ranking(store, run, params, lm)
    resident = scores.resident_neurons(store, run.run_id)
    return np.stack([_top_per_layer(r, params.budget, resident) for r in rank])


def _fit_static(lm, store, run, params, progress) -> dict:
    """One set for every input: ranks are per-layer percentiles, best over categories (the union
    of the categories' top neurons)."""
    percentile = _ranking(store, run, params, lm).argsort(axis=2).argsort(axis=2)
    resident = scores.resident_neurons(store, run.run_id)
    return {"keep": _top_per_layer(percentile.max(axis=0), params.budget, resident)}


def _profile_features(acts: np.ndarray) -> np.ndarray:
    return np.log1p(10 * acts.astype(np.float32))  # mean |a| is long-tailed


def _fit_category(lm, store, run, params, progress) -> dict:
    from sklearn.linear_model import LogisticRegression

    half = selection_half(store, run.run_id, params.seed)
    labels, names = scores.category_labels(store, run.run_id)
    rows = half & (labels >= 0)
    if len(np.unique(labels[rows])) < 2:
        raise BricklabError(
            "A category router needs prompts of at least two categories.", "Capture a categorised prompt set."
        )
    width = min(params.profile_layers, run.n_layers) * run.d_ff
    feats = _profile_features(store.prompt_activations(run.run_id)[rows, :width])
    mean, std = feats.mean(axis=0), feats.std(axis=0) + 1e-3
    model = LogisticRegression(C=0.05, max_iter=300).fit((feats - mean) / std, labels[rows])
    weights, bias = model.coef_, model.intercept_
    if len(model.classes_) == 2:  # sklearn keeps one row for two classes
        weights, bias = np.vstack([-weights, weights]) / 2, np.array([-bias[0], bias[0]]) / 2
    coef = np.zeros((len(names), width), np.float32)
    intercept = np.full(len(names), -np.inf, np.float32)  # a category absent from the half never wins
    coef[model.classes_], intercept[model.classes_] = weights, bias
    keep = _category_keep(lm, store, run, params)
    return {"keep": keep, "coef": coef, "intercept": intercept, "mean": mean, "std": std}


def load(store: Store, ref: dict) -> Router | None:
    """A stored router by reference ({"run_id", "params"}); None when it is not in the cache."""
    if (
        not isinstance(ref, dict)
        or not isinstance(ref.get("run_id"), str)
        or not isinstance(ref.get("params"), dict)
    ):
        raise BricklabError(
            f"Not a router reference: {json.dumps(ref)[:80]}.", 'Use {"run_id": ..., "params": {...}}.'
        )
    try:
        params = RouterParams(**ref["params"])
    except TypeError as err:
        raise BricklabError(
            f"Unknown router parameters in {json.dumps(ref)[:80]}: {err}.", "Export it again."
        ) from None
    cached = store.get_arrays(ref["run_id"], RESULT_KIND, params.key())
    if cached is None:
        return None
    arrays, meta = cached
    if params.kind == "token" and not (params.oracle or params.gate):
        learned = store.get_arrays(ref["run_id"], MAP_KIND, params.map_key())
        if learned is None:
            return None
        arrays |= learned[0]
    return Router(
        params, ref["run_id"], meta["fingerprint"], tuple(meta["shape"]), tuple(meta["categories"]), arrays
    )


def _to_arrays(router: Router) -> tuple[dict[str, np.ndarray], dict]:
    """The router's own arrays and identity; a learned token map is stored once, under MAP_KIND."""
    meta = {
        "fingerprint": router.fingerprint,
        "shape": list(router.shape),
        "categories": list(router.categories),
    }
    return {k: v for k, v in router.arrays.items() if k not in MAP_ARRAYS}, meta


def _fit_token(lm, store, run, params, progress) -> dict:
    if params.oracle or params.gate:
        return {"brick_of": brick_assignment(store, run, params.brick_size)}
    return token_map.fit_token(lm, store, run, params, progress)
