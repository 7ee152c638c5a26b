"""The paper's analysis on the tiny run: shapes, the split, zero rows, caching, the default run."""

import shutil

import numpy as np
import pytest

from core import analysis
from core.bricks import scores
from core.live import evaluate
from core.store import Store

QUICK = analysis.ReportConfig().quick()


@pytest.fixture(scope="module")
def reported(small_run, tiny_lm, tmp_path_factory):
    """(store path, run id, report) of a quick report on a private copy of the tiny run."""
    path, run_id = small_run
    copy = tmp_path_factory.mktemp("analysis") / "copy.duckdb"
    shutil.copy(path, copy)
    store = Store(copy)
    result = analysis.report(store, tiny_lm, run_id, QUICK)
    store.close()
    return copy, run_id, result


@pytest.fixture
def copy_store(reported):
    s = Store(reported[0])
    yield s, reported[1]
    s.close()


def test_split_is_deterministic_disjoint_and_halves_each_category():
    labels = np.array([0] * 5 + [1] * 4 + [-1] * 2, dtype=np.int32)
    selection, held = analysis.split(labels, 2, seed=3)
    again, held_again = analysis.split(labels, 2, seed=3)
    assert np.array_equal(selection, again)
    assert all(np.array_equal(a, b) for a, b in zip(held, held_again, strict=True))
    assert [len(h) for h in held] == [2, 2] and len(selection) == 3 + 2 + 2
    assert sorted(np.concatenate([selection, *held])) == list(range(11))
    assert set(held[0]) <= set(range(5)) and set(held[1]) <= set(range(5, 9))


def test_diagonal_dominance_needs_both_conditions():
    matrix = [[50.0, 1.0, 1.0], [60.0, 5.0, 70.0], [2.0, 2.0, 10.0]]
    # row 1: own 5 < mean of the others; row 2: own 10 > the others but not above random's 12
    assert analysis.diagonal_dominance(matrix, [3.0, 1.0, 12.0]) == [True, False, False]


def test_report_shapes(reported):
    r = reported[2]
    n = len(r["ablation_matrix"]["categories"])
    assert n == 7
    for name in ("ablation_matrix", "ablation_matrix_no_resident"):
        m = r[name]
        assert np.array(m["increase_pct"]).shape == (n, n) and len(m["random"]) == n
        assert np.isfinite(m["increase_pct"]).all() and len(m["diagonal_dominant"]) == n
    assert r["ablation_matrix"]["neurons_per_category"] == round(0.05 * 2 * 96)
    assert np.array(r["sparsity"]["indicators"]["abs"]["cdf"]).shape == (2, 100)
    assert r["sparsity"]["indicators"]["output"]["cdf"][1][-1] == pytest.approx(1.0)
    assert len(r["sparsity"]["indicators"]["abs"]["loss"]) == len(QUICK.ks)
    assert np.array(r["functionality"]["shuffled"]["top_0.5pct"]).shape == (n, 2)
    overlap = np.array(r["overlap"]["matrix"])
    assert overlap.shape == (n, n) and np.allclose(np.diag(overlap), 1.0)
    assert r["overlap"]["random_expectation"] == pytest.approx(10 / 192, abs=1e-4)
    row = r["recombination"]["rows"][0]
    assert len(row["loss"]) == n and 10 / 192 - 1e-4 <= row["share_kept"] <= 20 / 192 + 1e-4  # two sets of 10


def test_nothing_masked_gives_a_zero_row(copy_store, tiny_lm, monkeypatch):
    store, run_id = copy_store
    real = scores.top_neurons

    def first_empty(*args, **kwargs):
        return [np.zeros(0, np.int32)] + real(*args, **kwargs)[1:]

    monkeypatch.setattr(scores, "top_neurons", first_empty)
    m = analysis.Analysis(store, tiny_lm, run_id, QUICK, None).ablation(exclude_resident=False)
    assert m["increase_pct"][0] == [0.0] * 7
    assert any(v != 0 for v in m["increase_pct"][1])


def test_second_call_computes_nothing(copy_store, reported, tiny_lm, monkeypatch):
    store, run_id = copy_store
    assert analysis.missing_sections(store, run_id, QUICK) == []

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached report evaluated the model")

    monkeypatch.setattr(evaluate, "loss_per_prompt", forbidden)
    assert analysis.report(store, None, run_id, QUICK) == reported[2]
    with pytest.raises(AssertionError, match="cached report"):  # other parameters are no hit
        analysis.report(store, tiny_lm, run_id, analysis.ReportConfig(eval_per_category=1, seed=1))


def test_selection_ignores_held_out_prompts(copy_store, reported, tiny_lm):
    store, run_id = copy_store
    a = analysis.Analysis(store, tiny_lm, run_id, QUICK, None)
    full = scores.functionality_scores(store, run_id)
    picked = analysis.selection_scores(store, run_id, a.selection, a.labels, len(a.categories))
    assert picked.shape == full.shape and not np.allclose(picked, full)
    assert not set(a.selection) & {int(i) for h in a.held for i in h}
    assert "held-out" in reported[2]["ablation_matrix"]["split"]


def test_wrong_model_is_refused(copy_store, tiny_lm):
    from dataclasses import replace

    from core.errors import BricklabError
    from core.models import LoadedModel

    other = LoadedModel(tiny_lm.model, tiny_lm.tokenizer, replace(tiny_lm.info, fingerprint="not-this-one"))
    with pytest.raises(BricklabError, match="another model"):
        analysis.Analysis(copy_store[0], other, copy_store[1], QUICK, None)


def test_the_default_run_is_the_largest_complete_one(store):
    from core.errors import BricklabError
    from tests.bricks.test_scores import fake_run

    with pytest.raises(BricklabError, match="no complete captured run"):
        analysis.default_run(store)
    fake_run(store, np.ones((6, 1, 4)), ["a", "b"] * 3, run_id="big")
    fake_run(store, np.ones((3, 1, 4)), ["a", "b", "a"], run_id="newer")
    fake_run(store, np.ones((9, 1, 4)), ["a"] * 9, status="incomplete", run_id="half")
    assert analysis.default_run(store).run_id == "big"
