"""What routing buys and costs: one prompt generated dense and routed side by side (what
the router chose, the share of neurons that ran, the time per token), and the quality–compute curve
of router kinds over budgets on a few held-out prompts, cached in the store."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from core import models
from core.bricks import scores
from core.errors import BricklabError
from core.live import compare, evaluate, sparse
from core.progress import Progress
from core.routing import route as routing
from core.routing.route import Router, RouterParams
from core.store import Store

CURVE_KIND = "routing_curve"  # store.put_json kind of curves
PRESETS = {  # router preset -> RouterParams fields besides the budget
    "category": {"kind": "category"},
    "static": {"kind": "static"},
    "token_oracle": {"kind": "token", "oracle": True},
    "token_learned": {"kind": "token", "fit_prompts": 32},  # 32 prompts: a fit of seconds, not minutes
    # single neurons, not bricks: the best trade-off of benchmarks/routing.py (loss ~1.00x at 35%)
    "neuron_oracle": {"kind": "token", "oracle": True, "brick_size": 1},
}
CURVE_PRESETS = ("category", "static", "token_oracle", "token_learned")  # brick routers
TIMING_REPEATS = 2  # dense and routed generation, interleaved; the fastest of each counts


def router_params(preset: str, budget: float) -> RouterParams:
    if preset not in PRESETS:
        raise BricklabError(f"Unknown router kind {preset!r}.", f"Use one of {', '.join(PRESETS)}.")
    return RouterParams(budget=budget, **PRESETS[preset])


@dataclass(frozen=True)
class RoutedRun:
    """One prompt generated greedily by the dense model and under a router."""

    dense_pieces: tuple[str, ...]  # generated tokens, each decoded on its own
    routed_pieces: tuple[str, ...]
    first_divergence: int | None  # first generated index where they differ; None when identical
    route: routing.Route
    kept: np.ndarray | None  # bool (L, d_ff): the neurons that ran for this prompt (static, category)
    brick_use: np.ndarray | None  # token routing: (L, n_bricks) share of the prompt's tokens that ran
    # each brick
    dense_seconds: float  # per generated token, prompt included, fastest of TIMING_REPEATS
    routed_seconds: float  # the same under the router, routing included
    brick_size: int = 0  # token routing: neurons per brick (1: single neurons)

    @property
    def time_saved(self) -> float:
        return 1 - self.routed_seconds / self.dense_seconds


def routed_run(lm: models.LoadedModel, router: Router, prompt: str, max_new_tokens: int) -> RoutedRun:
    compare.check_new_tokens(max_new_tokens)  # the same cap as the manual comparison
    compare.prompt_ids(lm, prompt)  # the same checks (empty, too long) as the manual comparison
    ids, span = routing.prompt_span(lm, prompt)
    best = {"dense": np.inf, "routed": np.inf}
    for _ in range(TIMING_REPEATS):
        dense, seconds = _timed(lm, None, ids, span, max_new_tokens)
        best["dense"] = min(best["dense"], seconds / max(len(dense), 1))
        (routed, route), seconds = _timed(lm, router, ids, span, max_new_tokens)
        best["routed"] = min(best["routed"], seconds / max(len(routed), 1))
    kept = brick_use = None
    if router.params.kind == "token":
        brick_use = _brick_use(lm, router, ids)
    else:
        kept = router.arrays["keep"]
        kept = kept if router.params.kind == "static" else kept[router.categories.index(route.category)]
    pieces = [compare.display_pieces(lm.tokenizer, tokens) for tokens in (dense, routed)]
    split = compare.first_divergence(dense, routed)
    size = router.params.brick_size
    return RoutedRun(*pieces, split, route, kept, brick_use, best["dense"], best["routed"], size)


def _timed(lm, router: Router | None, ids: list[int], span, max_new_tokens: int):
    """(generated ids, or (ids, Route) under a router), wall seconds."""
    started = time.perf_counter()
    if router is None:
        return generate(lm, ids, max_new_tokens), time.perf_counter() - started
    # token routers run the prompt dense and route each generated token, as benchmarks/routing.py times
    # them: routing the chat template's last tokens derails the answer (seen with single neurons at 35%)
    prefill = "dense" if router.params.kind == "token" else "routed"
    with routing.routed(lm, router, ids, span, prefill=prefill) as route:
        out = generate(lm, ids, max_new_tokens)
    return (out, route), time.perf_counter() - started


@torch.inference_mode()
def generate(lm: models.LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy generation, new ids only; nothing else is kept, so the timing is the model's."""
    inputs = torch.tensor([ids], device=next(lm.model.parameters()).device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    out = lm.model.generate(
        inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad,
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


@torch.inference_mode()
def _brick_use(lm, router: Router, ids: list[int]) -> np.ndarray:
    """float (L, n_bricks): per layer, the share of the prompt's tokens whose top-k bricks (by
    predicted mass, or true mass for the oracle) include each brick."""
    brick_of = router.arrays["brick_of"]
    use = np.zeros((len(brick_of), int(brick_of.max()) + 1))
    fns = routing.layer_fns(router)

    def watch(layer: int):
        inner = fns[layer]

        def fn(f: sparse.Ffn, x: torch.Tensor) -> torch.Tensor:
            mass = inner.score(x, f)
            if mass is None:
                a = f.activations(x).abs().float()  # (1, T, d_ff)
                mass = a.new_zeros((*a.shape[:-1], inner.n_bricks)).index_add_(-1, inner.brick_of, a)
            chosen = inner.top(mass, inner.k).reshape(-1, inner.n_bricks)  # (T, n_bricks)
            use[layer, : inner.n_bricks] = chosen.float().mean(dim=0).cpu().numpy()
            return inner(f, x)

        return fn

    device = next(lm.model.parameters()).device
    with sparse.sparse(lm.model, {layer: watch(layer) for layer in fns}):
        lm.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return use


@dataclass(frozen=True)
class CurveParams:
    budgets: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65, 0.8)  # share of each layer's neurons that run
    per_category: int = 2  # held-out prompts per category the loss is measured on
    presets: tuple[str, ...] = CURVE_PRESETS  # one line per router kind

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def held_out(store: Store, run_id: str, per_category: int) -> list[str]:
    """The first `per_category` prompts of each category among those routers are not fitted on."""
    half = routing.selection_half(store, run_id)
    labels, names = scores.category_labels(store, run_id)
    members = [np.flatnonzero(~half & (labels == c))[:per_category] for c in range(len(names))]
    picked = sorted(i for group in members for i in group)
    rows = store.prompts(run_id)
    return [rows[i][3] for i in picked]


def stored_curve(store: Store, run_id: str, params: CurveParams = CurveParams()) -> dict | None:
    return store.get_json(run_id, CURVE_KIND, params.to_dict())


def curve(
    lm: models.LoadedModel,
    store: Store,
    run_id: str,
    params: CurveParams = CurveParams(),
    progress: Progress | None = None,
) -> dict:
    """Per router kind and budget: the loss on held-out prompts relative to the dense model and the
    mean share of FFN neurons that ran; fits the routers it needs. From the cache when measured."""
    run = store.require_run(run_id)
    if (cached := stored_curve(store, run.run_id, params)) is not None:
        return cached
    texts = held_out(store, run.run_id, params.per_category)
    if not texts:
        raise BricklabError(
            "This run has no held-out prompts with a category to measure the curve on.",
            "Capture a categorised prompt set with at least two prompts per category.",
        )
    dense = float(np.nanmean(evaluate.loss_per_prompt(lm, texts)))
    steps = [(preset, budget) for preset in params.presets for budget in params.budgets]
    lines: dict[str, list[dict]] = {preset: [] for preset in params.presets}
    for done, (preset, budget) in enumerate(steps):
        if progress:
            progress(done, len(steps), f"{preset} router at {budget:.0%}")
        router = routing.fit(lm, store, run.run_id, router_params(preset, budget))
        losses, chosen = routing.routed_losses(lm, router, texts)
        share = float(np.mean([routing.active_share(router, c) for c in chosen]))
        ratio = float(np.nanmean(losses)) / dense
        lines[preset].append({"budget": budget, "active_share": share, "loss_ratio": ratio})
    if progress:
        progress(len(steps), len(steps), "done")
    result = {"n_prompts": len(texts), "dense_loss": dense, "lines": lines}
    store.put_json(run.run_id, CURVE_KIND, params.to_dict(), result)
    return result
