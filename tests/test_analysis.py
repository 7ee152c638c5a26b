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
    """(store path, run id, report, its evaluation counts, its progress calls (done, total)) of a cold
    quick report on a private copy of the tiny run."""
    path, run_id = small_run
    copy = tmp_path_factory.mktemp("analysis") / "copy.duckdb"
    shutil.copy(path, copy)
    store = Store(copy)
    counts, steps = {}, []
    result = analysis.report(store, tiny_lm, run_id, QUICK, lambda d, t, m: steps.append((d, t)), counts)
    store.close()
    return copy, run_id, result, counts, steps


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
    m = r["ablation_matrix"]
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


def test_a_report_leaves_the_on_demand_control_out_and_its_progress_reaches_the_plan(reported, copy_store):
    store, run_id = copy_store
    _, _, r, counts, steps = reported
    assert analysis.ON_DEMAND == ("ablation_matrix_no_resident",)
    assert r["ablation_matrix_no_resident"] is None
    assert analysis.missing_sections(store, run_id, QUICK) == []
    assert analysis.missing_sections(store, run_id, QUICK, analysis.ON_DEMAND) == list(analysis.ON_DEMAND)
    always = analysis.planned(QUICK, 7, analysis.ALWAYS)
    # 2 baselines + 8 lowest-k masks + 7 rows and random + 6 keep-only: the control's 8 are not among them
    assert always == 2 + 8 + 8 + 6 == analysis.planned(QUICK, 7, analysis.SECTIONS) - 8
    assert steps[-1] == (always, always)  # the bar reaches its end
    assert always - 2 <= counts["evaluations"] <= always  # a baseline's prompts may be measured already
    with pytest.raises(ValueError, match="extra sections"):
        analysis.missing_sections(store, run_id, QUICK, ("overlap",))


def test_the_control_is_computed_when_asked_and_cached_under_its_old_key(
    reported, tiny_lm, tmp_path, monkeypatch
):
    copy = tmp_path / "control.duckdb"
    shutil.copy(reported[0], copy)
    store, run_id = Store(copy), reported[1]
    counts, steps = {}, []
    progress = lambda d, t, m: steps.append((d, t))  # noqa: E731
    r = analysis.report(store, tiny_lm, run_id, QUICK, progress, counts, extra=analysis.ON_DEMAND)
    m = r["ablation_matrix_no_resident"]
    assert np.array(m["increase_pct"]).shape == (7, 7) and len(m["random"]) == 7
    assert m["excluded_resident"] == len(scores.resident_neurons(store, run_id))
    assert {k: r[k] for k in analysis.ALWAYS} == {k: reported[2][k] for k in analysis.ALWAYS}
    assert steps[-1] == (9, 9) and counts["evaluations"] == 9  # the baseline, 7 rows and random only
    # the key it had when every report computed it: results cached before the split are still found
    key = {"percent": 5.0, "seed": 0, "eval_per_category": 3, "max_tokens": 128, "rule": "ap"}
    assert analysis._params(QUICK)["ablation_matrix_no_resident"] == key
    assert store.get_json(run_id, "analysis.ablation_matrix_no_resident", key) == m

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached section evaluated the model")

    monkeypatch.setattr(evaluate, "losses_under", forbidden)
    assert (
        analysis.report(store, None, run_id, QUICK)["ablation_matrix_no_resident"] == m
    )  # shown once cached
    assert analysis.report(store, None, run_id, QUICK, extra=analysis.ON_DEMAND) == r
    store.close()


@pytest.mark.parametrize("extra", [(), analysis.ON_DEMAND])
def test_a_validated_report_reaches_its_plan(small_run, tiny_lm, tmp_path, extra):
    copy = tmp_path / "validated.duckdb"
    shutil.copy(small_run[0], copy)
    store, steps = Store(copy), []
    config = analysis.ReportConfig(rule="validated").quick()
    analysis.report(store, tiny_lm, small_run[1], config, lambda d, t, m: steps.append((d, t)), extra=extra)
    store.close()
    sections = [*analysis.ALWAYS, *extra]
    assert steps[-1] == (analysis.planned(config, 7, sections),) * 2
    assert steps[-1][0] == 1 + 2 + 8 + 8 + 6 + 7 * analysis.VALIDATE_BANDS * (1 + len(extra)) + 8 * len(extra)


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

    monkeypatch.setattr(evaluate, "losses_under", forbidden)
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


# selection rules, selectivity, verdicts


def test_the_rule_round_trips_json_keys_the_cache_and_is_checked():
    import json
    from dataclasses import asdict

    config = analysis.ReportConfig(rule="contrastive")
    values = json.loads(json.dumps(asdict(config)))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    assert analysis.ReportConfig(**values) == config
    params = analysis._params(config)
    assert params["ablation_matrix"]["rule"] == "contrastive" and "rule" not in params["sparsity"]
    assert params["ablation_matrix"] != analysis._params(analysis.ReportConfig())["ablation_matrix"]
    with pytest.raises(ValueError, match="rule"):
        analysis.ReportConfig(rule="best")


def test_the_report_carries_selectivity_per_category_and_the_rule(reported):
    r = reported[2]
    a = r["ablation_matrix"]
    assert r["rule"] == a["rule"] == "ap" and a["rule_note"]
    assert a["selectivity"] == scores.selectivity(a["increase_pct"])
    assert list(r["selectivity"]) == a["categories"] and list(r["selectivity"].values()) == a["selectivity"]


def test_model_free_rules_are_deterministic_and_pick_different_sets(copy_store, tiny_lm):
    store, run_id = copy_store
    picked = {}
    for rule in scores.MODEL_FREE_RULES:
        first = analysis.Analysis(store, tiny_lm, run_id, analysis.ReportConfig(rule=rule), None).top_sets(5)
        again = analysis.Analysis(store, tiny_lm, run_id, analysis.ReportConfig(rule=rule), None).top_sets(5)
        assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
        assert {len(s) for s in first} == {round(0.05 * 192)}
        picked[rule] = np.concatenate(first).tobytes()
    assert len({picked["ap"], picked["contrastive"], picked["per_layer"]}) == 3
    resident = set(scores.resident_neurons(store, run_id).tolist())
    no_resident = analysis.Analysis(store, tiny_lm, run_id, analysis.ReportConfig(rule="no_resident"), None)
    assert not resident & set(np.concatenate(no_resident.top_sets(5)).tolist())


def test_validated_sets_come_from_the_candidates_and_equal_sets_run_once(copy_store, tiny_lm, monkeypatch):
    store, run_id = copy_store
    calls = []
    real = evaluate.losses_under
    monkeypatch.setattr(evaluate, "losses_under", lambda *a, **k: calls.extend(a[2]) or real(*a, **k))
    a = analysis.Analysis(store, tiny_lm, run_id, analysis.ReportConfig(rule="validated").quick(), None)
    sets = a.top_sets(5)
    candidates = scores.top_neurons(a._scores("ap"), 10)
    assert [len(s) for s in sets] == [10] * 7
    assert all(set(s) <= set(c) for s, c in zip(sets, candidates, strict=True))
    bands = len(calls)
    assert 7 < bands <= 1 + 7 * analysis.VALIDATE_BANDS
    m = a.ablation(exclude_resident=False)
    assert len(m["validated_neurons"]) == 7 and all(0 <= n <= 10 for n in m["validated_neurons"])
    before = len(calls)
    a.zeroed(sets[0])
    assert len(calls) == before  # measured already in the ablation
    assert a.top_sets(5) is sets and len(calls) == before


def test_verdicts_say_holds_or_not_with_the_numbers():
    rc = {
        "kept": ["coding"],
        "categories": ["coding", "math"],
        "rows": [
            {"percent": 5.0, "loss": [2.0, 3.0], "random_loss": [2.5, 2.9]},
            {"percent": 50.0, "loss": [2.4, 3.0], "random_loss": [2.1, 2.9]},
        ],
    }
    v = analysis._recombination_verdict(rc)
    assert v["holds"] is False and "Does not hold" in v["text"]
    assert "1 of 2" in v["text"] and "coding at 50% (2.40 vs random 2.10)" in v["text"]
    rc["rows"].pop()
    assert analysis._recombination_verdict(rc)["holds"] is True
    a = {
        "categories": ["coding", "math"],
        "increase_pct": [[50.0, 5.0], [30.0, 10.0]],
        "random": [1.0, 1.0],
        "diagonal_dominant": [True, False],
        "selectivity": [10.0, 0.33],
        "rule": "ap",
    }
    v = analysis._ablation_verdict(a)
    assert v["holds"] is False and "coding 10.0, math 0.3" in v["text"] and "Not separated: math" in v["text"]


def test_verdicts_of_a_whole_report(reported):
    assert reported[2]["ablation_matrix_no_resident"] is None  # the control is not needed for them
    v = analysis.verdicts(reported[2])
    assert set(v) == {"sparsity", "functionality", "ablation_matrix", "overlap", "recombination"}
    assert all(x["holds"] in (True, False, None) and "on this run" in x["text"] for x in v.values())


# the evaluations' shortcuts (per-prompt memo, sparse static masks) against plain one-prompt evaluations


def _plain(lm, groups, per_layer=None) -> list[float]:
    """Per group, the mean loss of its prompts run one at a time through dense transforms."""
    return [
        np.nanmean(evaluate.loss_per_prompt(lm, g, 1, per_layer, max_tokens=QUICK.max_tokens)) for g in groups
    ]


def test_recombination_equals_plain_evaluations(copy_store, reported, tiny_lm, monkeypatch):
    store, run_id = copy_store
    a = analysis.Analysis(store, tiny_lm, run_id, QUICK, None)
    r = reported[2]["recombination"]
    monkeypatch.setattr(evaluate, "SPARSE_SHARE", -1.0)
    for row in r["rows"]:
        sets = a.top_sets(row["percent"])
        union = np.unique(np.concatenate([sets[a.categories.index(c)] for c in r["kept"]]))
        np.testing.assert_allclose(
            row["loss"], _plain(tiny_lm, a.eval_texts, evaluate.kept_neurons(2, 96, union)), atol=2e-4
        )
    np.testing.assert_allclose(r["baseline_loss"], _plain(tiny_lm, a.eval_texts), atol=2e-4)


def test_a_baseline_over_measured_prompts_runs_nothing(copy_store, tiny_lm, monkeypatch):
    store, run_id = copy_store
    calls = []
    real = evaluate.losses_under
    monkeypatch.setattr(evaluate, "losses_under", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    a = analysis.Analysis(store, tiny_lm, run_id, QUICK, None)
    groups = a.selection_texts  # two prompts per category on the tiny run
    assert [len(g) for g in groups] == [2] * 7
    part = a.losses(None, 1, texts=groups)  # as the sparsity section's baseline before the full one
    full = a.losses(None, texts=groups)
    assert calls == [7, 7]  # the rest of the prompts, once
    assert np.array_equal(a.losses(None, 1, texts=groups), part) and np.array_equal(
        a.losses(None, texts=groups), full
    )
    assert len(calls) == 2
    monkeypatch.setattr(evaluate, "losses_under", real)
    np.testing.assert_allclose(part, _plain(tiny_lm, [g[:1] for g in groups]), atol=1e-4)
    np.testing.assert_allclose(full, _plain(tiny_lm, groups), atol=1e-4)
    assert a.counts["evaluations"] == 2 and a.counts["texts"] == 14


def test_ablation_and_sparsity_equal_plain_evaluations(copy_store, reported, tiny_lm):
    """Their masks share forward passes (core.live.evaluate.losses_under): each still equals its own
    model run one prompt at a time."""
    from core import models

    store, run_id = copy_store
    a = analysis.Analysis(store, tiny_lm, run_id, QUICK, None)
    base = np.array(_plain(tiny_lm, a.eval_texts))
    m = reported[2]["ablation_matrix"]
    sets = [*a.top_sets(QUICK.percent), a.random_set(len(a.top_sets(QUICK.percent)[0]), 1)]
    want = [100 * np.expm1(np.array(_plain(tiny_lm, a.eval_texts, evaluate.masked_neurons(2, 96, s))) - base)
            for s in sets]  # fmt: skip
    np.testing.assert_allclose([*m["increase_pct"], m["random"]], want, atol=0.05)
    assert len({tuple(row) for row in m["increase_pct"]}) == 7
    s = reported[2]["sparsity"]
    norms = [models.down_column_norms(tiny_lm.model, layer) for layer in range(2)]
    first = [g[:1] for g in a.eval_texts]
    for name in ("abs", "output"):
        masks = [evaluate.lowest_k_mask(k / 100, name, norms) if k else None for k in QUICK.ks]
        curve = [np.nanmean(_plain(tiny_lm, first, mask)) for mask in masks]
        np.testing.assert_allclose(s["indicators"][name]["loss"], curve, atol=2e-4)
