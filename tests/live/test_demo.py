"""The Playground's first lesson (core/live/demo.py): the brick it shows, its random control, the verdict."""

from __future__ import annotations

import numpy as np

from core.bricks.candidates import Candidate
from core.live import demo
from core.live.compare import Comparison


def brick(brick_id, label, p, neurons=(0, 1, 5, 130, 131)) -> Candidate:
    ids = np.array(neurons, np.int32)
    layers = tuple(sorted({int(i) // 128 for i in neurons}))
    return Candidate(brick_id, "functional", ids, layers, len(ids), label, {"math": p}, (), None)


def test_pick_prefers_the_knowledge_brick_then_the_most_enriched_labelled_one():
    found = [brick("coact-L00-00", None, 1e-9), brick("functional-math", "math", 1e-30),
             brick("functional-knowledge", "knowledge", 1e-5)]  # fmt: skip
    assert demo.pick(found).brick_id == "functional-knowledge"
    assert demo.pick(found[:2]).brick_id == "functional-math"
    assert demo.pick(found[:1]) is None  # nothing labelled: no demo


def test_the_control_has_the_same_size_in_the_same_layers_and_other_neurons():
    b = brick("functional-knowledge", "knowledge", 1e-5, tuple(range(0, 60)) + tuple(range(128, 140)))
    control = demo.random_like(b, d_ff=128, seed=0)
    assert control.size == b.size and control.layers == b.layers and control.label is None
    assert np.array_equal(np.bincount(control.neurons // 128), np.bincount(b.neurons // 128))
    assert len(np.unique(control.neurons)) == b.size
    assert not np.array_equal(control.neurons, b.neurons)
    assert np.array_equal(control.neurons, demo.random_like(b, d_ff=128, seed=0).neurons)  # seeded


def comparison(kl, divergence, text="Paris."):
    return Comparison("p", (1,), (1, 2), (1, 3), ("a",), ("b",), "Paris.", text, divergence, kl, 0.95)


def test_the_verdict_states_the_effect_with_its_numbers():
    b = brick("functional-knowledge", "knowledge", 1e-5)
    clear = demo.verdict(b, comparison((0.9, 1.1), 0, "Lyon."), comparison((0.01, 0.03), None))
    assert clear.startswith("A clear effect") and "50.0×" in clear and "“Lyon.”" in clear
    assert "1.000 vs 0.020 nats" in clear and "stays the same" in clear
    weak = demo.verdict(b, comparison((0.02,), None), comparison((0.02,), None))
    assert weak.startswith("No clear effect") and "1.0×" in weak
