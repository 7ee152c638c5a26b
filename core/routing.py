"""Routers: per input, which FFN neurons run. Static (one set), category (classify the prompt from
its first layers, keep that category's neurons) and token routing (per token and layer, the top-k
bricks by true or predicted activation mass, as in MoEfication); fitted on the selection half of a
run, stored in the cache and referenced from a brick configuration's `source`.
"""

from __future__ import annotations

import io
import json
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from core import bricks, evaluate, interventions, models, scores, sparse
from core.capture import CaptureConfig, encode
from core.configuration import Brick, BrickConfig
from core.errors import BricklabError
from core.store import Store

Kind = Literal["static", "category", "token"]
KINDS = ("static", "category", "token")
RESULT_KIND = "router"  # store.put_result kind of routers
MAP_KIND = "router_map"  # ... and of learned token maps, shared by routers of every budget
MAP_FIELDS = ("brick_size", "router_rank", "fit_prompts")
MAP_ARRAYS = ("w_in", "w_out", "bias")
Progress = Callable[[int, int, str], None]
_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # router -> its layer functions
_lock = threading.Lock()


@dataclass(frozen=True)
class RouterParams:
    kind: Kind = "category"
    budget: float = 0.35  # share of each layer's FFN neurons that run (token: per token)
    rank: Literal["mass", "score"] = "mass"  # static/category: order neurons by the category's mean
    # output magnitude |a| * ||W_down[:, i]|| ("mass") or by its functionality score ("score")
    profile_layers: int = 4  # category: layers whose mean |a| profile classifies a prompt
    brick_size: int = 32  # token: co-activation brick size (BrickParams "coact"); 1 routes neurons
    oracle: bool = False  # token: the true activation mass picks the bricks (a quality bound)
    proposed: float = 1.0  # token, learned: bricks the map proposes per kept brick; above 1 their
    # true mass picks the kept ones among them (only proposed bricks are computed)
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
        ]
        for bad, problem in problems:
            if bad:
                raise BricklabError(f"Invalid router parameters: {problem}.", "Fix the value and try again.")

    def key(self) -> dict:
        """The fields that shape this kind of router: its cache key."""
        own = {
            "static": ("budget", "rank"),
            "category": ("budget", "rank", "profile_layers"),
            "token": ("budget", "brick_size", "oracle") + (() if self.oracle else ("proposed", *MAP_FIELDS)),
        }[self.kind]
        return {k: v for k, v in asdict(self).items() if k in (*own, "kind", "seed")}

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
    lm: models.LoadedModel, store: Store, run_id: str | None, params: RouterParams, progress=None
) -> Router:
    """The router for (run, params): read from the cache, else fitted on the selection half and stored."""
    run = store.require_run(run_id)
    if run.fingerprint != lm.info.fingerprint:
        raise BricklabError(
            f"Run '{run.run_id}' was captured with {run.model_id}, not the loaded model {lm.info.model_id}.",
            "Fit routers on a run of the loaded model.",
        )
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
        store.put_result(run.run_id, RESULT_KIND, params.key(), _dump(router))
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


def brick_assignment(store: Store, run, size: int) -> np.ndarray:
    """int (L, d_ff): each neuron's brick within its layer; size 1 makes every neuron a brick."""
    if size == 1:
        return np.tile(np.arange(run.d_ff), (run.n_layers, 1))
    found = bricks.compute_bricks(store, run.run_id, bricks.BrickParams(method="coact", size=size))
    brick_of = np.full((run.n_layers, run.d_ff), -1)
    for brick in found:
        layer, index = brick.neurons // run.d_ff, brick.neurons % run.d_ff
        brick_of[layer, index] = brick_of[layer].max() + 1
    for layer in range(run.n_layers):  # a neuron in no brick becomes one of its own
        loose = np.flatnonzero(brick_of[layer] < 0)
        brick_of[layer, loose] = brick_of[layer].max() + 1 + np.arange(len(loose))
    return brick_of


class _Normal:
    """Least-squares normal equations x -> brick mass for one layer, accumulated over tokens."""

    def __init__(self, brick_of: np.ndarray, d_model: int):
        self.brick_of = torch.from_numpy(brick_of)
        self.n_bricks = int(brick_of.max()) + 1
        self.xtx = torch.zeros(d_model + 1, d_model + 1, dtype=torch.float64)
        self.xty = torch.zeros(d_model + 1, self.n_bricks, dtype=torch.float64)
        self.valid: torch.Tensor | None = None  # (B, T) bool: positions of the current batch to use

    def __call__(self, f: sparse.Ffn, x: torch.Tensor) -> torch.Tensor:
        a = f.activations(x)
        valid = self.valid.to(x.device)
        rows, acts = x[valid].float(), a[valid].abs().float()  # (n, d), (n, d_ff)
        mass = acts.new_zeros((len(acts), self.n_bricks)).index_add_(1, self.brick_of.to(x.device), acts)
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], dim=1)
        self.xtx += (rows.T @ rows).double().cpu()  # float32 within a batch, float64 across batches
        self.xty += (rows.T @ mass).double().cpu()
        return f.down(a)

    def solve(self, rank: int, ridge: float = 1e-2) -> dict:
        """Ridge regression of the masses on x with an intercept, cut to `rank` by reduced-rank
        regression (the top principal directions of the fitted masses), so routing costs about
        rank * (d_model + n_bricks) multiply-adds per token."""
        n = self.xtx[-1, -1]
        mx, my = self.xtx[:-1, -1] / n, self.xty[-1] / n
        cxx = self.xtx[:-1, :-1] - n * torch.outer(mx, mx)  # centred sums of squares
        cxy = self.xty[:-1] - n * torch.outer(mx, my)
        eye = torch.eye(len(cxx), dtype=cxx.dtype)
        w = torch.linalg.solve(cxx + ridge * torch.trace(cxx) / len(cxx) * eye, cxy)  # (d, n_bricks)
        v = torch.eye(self.n_bricks, dtype=w.dtype)
        if 0 < rank < self.n_bricks:
            v = torch.linalg.eigh(w.T @ cxx @ w)[1][:, -rank:]  # (n_bricks, r), largest eigenvalues
        bias = my - mx @ w @ v @ v.T
        return {"w_in": (w @ v).float(), "w_out": v.T.float(), "bias": bias.float()}


def _fit_token(lm, store, run, params, progress) -> dict:
    brick_of = brick_assignment(store, run, params.brick_size)
    if params.oracle:
        return {"brick_of": brick_of}
    if (cached := store.get_result(run.run_id, MAP_KIND, params.map_key())) is not None:
        return {"brick_of": brick_of} | _unpack(cached)
    half = np.flatnonzero(selection_half(store, run.run_id, params.seed))
    if params.fit_prompts:
        half = np.sort(np.random.default_rng(params.seed).permutation(half)[: params.fit_prompts])
    rows = store.prompts(run.run_id)
    config = CaptureConfig(**{k: run.settings[k] for k in ("chat_template", "max_tokens")})
    encoded = [encode(lm.tokenizer, rows[i][3], config, config.max_tokens) for i in half]
    normals = {layer: _Normal(brick_of[layer], lm.info.d_model) for layer in range(run.n_layers)}
    device = next(lm.model.parameters()).device
    with torch.inference_mode(), sparse.sparse(lm.model, normals):
        for b in range(0, len(encoded), 8):
            ids, mask = _padded([e.ids for e in encoded[b : b + 8]], lm.tokenizer.pad_token_id or 0)
            for normal in normals.values():
                normal.valid = mask.bool()
            lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            if progress:
                progress(min(b + 8, len(encoded)), len(encoded), "fitting the token router")
    solved = [normals[layer].solve(params.router_rank) for layer in range(run.n_layers)]
    learned = {k: torch.stack([s[k] for s in solved]).numpy() for k in MAP_ARRAYS}
    store.put_result(run.run_id, MAP_KIND, params.map_key(), _pack(learned))
    return {"brick_of": brick_of} | learned


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


@dataclass(frozen=True)
class Route:
    """What a router chose for one input."""

    kind: Kind
    category: str | None  # category routing: the predicted category
    probabilities: dict[str, float] | None  # category routing: the classifier's belief per category
    active_share: float  # share of the model's FFN neurons that run (per token for token routing)
    sparse: bool  # True when skipped neurons are not computed at all (else they are masked)


def classify(
    lm: models.LoadedModel, router: Router, ids: list[int], span: tuple[int, int]
) -> dict[str, float]:
    """Category probabilities for a prompt from the mean |a| of its own tokens (ids[span[0]:span[1]])
    in the first `profile_layers` layers; only those layers run."""
    coef, intercept = router.arrays["coef"], router.arrays["intercept"]
    n_layers = coef.shape[1] // router.shape[1]
    profile = _profile(lm, ids, span, n_layers)
    z = (_profile_features(profile) - router.arrays["mean"]) / router.arrays["std"]
    logits = coef @ z + intercept
    p = np.exp(logits - logits.max())
    return dict(zip(router.categories, (p / p.sum()).tolist(), strict=True))


class _Enough(Exception):
    """Stops a forward pass once the profiled layers ran."""


@torch.inference_mode()
def _profile(lm, ids: list[int], span: tuple[int, int], n_layers: int) -> np.ndarray:
    seen = []

    def record(layer: int):
        def fn(f: sparse.Ffn, x: torch.Tensor) -> torch.Tensor:
            a = f.activations(x)
            seen.append(a[0, span[0] : span[1]].abs().float().mean(dim=0))
            if layer == n_layers - 1:
                raise _Enough
            return f.down(a)

        return fn

    device = next(lm.model.parameters()).device
    try:
        with sparse.sparse(lm.model, {layer: record(layer) for layer in range(n_layers)}):
            lm.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    except _Enough:
        pass
    return torch.cat(seen).cpu().numpy()


def layer_fns(router: Router, category: str | None = None) -> dict[int, sparse.LayerFn]:
    """The sparse layer functions that run `router`. Static and token routers build them once (a
    static set is gathered once); category routing builds them per call, i.e. once per prompt."""
    if router.params.kind == "category":
        return _build_fns(router, category)
    with _lock:
        if router not in _built:
            _built[router] = _build_fns(router, None)
        return _built[router]


def _build_fns(router: Router, category: str | None) -> dict[int, sparse.LayerFn]:
    if router.params.kind != "token":
        return {
            layer: sparse.KeepOnly(row) for layer, row in enumerate(_keep(router, category)) if not row.all()
        }
    brick_of, k = router.arrays["brick_of"], _bricks_per_token(router)
    if router.params.oracle:
        return {layer: sparse.TopBricks(row, k) for layer, row in enumerate(brick_of)}
    proposed = int(round(router.params.proposed * k))
    learned = [router.arrays[name] for name in MAP_ARRAYS]
    return {
        layer: sparse.TopBricks(row, k, [w[layer] for w in learned], min(proposed, row.max() + 1))
        for layer, row in enumerate(brick_of)
    }


def _bricks_per_token(router: Router) -> int:
    return max(1, int(round(router.params.budget * (router.arrays["brick_of"].max() + 1))))


def _keep(router: Router, category: str | None) -> np.ndarray:
    keep = router.arrays["keep"]
    return keep if router.params.kind == "static" else keep[router.categories.index(category)]


def _running(lm: models.LoadedModel, router: Router, category: str | None):
    """The context that runs the router: sparse execution, or masks where the MLP is not gated."""
    if sparse.supported(lm.model) or router.params.kind == "token":
        return sparse.sparse(lm.model, layer_fns(router, category))  # token: raises on a plain MLP
    kept = np.flatnonzero(_keep(router, category))
    return interventions.transforms(lm.model, evaluate.kept_neurons(*router.shape, kept))


def active_share(router: Router, category: str | None = None) -> float:
    """Share of the model's FFN neurons that run (token routing: per token, at most)."""
    if router.params.kind != "token":
        return float(_keep(router, category).mean())
    k, brick_of = _bricks_per_token(router), router.arrays["brick_of"]
    largest = [np.sort(np.bincount(row))[::-1][:k].sum() for row in brick_of]
    return float(sum(largest) / brick_of.size)


@contextmanager
def routed(lm: models.LoadedModel, router: Router, ids: list[int] | None = None, span=None):
    """Run `lm` under `router` in this context (forward and generate); yields the Route. Category
    routing classifies the prompt first (its token ids and the span of its own tokens, as
    `prompt_span` gives them). Skipped neurons are not computed where the MLP is gated."""
    check(router, lm.info)
    category = probabilities = None
    if router.params.kind == "category":
        if ids is None or span is None:
            raise BricklabError("Category routing needs the prompt.", "Pass the prompt's token ids and span.")
        probabilities = classify(lm, router, ids, span)
        category = max(probabilities, key=probabilities.get)
    share, fast = active_share(router, category), sparse.supported(lm.model)
    with _running(lm, router, category):
        yield Route(router.params.kind, category, probabilities, share, fast)


def prompt_span(lm: models.LoadedModel, text: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids for a prompt as capture encodes it, and the span of its own tokens."""
    e = encode(lm.tokenizer, text, CaptureConfig(), CaptureConfig().max_tokens)
    return e.ids, (e.start, e.end)


def routed_losses(lm: models.LoadedModel, router: Router, texts: list[str]) -> tuple[np.ndarray, list]:
    """Mean next-token loss per text under the router, and the category each text was routed to."""
    if router.params.kind != "category":
        with routed(lm, router):
            return evaluate.loss_per_prompt(lm, texts), [None] * len(texts)
    chosen = []
    for text in texts:
        probabilities = classify(lm, router, *prompt_span(lm, text))
        chosen.append(max(probabilities, key=probabilities.get))
    losses = np.full(len(texts), np.nan)
    for category in sorted(set(chosen)):
        rows = [i for i, c in enumerate(chosen) if c == category]
        with _running(lm, router, category):
            losses[rows] = evaluate.loss_per_prompt(lm, [texts[i] for i in rows])
    return losses, chosen


def check(router: Router, info: models.ModelInfo) -> None:
    if (router.fingerprint, router.shape) != (info.fingerprint, (info.n_layers, info.d_ff)):
        raise BricklabError(
            f"This router was fitted for another model (run '{router.run_id}'), not {info.model_id}.",
            "Fit a router on a run of the loaded model.",
        )


def to_config(router: Router, info: models.ModelInfo, note: str | None = None) -> BrickConfig:
    """A brick configuration that references the router (source.router); a static router's set is
    also written out as one keep brick, so the file applies without the cache too."""
    check(router, info)
    bricks_ = ()
    if router.params.kind == "static":
        neurons = {layer: np.flatnonzero(row).tolist() for layer, row in enumerate(router.arrays["keep"])}
        bricks_ = (Brick("routed", {k: v for k, v in neurons.items() if v}, "keep"),)
    source = {"router": router.ref()}
    return BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, bricks_, source, note)


def from_config(store: Store, config: BrickConfig) -> Router | None:
    """The router a configuration references, from the cache; None when it references none."""
    ref = (config.source or {}).get("router")
    if ref is None:
        return None
    router = load(store, ref)
    if router is None:
        raise BricklabError(
            f"The configuration's router ({json.dumps(ref)}) is not in this cache.",
            "Fit it again on the same run (same parameters), or open the cache it was made with.",
        )
    if router.fingerprint != config.fingerprint:
        raise BricklabError(
            "The configuration's router belongs to another model.", "Fit a router for this model."
        )
    return router


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
    payload = store.get_result(ref["run_id"], RESULT_KIND, params.key())
    if payload is None:
        return None
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "meta"}
        meta = json.loads(data["meta"].tobytes())
    if params.kind == "token" and not params.oracle:
        learned = store.get_result(ref["run_id"], MAP_KIND, params.map_key())
        if learned is None:
            return None
        arrays |= _unpack(learned)
    return Router(
        params, ref["run_id"], meta["fingerprint"], tuple(meta["shape"]), tuple(meta["categories"]), arrays
    )


def _dump(router: Router) -> bytes:
    """The router's own arrays and identity; a learned token map is stored once, under MAP_KIND."""
    meta = {
        "fingerprint": router.fingerprint,
        "shape": list(router.shape),
        "categories": list(router.categories),
    }
    own = {k: v for k, v in router.arrays.items() if k not in MAP_ARRAYS}
    return _pack(own | {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)})


def _pack(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _unpack(payload: bytes) -> dict:
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
