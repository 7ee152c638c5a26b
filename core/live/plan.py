"""A brick configuration compiled for the live model: per layer, a' = a * scale + add on the FFN
activations (what interventions hook in and sparse execution computes), and the share of neurons
that still run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.configuration import BrickConfig, ConfigError

_RANK = {"keep": 0, "scale": 1, "mean": 2, "off": 3}  # applied in order; last wins


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """How to rewrite one layer's FFN activations a: a' = a * scale + add."""

    scale: np.ndarray  # (d_ff,) float32 multiplier
    add: np.ndarray  # (d_ff,) float32 added after scaling: the run mean, or 0


class Plan(dict):
    """{layer: LayerPlan} and the adapter bricks switched on, as (adapters.Adapter, factor) pairs."""

    adapters: tuple = ()


def compile_plan(config: BrickConfig, means=None) -> dict[int, LayerPlan]:
    """Plans for the layers that differ from identity. Overlaps: off beats mean beats
    scale (smallest factor wins) beats keep; with any keep brick, neurons outside all
    keep bricks are off whatever other bricks say. means: (n_layers, d_ff) float32."""
    means = _check_means(config, means)
    plans = {}
    for layer in _layers(config):
        scale, add = _layer_arrays(config, layer, means)
        if np.any(scale != 1) or np.any(add != 0):
            scale.flags.writeable = add.flags.writeable = False
            plans[layer] = LayerPlan(scale, add)
    return plans


def active_share(config: BrickConfig) -> float:
    """Fraction of FFN neurons still computed: not off, not outside a keep, not scaled
    by 0 and not mean-ablated (those output a constant)."""
    plans = (_layer_arrays(config, layer, None)[0] for layer in _layers(config))
    zeroed = sum(int(np.count_nonzero(scale == 0)) for scale in plans)
    return 1.0 - zeroed / (config.n_layers * config.d_ff)


def _layers(config: BrickConfig) -> list[int]:
    if any(brick.mode == "keep" for brick in config.bricks):
        return list(range(config.n_layers))
    return sorted({layer for brick in config.bricks for layer in brick.neurons})


def _layer_arrays(config: BrickConfig, layer: int, means) -> tuple[np.ndarray, ...]:
    scale, add = np.ones(config.d_ff, np.float32), np.zeros(config.d_ff, np.float32)
    kept = None
    for brick in sorted(config.bricks, key=lambda b: (_RANK[b.mode], -b.factor)):
        idx = np.asarray(brick.neurons.get(layer, ()), dtype=np.intp)
        if brick.mode == "keep":
            kept = np.zeros(config.d_ff, bool) if kept is None else kept
            kept[idx] = True
            continue
        scale[idx] = brick.factor if brick.mode == "scale" else 0.0
        mean = brick.mode == "mean" and means is not None
        add[idx] = means[layer, idx] if mean else 0.0
    if kept is not None:
        scale[~kept], add[~kept] = 0.0, 0.0
    return scale, add


def _check_means(config: BrickConfig, means) -> np.ndarray | None:
    users = [brick.name for brick in config.bricks if brick.mode == "mean"]
    if not users:
        return None
    if means is None:
        problem = f"bricks {users} use mode 'mean', which needs the run's means"
        raise ConfigError("means", f"{problem}; pass an (n_layers, d_ff) array")
    means = np.asarray(means, dtype=np.float32)
    if means.shape != config.shape or not np.isfinite(means).all():
        problem = f"expected finite values of shape {config.shape}, got {means.shape}"
        raise ConfigError("means", f"{problem}; pass the means of a run of this model")
    return means
