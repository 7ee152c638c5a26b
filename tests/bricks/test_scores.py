"""Functionality scores, top and resident neurons: on hand-made runs and on the tiny capture."""

import json

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import average_precision_score

from core.bricks import scores
from core.errors import BricklabError
from core.store import Store


def fake_run(store: Store, X: np.ndarray, categories: list, status: str = "complete", run_id="fake") -> str:
    """A run with given per-prompt means X (n_prompts, n_layers, d_ff) and prompt categories."""
    n_prompts, n_layers, d_ff = X.shape
    names = sorted({c for c in categories if c})
    row = {
        "run_id": run_id, "model_id": "fake", "model_type": "llama", "fingerprint": "f",
        "prompt_set": "fake", "prompt_hash": "h", "settings": "{}", "n_layers": n_layers,
        "d_ff": d_ff, "n_prompts": n_prompts, "n_chunks": 1, "categories": json.dumps(names),
        "status": status,
    }  # fmt: skip
    prompts = [(i, f"p{i}", c, f"text {i}") for i, c in enumerate(categories)]
    means = [X[p, layer].astype(np.float16).tobytes() for p in range(n_prompts) for layer in range(n_layers)]
    with store.write() as cur:
        store.create_run(cur, row, prompts)
        store.insert(
            cur,
            "prompt_acts",
            {
                "run_id": [run_id] * len(means),
                "prompt_idx": pa.array(np.repeat(np.arange(n_prompts), n_layers), pa.int32()),
                "layer": pa.array(np.tile(np.arange(n_layers), n_prompts), pa.int32()),
                "mean_abs": pa.array(means, pa.binary()),
            },
        )
    return run_id


@pytest.fixture
def made(store):
    rng = np.random.default_rng(1)
    cats = ["a"] * 6 + ["b"] * 5 + [None] * 3
    X = rng.random((len(cats), 2, 8)).astype(np.float16)
    X[:6, 1, 3] += 2  # neuron 1*8+3 fires for category a only
    return store, fake_run(store, X, cats), X, cats


def test_category_labels_index_the_run_categories(made):
    store, run_id, _, cats = made
    labels, names = scores.category_labels(store, run_id)
    assert names == ["a", "b"]
    assert labels.dtype == np.int32
    assert labels.tolist() == [0] * 6 + [1] * 5 + [-1] * 3


def test_functionality_scores_are_one_vs_rest_average_precision(made):
    store, run_id, X, cats = made
    got = scores.functionality_scores(store, run_id)
    flat = X.reshape(len(cats), -1).astype(np.float32)
    assert got.shape == (2, 16) and got.dtype == np.float32
    for c, name in enumerate(["a", "b"]):
        target = np.array([x == name for x in cats])
        want = [average_precision_score(target, flat[:, j]) for j in range(16)]
        np.testing.assert_allclose(got[c], want, rtol=1e-5)
    assert got[0, 11] == pytest.approx(1.0)


def test_functionality_scores_are_cached_and_shuffling_is_seeded(made):
    store, run_id, _, _ = made
    first = scores.functionality_scores(store, run_id)
    store.cursor().execute("DELETE FROM prompt_acts")  # a recompute would now fail
    np.testing.assert_array_equal(scores.functionality_scores(store, run_id), first)
    with pytest.raises(ValueError):
        scores.functionality_scores(store, run_id, shuffled=True, seed=1)


def test_shuffled_scores_differ_from_real_ones_and_repeat_per_seed(made):
    store, run_id, _, _ = made
    real = scores.functionality_scores(store, run_id)
    a = scores.functionality_scores(store, run_id, shuffled=True, seed=3)
    b = scores.functionality_scores(store, run_id, shuffled=True, seed=4)
    assert a[0, 11] < real[0, 11]
    assert not np.array_equal(a, b)
    store.cursor().execute("DELETE FROM results")
    np.testing.assert_array_equal(scores.functionality_scores(store, run_id, shuffled=True, seed=3), a)


def test_top_neurons_takes_percent_of_all_and_skips_excluded():
    s = np.array([[0.1, 0.9, 0.5, 0.7, np.nan, 0.2, 0.3, 0.4, 0.6, 0.8]], np.float32)
    (top,) = scores.top_neurons(s, 20)
    assert top.tolist() == [1, 9] and top.dtype == np.int32
    (top,) = scores.top_neurons(s, 20, exclude=np.array([9]))
    assert top.tolist() == [1, 3]
    (top,) = scores.top_neurons(s, 100)
    assert 4 not in top.tolist() and len(top) == 9


@pytest.mark.parametrize("percent", [0, -1, 101])
def test_top_neurons_rejects_bad_percent(percent):
    with pytest.raises(BricklabError, match="percent"):
        scores.top_neurons(np.zeros((1, 4), np.float32), percent)


def test_resident_neurons_are_strong_for_every_category(store):
    rng = np.random.default_rng(2)
    cats = ["a"] * 5 + ["b"] * 5
    X = rng.random((10, 2, 20)).astype(np.float16) * 0.5
    X[:, 0, 4] = 5.0  # strong everywhere: resident
    X[:5, 1, 7] = 5.0  # strong for a only
    X[:4, 1, 9] = X[5:9, 1, 9] = 5.0  # strong on 80% of each category
    run_id = fake_run(store, X, cats)
    assert scores.resident_neurons(store, run_id).tolist() == [4, 20 + 9]
    assert scores.resident_neurons(store, run_id, share=0.9).tolist() == [4]


def test_scores_refuse_unknown_and_incomplete_runs(store):
    fake_run(store, np.ones((2, 1, 4)), ["a", "b"], status="incomplete")
    with pytest.raises(BricklabError, match="incomplete"):
        scores.functionality_scores(store, "fake")
    with pytest.raises(BricklabError, match="no run"):
        scores.resident_neurons(store, "nope")


def test_tiny_run_scores_cover_every_neuron(small_run):
    path, run_id = small_run
    store = Store(path)
    try:
        run = store.require_run(run_id)
        got = scores.functionality_scores(store, run_id)
        assert got.shape == (len(run.categories), run.n_layers * run.d_ff)
        assert np.isfinite(got).all() and (got > 0).all() and (got <= 1).all()
        assert [len(t) for t in scores.top_neurons(got, 5)] == [round(0.05 * got.shape[1])] * len(got)
    finally:
        store.close()


def test_enrichment_within_one_layer_is_the_hypergeometric_tail():
    from scipy.stats import hypergeom

    top = [np.arange(10), np.arange(50, 60)]  # d_ff 100: 10 top neurons per category in layer 0
    group = np.array([0, 1, 2, 3, 4, 70, 71, 72])  # 5 of category 0's, none of category 1's
    p = scores.enrichment([group], top, n_layers=2, d_ff=100)
    np.testing.assert_allclose(p[0], [hypergeom.sf(4, 100, 10, 8), 1.0])
    assert p[0, 0] < 1e-3


def test_enrichment_across_layers_matches_brute_force():
    from itertools import combinations

    d_ff, top = 4, [np.array([0, 1, 4])]  # layer 0 holds two top neurons, layer 1 one
    group = np.array([0, 2, 5])  # two neurons drawn from layer 0, one from layer 1; 1 hit
    draws = [(a, b) for a in combinations(range(4), 2) for b in combinations(range(4, 8), 1)]
    hits = [len({*a, *b} & {0, 1, 4}) for a, b in draws]
    want = np.mean(np.array(hits) >= 1)
    np.testing.assert_allclose(scores.enrichment([group], top, n_layers=2, d_ff=d_ff), [[want]])


def test_layer_summary_reports_best_quantile_and_mean_per_layer():
    s = np.arange(2 * 2 * 1000, dtype=np.float32).reshape(2, 2000) / 4000  # 2 categories, 2 layers
    got = scores.layer_summary(s, n_layers=2)
    assert got["best"][0] == pytest.approx(s[1, 999]) and got["best"][1] == pytest.approx(s[1, 1999])
    assert got["mean"][0] == pytest.approx(np.mean([s[0, :1000], s[1, :1000]]))
    assert got["permille5"][1] == pytest.approx(np.quantile(np.r_[s[0, 1000:], s[1, 1000:]], 0.995))


def test_hypergeometric_pmf_matches_scipy():
    from scipy.stats import hypergeom

    x, good = np.arange(40), np.array([[0], [3], [15], [1536]])
    np.testing.assert_allclose(
        scores._hypergeom_pmf(x, 1536, good, 37), hypergeom.pmf(x, 1536, good, 37), rtol=1e-9
    )


# selection rules and selectivity


def rule_data() -> tuple[np.ndarray, np.ndarray]:
    """3 categories x 6 prompts, 2 neurons, both high on every category-0 prompt. Neuron 0 is also high
    on 3 prompts of category 1 (one neighbour, heavily); neuron 1 on 2 prompts each of categories 1
    and 2 (fewer confusers in all, but spread)."""
    labels = np.repeat(np.arange(3), 6).astype(np.int32)
    X = np.full((18, 2), 0.1, dtype=np.float32) + np.arange(18, dtype=np.float32)[:, None] * 1e-3
    X[labels == 0] = 1.0 + np.arange(6, dtype=np.float32)[:, None] * 1e-2
    X[[6, 7, 8], 0] = 2.0
    X[[6, 7, 12, 13], 1] = 2.0
    return X, labels


def test_contrastive_scores_penalise_neurons_a_category_shares_with_one_other():
    X, labels = rule_data()
    ap = scores.rule_scores(X, labels, 3, 1, "ap")
    contrastive = scores.rule_scores(X, labels, 3, 1, "contrastive")
    # AP counts all confusers (3 vs 4); the contrastive score the worst single neighbour (3 vs 2)
    assert ap[0, 0] > ap[0, 1] and contrastive[0, 0] < contrastive[0, 1]
    assert scores.top_neurons(ap, 50)[0].tolist() == [0]
    assert scores.top_neurons(contrastive, 50)[0].tolist() == [1]
    pair = labels != 2
    assert contrastive[0, 0] == pytest.approx(
        average_precision_score(labels[pair] == 0, X[pair, 0]), abs=1e-6
    )
    assert np.array_equal(contrastive, scores.rule_scores(X, labels, 3, 1, "contrastive"))  # deterministic


def test_per_layer_normalisation_divides_each_prompt_by_its_layer_mean():
    X = np.arange(1, 13, dtype=np.float32).reshape(2, 6)  # 2 prompts, 2 layers x 3 neurons
    out = scores.per_layer_normalised(X, 2)
    np.testing.assert_allclose(out[0], [0.5, 1, 1.5, 4 / 5, 1, 6 / 5])
    X = np.array([[2, 1], [2, 1], [1, 2], [1, 2]], dtype=np.float32)  # 1 layer, 2 neurons
    labels = np.array([0, 0, 1, 1], dtype=np.int32)
    big = X * np.array([[1], [1], [10], [10]], dtype=np.float32)  # category 1's prompts drive all harder
    assert (
        scores.rule_scores(big, labels, 2, 1, "ap")[0, 0]
        < 1.0
        == scores.rule_scores(X, labels, 2, 1, "ap")[0, 0]
    )
    np.testing.assert_allclose(
        scores.rule_scores(big, labels, 2, 1, "per_layer"), scores.rule_scores(X, labels, 2, 1, "per_layer")
    )


def test_unknown_rule_is_refused():
    with pytest.raises(BricklabError, match="Unknown selection rule"):
        scores.rule_scores(np.ones((2, 2), np.float32), np.array([0, 1]), 2, 1, "best")
    assert set(scores.RULE_NOTES) == set(scores.RULES)


def test_selectivity_is_own_over_the_mean_of_the_others():
    matrix = [[50.0, 1.0, 4.0], [10.0, 20.0, 30.0], [0.0, -1.0, 5.0], [1.0, None, 2.0]]
    got = scores.selectivity([row[:3] for row in matrix[:3]])
    assert got == [pytest.approx(20.0), pytest.approx(1.0), None]  # row 2: others' mean <= 0
    assert scores.selectivity([[3.0, None], [None, 1.0]]) == [None, None]  # a missing value


def test_rule_top_neurons_for_bricks_cache_per_rule_and_refuse_the_model_rule(store):
    from core.bricks.candidates import BrickParams

    X, labels = rule_data()
    fake_run(store, X[:, None, :], [["a", "b", "c"][c] for c in labels])
    ap = scores.rule_top_neurons(store, "fake", "ap", 50)
    contrastive = scores.rule_top_neurons(store, "fake", "contrastive", 50)
    assert ap[0].tolist() == [0] and contrastive[0].tolist() == [1]
    assert store.get_arrays("fake", "rule_scores", {"rule": "contrastive"}) is not None
    assert [s.tolist() for s in scores.rule_top_neurons(store, "fake", "contrastive", 50)] == [
        s.tolist() for s in contrastive
    ]
    with pytest.raises(BricklabError, match="runs the model"):
        scores.rule_top_neurons(store, "fake", "validated", 50)
    with pytest.raises(BricklabError, match="rule"):
        BrickParams(method="functional", rule="validated")
    assert BrickParams(method="functional", rule="contrastive").key()["rule"] == "contrastive"
