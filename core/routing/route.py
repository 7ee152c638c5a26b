"""Running routers: per input, which FFN neurons run. Category routing classifies the prompt from
its first layers; token routing picks the top-k bricks per token and layer (core.routing.topk); skipped
neurons are not computed (core.live.sparse). Fitting and the cache: routing.routers.
"""

from __future__ import annotations

import json
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from core import models
from core.capture.run import CaptureConfig
from core.configuration import Brick, BrickConfig
from core.errors import BricklabError
from core.live import evaluate, interventions, sparse
from core.prompts import encode
from core.routing import topk
from core.routing.routers import (  # noqa: F401 (the public names of core.routing.route)
    KINDS,
    MAP_FIELDS,
    RESULT_KIND,
    Kind,
    Router,
    RouterParams,
    _profile_features,
    brick_assignment,
    fit,
    load,
    selection_half,
)
from core.routing.token_map import MAP_ARRAYS, MAP_KIND  # noqa: F401
from core.store import Store

_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # router -> its layer functions
_lock = threading.Lock()


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
        return {layer: topk.TopBricks(row, k) for layer, row in enumerate(brick_of)}
    proposed = int(round(router.params.proposed * k))
    if router.params.gate:
        return {
            layer: topk.TopBricks(row, k, proposed=min(proposed, row.max() + 1), gate=True)
            for layer, row in enumerate(brick_of)
        }
    learned = [router.arrays[name] for name in MAP_ARRAYS]
    return {
        layer: topk.TopBricks(row, k, [w[layer] for w in learned], min(proposed, row.max() + 1))
        for layer, row in enumerate(brick_of)
    }


def _bricks_per_token(router: Router) -> int:
    return max(1, int(round(router.params.budget * (router.arrays["brick_of"].max() + 1))))


def _keep(router: Router, category: str | None) -> np.ndarray:
    keep = router.arrays["keep"]
    return keep if router.params.kind == "static" else keep[router.categories.index(category)]


def _running(lm: models.LoadedModel, router: Router, category: str | None, prefill: str = "routed"):
    """The context that runs the router: sparse execution, or masks where the MLP is not gated."""
    if sparse.supported(lm.model) or router.params.kind == "token":
        fns = layer_fns(router, category)  # token: raises on a plain MLP
        if prefill == "dense" and router.params.kind == "token":
            fns = {layer: _DecodeOnly(fn) for layer, fn in fns.items()}
        return sparse.sparse(lm.model, fns)
    kept = np.flatnonzero(_keep(router, category))
    return interventions.transforms(lm.model, evaluate.kept_neurons(*router.shape, kept))


def active_share(router: Router, category: str | None = None) -> float:
    """Share of the model's FFN neurons that run (token routing: per token, at most)."""
    if router.params.kind != "token":
        return float(_keep(router, category).mean())
    k, brick_of = _bricks_per_token(router), router.arrays["brick_of"]
    largest = [np.sort(np.bincount(row))[::-1][:k].sum() for row in brick_of]
    return float(sum(largest) / brick_of.size)


class _DecodeOnly:
    """A token router's layer function for one token at a time (generation); passes of several
    tokens (the prompt) run dense."""

    def __init__(self, fn: topk.TopBricks):
        self.fn = fn

    def __call__(self, f: sparse.Ffn, x: torch.Tensor) -> torch.Tensor:
        return self.fn(f, x) if x.numel() == x.shape[-1] else f.down(f.activations(x))


@contextmanager
def routed(
    lm: models.LoadedModel,
    router: Router,
    ids: list[int] | None = None,
    span=None,
    prefill: Literal["routed", "dense"] = "routed",
):
    """Run `lm` under `router` in this context (forward and generate); yields the Route. Category
    routing classifies the prompt first (its token ids and the span of its own tokens, as
    `prompt_span` gives them). Skipped neurons are not computed where the MLP is gated. With
    prefill="dense", a token router routes only passes of one token (each generated token) and runs
    the prompt's pass dense: a prompt is computed in one batch, where skipping neurons saves little."""
    if prefill not in ("routed", "dense"):
        raise BricklabError(f"Unknown prefill {prefill!r}.", "Use 'routed' or 'dense'.")
    check(router, lm.info)
    category = probabilities = None
    if router.params.kind == "category":
        if ids is None or span is None:
            raise BricklabError("Category routing needs the prompt.", "Pass the prompt's token ids and span.")
        probabilities = classify(lm, router, ids, span)
        category = max(probabilities, key=probabilities.get)
    share, fast = active_share(router, category), sparse.supported(lm.model)
    with _running(lm, router, category, prefill):
        yield Route(router.params.kind, category, probabilities, share, fast)


def prompt_span(lm: models.LoadedModel, text: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids for a prompt as capture encodes it, and the span of its own tokens."""
    e = encode(lm.tokenizer, text, CaptureConfig().max_tokens, CaptureConfig().chat_template)
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
    what = f"The router fitted on run '{router.run_id}'"
    models.check_match(router, info, what, "Fit a router on a run of the loaded model.")


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
    models.check_match(router, config, "The configuration's router", "Fit a router for this model.")
    return router
