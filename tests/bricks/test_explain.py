"""Offline explanations: descriptions from distinctive and promoted tokens, scored on held-out prompts."""

import shutil

import numpy as np
import pytest

from core.bricks import candidates, explain
from core.store import Store
from tests.bricks.test_distinctive import planted_run


def test_describe_and_trust():
    assert explain.describe([" Paris", "France"], [" city", " "], "knowledge") == (
        'fires on "Paris", "France"; promotes "city", " "; leans to knowledge prompts'
    )
    assert explain.describe([], [], None).startswith("no distinctive")
    e = explain.Explanation("neuron 0:0", "x", 0.6, (), (), None, 10)
    assert e.trust == "good" and e.to_dict()["trust"] == "good"
    assert explain.Explanation("n", "x", 0.1, (), (), None, 10).trust == "weak"
    assert explain.Explanation("n", "x", float("nan"), (), (), None, 10).trust == "none"


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.random((30, 3)), rng.random((30, 3))
    want = [np.corrcoef(a[:, i], b[:, i])[0, 1] for i in range(3)]
    assert np.allclose(explain.pearson(a, b), want)
    assert np.isnan(explain.pearson(np.ones((5, 1)), b[:5, :1])[0])


def test_a_planted_neuron_is_described_by_its_token_and_scores_high(store: Store):
    planted_run(store)
    paris = explain.explain_neuron(store, "fake", 0, 0)
    assert paris.tokens[0] == " Paris" and "Paris" in paris.text
    assert paris.score > 0.8 and paris.trust == "good"
    assert paris.n_held_out == 20 and paris.promoted == ()  # no model: no promoted tokens
    noise = explain.explain_neuron(store, "fake", 1, 5)  # fires at random, activity random
    assert not noise.score > 0.5
    arrays, _ = explain.layer_explanations(store, "fake", 0)
    # the control gives every neuron another's tokens: two draw one of the two that have any
    assert np.isfinite(arrays["control"]).sum() == np.isfinite(arrays["score"]).sum() == 2


def test_layer_explanations_are_cached(store: Store, monkeypatch):
    planted_run(store)
    first = explain.layer_explanations(store, "fake", 0)
    monkeypatch.setattr(explain.distinctive, "firing_by_type", lambda *a: pytest.fail("recomputed"))
    again = explain.layer_explanations(store, "fake", 0)
    assert np.array_equal(first[0]["tokens"], again[0]["tokens"]) and first[1] == again[1]
    monkeypatch.undo()
    assert len(explain.all_explanations(store, "fake")) == 16


def test_a_brick_explanation_scores_its_summed_activity(store: Store):
    planted_run(store)
    brick = candidates._brick("b", "coact", [0, 1], 8, "x", {"x": 1e-5}, [], None)
    got = explain.explain_brick(store, "fake", brick)
    assert got.tokens[0] == " Paris" and got.category == "x" and got.text.endswith("leans to x prompts")
    assert got.subject == "brick b" and np.isfinite(got.score)
    assert explain.explain_brick(store, "fake", brick) == got  # read back from the cache


def test_with_the_model_a_neuron_also_names_what_it_promotes(tiny_lm, small_run, tmp_path):
    path, run_id = small_run
    shutil.copy(path, tmp_path / "copy.duckdb")  # the shared run stays as it is
    store = Store(tmp_path / "copy.duckdb")
    got = explain.explain_neuron(store, run_id, 1, 7, lm=tiny_lm)
    assert len(got.promoted) == explain.N_PROMOTED and "promotes" in got.text
    assert got.n_held_out > 0 and -1 <= got.score <= 1 or np.isnan(got.score)
    store.close()
