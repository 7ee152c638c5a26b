"""Compiled brick plans: per-layer scale and add, overlap precedence, and the share of neurons that run."""

import numpy as np
import pytest
from hypothesis import given, settings

from core.configuration import Brick, BrickConfig, ConfigError
from core.live.plan import active_share, compile_plan
from tests.test_configuration import D, L, bricks_strategy, config


def plan_of(c, means=None):
    return {layer: (p.scale.tolist(), p.add.tolist()) for layer, p in compile_plan(c, means).items()}


def test_plan_off_and_scale_touch_only_their_layers():
    plans = compile_plan(config(Brick("x", {1: [2]}, "off"), Brick("y", {3: [0, 1]}, "scale", 2.0)))
    assert sorted(plans) == [1, 3]
    assert plans[1].scale.dtype == np.float32 and plans[1].scale.shape == (D,)
    assert plans[1].scale[2] == 0 and np.count_nonzero(plans[1].scale != 1) == 1
    assert plans[3].scale[:3].tolist() == [2, 2, 1] and not plans[3].add.any()
    with pytest.raises(ValueError):
        plans[1].scale[0] = 5  # shared plans are read-only


def test_plan_mean_adds_the_run_mean_and_needs_means():
    c = config(Brick("m", {2: [4]}, "mean"))
    means = np.arange(L * D, dtype=np.float32).reshape(L, D)
    plan = compile_plan(c, means)[2]
    assert plan.scale[4] == 0 and plan.add[4] == means[2, 4] and plan.add.sum() == means[2, 4]
    err = pytest.raises(ConfigError, compile_plan, c).value
    assert err.path == "means" and "mean" in err.problem
    err = pytest.raises(ConfigError, compile_plan, c, means[:2]).value
    assert err.path == "means" and f"({L}, {D})" in err.problem


def test_plan_keep_switches_off_everything_else_in_every_layer():
    plans = compile_plan(config(Brick("k", {0: [1, 2]}, "keep")))
    assert sorted(plans) == list(range(L))
    assert np.flatnonzero(plans[0].scale).tolist() == [1, 2]
    assert not any(plans[layer].scale.any() for layer in (1, 2, 3))
    assert active_share(config(Brick("k", {0: [1, 2]}, "keep"))) == pytest.approx(2 / (L * D))


def test_plan_overlaps_off_beats_mean_beats_scale_beats_keep():
    means = np.full((L, D), 7, np.float32)
    c = config(
        Brick("k", {0: [0, 1, 2, 3, 4]}, "keep"),
        Brick("s1", {0: [1, 2, 3, 4, 9]}, "scale", 3.0),
        Brick("s2", {0: [2]}, "scale", 0.5),
        Brick("m", {0: [3, 4, 9]}, "mean"),
        Brick("o", {0: [4, 9]}, "off"),
    )
    scale, add = plan_of(c, means)[0]
    assert scale[:5] == [1, 3, 0.5, 0, 0] and add[:5] == [0, 0, 0, 7, 0]
    assert scale[9] == add[9] == 0  # outside every keep brick: off whatever else says


def test_active_share_counts_off_scaled_to_zero_and_mean_as_inactive():
    assert active_share(config()) == 1.0
    c = config(Brick("o", {0: [1, 2]}, "off"), Brick("m", {1: [1]}, "mean"), Brick("s", {2: [3]}, "scale", 0))
    assert active_share(c) == pytest.approx(1 - 4 / (L * D))
    assert active_share(config(Brick("s", {2: [3]}, "scale", 0.5))) == 1.0


def test_identity_bricks_compile_to_no_layers():
    full = config(
        Brick("k", {layer: range(D) for layer in range(L)}, "keep"), Brick("s", {1: [2]}, "scale", 1)
    )
    assert compile_plan(full) == {}


def reference_plan(c: BrickConfig, means):
    """The precedence rules, one neuron at a time."""
    scale, add = np.ones((L, D), np.float32), np.zeros((L, D), np.float32)
    keeping = any(b.mode == "keep" for b in c.bricks)
    for layer in range(L):
        for i in range(D):
            hits = [b for b in c.bricks if i in b.neurons.get(layer, ())]
            modes = {b.mode for b in hits}
            if (keeping and "keep" not in modes) or "off" in modes:
                scale[layer, i] = 0
            elif "mean" in modes:
                scale[layer, i], add[layer, i] = 0, means[layer, i]
            elif "scale" in modes:
                scale[layer, i] = min(b.factor for b in hits if b.mode == "scale")
    return scale, add


@settings(max_examples=150, deadline=None)
@given(bricks_strategy)
def test_random_configs_match_the_reference_plan(bricks):
    c = config(*bricks, source={"run_id": 1})
    means = np.random.default_rng(0).normal(size=(L, D)).astype(np.float32)
    scale, add = reference_plan(c, means)
    plans = compile_plan(c, means)
    for layer in range(L):
        plan = plans.get(layer)
        np.testing.assert_array_equal(scale[layer], np.ones(D) if plan is None else plan.scale)
        np.testing.assert_array_equal(add[layer], np.zeros(D) if plan is None else plan.add)
    assert active_share(c) == pytest.approx(np.count_nonzero(scale) / (L * D))
