"""Changing FFN activations of a shared live model, safely for many threads at once.

One dispatcher pre-hook per layer's down projection is installed while at least one intervention
is active anywhere in the process; each hook looks up the *calling context's* transforms through a
ContextVar, so a thread (a browser session) only ever sees its own configuration. When the last
intervention exits, every hook is removed.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

from core import configuration, models
from core.configuration import BrickConfig, ConfigError
from core.errors import BricklabError
from core.live import adapters
from core.live.hooks import SharedInstall

Transform = Callable[[torch.Tensor], torch.Tensor]  # a (..., d_ff) -> a' (..., d_ff)

_active: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bricklab_transforms", default=None)


def _dispatch(layer: int):
    def hook(module, args):
        transforms = _active.get()
        if not transforms:
            return None
        fn = transforms.get((id(module), layer))
        if fn is None:
            return None
        return (fn(args[0]), *args[1:])

    return hook


def _install(model):
    handles = [
        models.down_proj(model, layer).register_forward_pre_hook(_dispatch(layer))
        for layer in range(len(models.blocks(model)))
    ]
    return lambda: [handle.remove() for handle in handles]


_hooks = SharedInstall(_install)


@contextmanager
def transforms(model, per_layer: dict[int, Transform]):
    """Apply `per_layer[layer](a)` to layer `layer`'s FFN activation inside the block, this context only.

    Nested uses compose: the inner transform runs on the outer one's output.
    """
    n_layers = len(models.blocks(model))
    for layer in per_layer:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {n_layers} layers")
    outer = _active.get() or {}
    mine = dict(outer)
    for layer, fn in per_layer.items():
        key = (id(models.down_proj(model, layer)), layer)
        previous = outer.get(key)
        mine[key] = fn if previous is None else _compose(previous, fn)
    with _hooks.held(model):
        token = _active.set(mine)
        try:
            yield
        finally:
            _active.reset(token)


def _compose(first: Transform, second: Transform) -> Transform:
    return lambda a: second(first(a))


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


class Plan(dict):
    """{layer: LayerPlan} and the adapter bricks switched on, as (adapters.Adapter, factor) pairs."""

    adapters: tuple = ()


@contextmanager
def apply_plan(model, plan: dict):
    """Apply a compiled brick configuration: {layer: LayerPlan(scale, add)} from core.configuration,
    and the adapters of a Plan."""
    per_layer = {}
    for layer, lp in plan.items():
        # copies: LayerPlan arrays are read-only, which torch.as_tensor warns about
        scale = torch.from_numpy(np.array(lp.scale, dtype=np.float32))
        add = torch.from_numpy(np.array(lp.add, dtype=np.float32))
        per_layer[int(layer)] = affine(scale, add if bool(add.any()) else None)
    with transforms(model, per_layer), adapters.applied(model, getattr(plan, "adapters", ())):
        yield


def check_model(config: BrickConfig, info: models.ModelInfo) -> None:
    """Refuse a configuration made for other weights or another FFN shape."""
    for field in ("fingerprint", "n_layers", "d_ff"):
        got, want = getattr(config, field), getattr(info, field)
        if got != want:
            problem = f"the configuration says {got!r} ({config.model_id}), the loaded model {info.model_id}"
            fix = "load the model it was made for, or export it again from this one"
            raise ConfigError(f"model.{field}", f"{problem} has {want!r}; {fix}")


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
    if run.fingerprint != info.fingerprint:
        raise BricklabError(
            f"Run '{run_id}' was captured with {run.model_id}, not the loaded model {info.model_id}.",
            "Use a run of the loaded model for 'mean' bricks, or capture one.",
        )
    return store.layer_array(run_id, "mean_act")


def plan_for(lm: models.LoadedModel, config: BrickConfig, store=None, run_id=None) -> dict:
    """Validate `config` against the loaded model and compile it: {layer: LayerPlan}, with its adapters
    checked (file present, hash right) and loaded."""
    check_model(config, lm.info)
    plan = Plan(configuration.compile_plan(config, run_means(config, lm.info, store, run_id)))
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
    active = _active.get()
    return bool(active) and (id(models.down_proj(model, layer)), layer) in active
