"""Changing FFN activations of a shared live model, safely for many threads at once.

The activation is the input of each layer's down projection; a core.live.hooks.Dispatcher puts one
pre-hook on each while at least one intervention is active anywhere in the process, and each hook runs
the *calling context's* transform, so a thread (a browser session) only ever sees its own
configuration. When the last intervention exits, every hook is removed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

from core import configuration, models
from core.configuration import BrickConfig
from core.errors import BricklabError
from core.live import adapters
from core.live.hooks import Dispatcher
from core.live.plan import Plan, compile_plan

Transform = Callable[[torch.Tensor], torch.Tensor]  # a (..., d_ff) -> a' (..., d_ff)


def _down_projections(model) -> list:
    return [models.down_proj(model, layer) for layer in range(len(models.blocks(model)))]


_hooks = Dispatcher("transforms", "input", _down_projections)


@contextmanager
def transforms(model, per_layer: dict[int, Transform]):
    """Apply `per_layer[layer](a)` to layer `layer`'s FFN activation inside the block, this context only.

    Nested uses compose: the inner transform runs on the outer one's output.
    """
    n_layers = len(models.blocks(model))
    for layer in per_layer:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {n_layers} layers")
    with _hooks.using(model, [(models.down_proj(model, layer), fn) for layer, fn in per_layer.items()]):
        yield


def affine(scale: torch.Tensor, add: torch.Tensor | None = None) -> Transform:
    """a' = a * scale + add, with (d_ff,) vectors moved to the activation's device and dtype once."""
    cache: dict = {}

    def fn(a: torch.Tensor) -> torch.Tensor:
        key = (a.device, a.dtype)
        if key not in cache:
            cache[key] = (scale.to(a.device, a.dtype), None if add is None else add.to(a.device, a.dtype))
        s, b = cache[key]
        return a * s if b is None else torch.addcmul(b, a, s)

    return fn


@contextmanager
def apply_plan(model, plan: dict):
    """Apply a compiled brick configuration: {layer: LayerPlan(scale, add)} from core.live.plan, and
    the adapters of a Plan."""
    per_layer = {}
    for layer, lp in plan.items():
        # copies: LayerPlan arrays are read-only, which torch.as_tensor warns about
        scale = torch.from_numpy(np.array(lp.scale, dtype=np.float32))
        add = torch.from_numpy(np.array(lp.add, dtype=np.float32))
        per_layer[int(layer)] = affine(scale, add if bool(add.any()) else None)
    with transforms(model, per_layer), adapters.applied(model, getattr(plan, "adapters", ())):
        yield


def run_means(config: BrickConfig, info: models.ModelInfo, store=None, run_id=None) -> np.ndarray | None:
    """The run's mean activations (n_layers, d_ff) when a brick is in `mean` mode, else None."""
    users = [brick.name for brick in config.bricks if brick.mode == "mean"]
    if not users:
        return None
    if store is None or run_id is None:
        raise BricklabError(
            f"Bricks {users} are in 'mean' mode, which replaces activations by their mean over a run.",
            "Name a complete run captured with this model (store and run_id; --run on the CLI).",
        )
    run = store.require_run(run_id)
    fix = "Use a run of the loaded model for 'mean' bricks, or capture one."
    models.check_match(run, info, f"Run '{run_id}'", fix)
    return store.layer_array(run_id, "mean_act")


def plan_for(lm: models.LoadedModel, config: BrickConfig, store=None, run_id=None) -> dict:
    """Validate `config` against the loaded model and compile it: {layer: LayerPlan}, with its adapters
    checked (file present, hash right) and loaded."""
    configuration.check_model(config, lm.info)
    plan = Plan(compile_plan(config, run_means(config, lm.info, store, run_id)))
    plan.adapters = adapters.resolve(lm, config)
    return plan


@contextmanager
def configured(lm: models.LoadedModel, config: BrickConfig, store=None, run_id=None):
    """Run `lm` with a brick configuration, this context only (forward and generate); yields the plan.

    Everything is checked before any hook exists, so a bad configuration leaves the model untouched.
    """
    plan = plan_for(lm, config, store, run_id)
    with apply_plan(lm.model, plan):
        yield plan


def hook_count(model) -> int:
    """Forward hooks and pre-hooks left on the model (0 after any bricklab call)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def has_transform(model, layer: int) -> bool:
    """Whether the calling context transforms layer `layer`'s activation (for core.live.sparse, which
    must then hand the down projection the full-width activation)."""
    return _hooks.lookup(models.down_proj(model, layer)) is not None
