"""Mixture-of-experts experts on the live model: change the router's choice (remove, keep or scale an
expert, with or without renormalising the remaining top-k weights), this context only, through one
Dispatcher on each layer's routing site (core/experts.py). Masking an expert's neurons goes through
core.live.interventions like any brick; `expert_brick` makes the brick."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from core import configuration, experts, models
from core.errors import BricklabError
from core.live.hooks import Dispatcher

Routes = Callable[[torch.Tensor], torch.Tensor]  # dense routing weights (N, n_experts) -> rewritten


def _routes_sites(model) -> list:
    return [experts.routes_site(module) for module in experts.experts_modules(model)]


_routes = Dispatcher("expert_routes", "input", _routes_sites)


def require_moe(model) -> experts.Layout:
    if not experts.is_moe(model):
        raise BricklabError(
            f"This {model.config.model_type} model has no mixture-of-experts layers.",
            f"Expert bricks need one of: {', '.join(experts.MOE_TYPES)}.",
        )
    return experts.layout(model)


@contextmanager
def routed(model, per_layer: dict[int, Routes]):
    """Apply `per_layer[layer](w)` to layer `layer`'s dense routing weights, this context only (an
    observer returns w unchanged). Nested uses compose."""
    require_moe(model)
    modules = experts.experts_modules(model)
    for layer in per_layer:
        if not 0 <= layer < len(modules):
            raise ValueError(f"layer {layer} is out of range for a model with {len(modules)} layers")
    with _routes.using(model, [(experts.routes_site(modules[layer]), fn) for layer, fn in per_layer.items()]):
        yield


def reweigh(factors, renormalise: bool) -> Routes:
    """Multiply each expert's routing weight by its factor (0 removes it from the router's choice); with
    `renormalise` the chosen weights are rescaled to the sum they had, so the remaining experts take the
    removed ones' share (the top-k minus the removed, renormalised). Tokens whose chosen experts are all
    removed get no expert output."""
    factors = torch.as_tensor(np.asarray(factors, dtype=np.float32))

    def fn(w: torch.Tensor) -> torch.Tensor:
        out = w * factors.to(w.device, w.dtype)
        if renormalise:
            before, after = w.sum(-1, keepdim=True), out.sum(-1, keepdim=True)
            out = out * torch.where(after > 0, before / after.clamp_min(torch.finfo(w.dtype).tiny), 0)
        return out

    return fn


def router_factors(layout: experts.Layout, n_layers: int, changes: dict[tuple[int, int], float], keep=()):
    """(n_layers, n_experts) routing factors: 1, `changes[(layer, expert)]` where given; with `keep`
    ((layer, expert) pairs) 0 for every other expert of every layer, as keep bricks do (core.live.plan)."""
    factors = np.full((n_layers, layout.n_experts), 0.0 if keep else 1.0, np.float32)
    for layer, expert in keep:
        factors[layer, expert] = 1.0
    for (layer, expert), factor in changes.items():
        if not (0 <= layer < n_layers and 0 <= expert < layout.n_experts):
            raise BricklabError(
                f"Expert {expert} of layer {layer} does not exist.",
                f"Name layers 0-{n_layers - 1} and experts 0-{layout.n_experts - 1}.",
            )
        factors[layer, expert] = factor
    return factors


@contextmanager
def router_choice(model, factors: np.ndarray, renormalise: bool = True):
    """Run `model` with each layer's routing weights scaled by `factors` (n_layers, n_experts), this
    context only; layers whose factors are all 1 are left alone."""
    layout = require_moe(model)
    factors = np.asarray(factors, dtype=np.float32)
    n_layers = len(models.blocks(model))
    if factors.shape != (n_layers, layout.n_experts):
        raise BricklabError(
            f"Routing factors of shape {factors.shape} do not fit this model.",
            f"Give one factor per layer and expert: shape ({n_layers}, {layout.n_experts}).",
        )
    per_layer = {layer: reweigh(row, renormalise) for layer, row in enumerate(factors) if np.any(row != 1)}
    with routed(model, per_layer):
        yield


def expert_brick(layout: experts.Layout, layer: int, expert: int, mode: str = "off", factor: float = 1.0):
    """Expert `expert` of layer `layer` as a configuration brick (its neurons masked, kept or scaled)."""
    neurons = list(range(expert * layout.d_expert, (expert + 1) * layout.d_expert))
    return configuration.Brick(brick_id(layer, expert), {layer: neurons}, mode, factor)


def brick_id(layer: int, expert: int) -> str:
    return f"expert-L{layer}-E{expert}"


@dataclass(frozen=True)
class RoutedText:
    """Greedy continuations of one prompt, plain and with some experts taken out of the router's choice."""

    baseline: str
    routed: str
    first_divergence: int | None  # index of the first differing new token; None when identical


def compare_routed(lm, prompt: str, factors: np.ndarray, renormalise: bool = True, max_new_tokens: int = 24):
    """Generate greedily with the plain router and with `factors` (see router_choice), this context only."""
    from core.live import compare

    compare.check_new_tokens(max_new_tokens)
    ids = compare.prompt_ids(lm, prompt)
    with router_choice(lm.model, factors, renormalise):  # checked before anything is generated
        routed = compare.generate(lm, ids, max_new_tokens)
    baseline = compare.generate(lm, ids, max_new_tokens)
    decode = lm.tokenizer.decode
    return RoutedText(
        decode(baseline, skip_special_tokens=True),
        decode(routed, skip_special_tokens=True),
        compare.first_divergence(baseline, routed),
    )
