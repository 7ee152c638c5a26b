"""Bricks: balanced METIS partitions, labels, stability and the cache, on the tiny run."""

import shutil

import numpy as np
import pytest

from core.bricks import candidates as bricks
from core.bricks.candidates import BrickParams
from core.errors import BricklabError
from core.kernels import coact as kernels
from core.store import Store
from tests.bricks.test_scores import fake_run


@pytest.fixture
def run_copy(small_run, tmp_path):
    """A private copy of the tiny run, so a test may tamper with it."""
    path, run_id = small_run
    shutil.copy(path, tmp_path / "copy.duckdb")
    store = Store(tmp_path / "copy.duckdb")
    yield store, run_id
    store.close()


def planted_counts(n_groups: int, per_group: int, n_tokens: int = 2000, seed: int = 0):
    """Co-activation counts of neurons that fire with their own group only, in shuffled order."""
    rng = np.random.default_rng(seed)
    group = rng.permutation(np.repeat(np.arange(n_groups), per_group))
    active = rng.random((n_tokens, n_groups)) < 0.2
    fired = active[:, group] & (rng.random((n_tokens, len(group))) < 0.8)
    return kernels.coactivation_counts(kernels.pack_bits(fired), len(group)), n_tokens, group


@pytest.mark.parametrize("graph", bricks.GRAPHS)
def test_partition_recovers_planted_groups(graph):
    counts, n_tokens, group = planted_counts(4, 8)
    parts = bricks.partition(counts, n_tokens, BrickParams(size=8, graph=graph, neighbours=4))
    assert sorted(len(p) for p in parts) == [8, 8, 8, 8]
    assert all(len(np.unique(group[p])) == 1 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(32))


def test_partition_sizes_differ_by_at_most_one_when_size_does_not_divide():
    counts, n_tokens, _ = planted_counts(3, 10)
    parts = bricks.partition(counts, n_tokens, BrickParams(size=8))
    assert sorted(len(p) for p in parts) == [7, 7, 8, 8]
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_balance_moves_the_neuron_that_fits_worst():
    weights = np.zeros((4, 4), np.float32)
    weights[0, 1] = weights[1, 0] = 5.0  # 0 and 1 belong together, 2 is loosely tied to them
    weights[0, 2] = weights[2, 0] = 1.0
    parts = bricks._balance(np.array([0, 0, 0, 1]), weights, 2)
    assert parts.tolist() == [0, 0, 1, 1]


def test_best_match_jaccard():
    a = [np.array([0, 1, 2, 3]), np.array([10, 11])]
    b = [np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([7])]
    np.testing.assert_allclose(bricks.best_match_jaccard(a, b), [0.5, 0.0])
    assert bricks.best_match_jaccard(a, []).tolist() == [0, 0]


def test_params_key_holds_only_what_shapes_the_method():
    coact = BrickParams(method="coact")
    assert coact.key() == BrickParams(method="coact", percent=10).key()
    assert coact.key() != BrickParams(method="coact", size=16).key()
    assert "map" in BrickParams(method="map").key() and "map" not in coact.key()
    params = BrickParams(method="map", size=8)
    assert BrickParams.from_dict(params.to_dict()) == params


@pytest.mark.parametrize(
    "bad", [{"size": 0}, {"method": "kmeans"}, {"percent": 0}, {"alpha": 1.5}, {"graph": "cosine"}]
)
def test_bad_params_are_refused(bad):
    with pytest.raises(BricklabError, match="Invalid brick parameters"):
        BrickParams(**bad)


def test_coact_bricks_partition_each_layer(run_copy):
    store, run_id = run_copy
    run = store.require_run(run_id)
    found = bricks.compute_bricks(store, run_id, BrickParams(size=32))
    assert len(found) == run.n_layers * run.d_ff // 32
    assert all(b.size == 32 and len(b.layers) == 1 and b.method == "coact" for b in found)
    assert np.array_equal(
        np.sort(np.concatenate([b.neurons for b in found])), np.arange(run.n_layers * run.d_ff)
    )
    for b in found:
        assert b.neurons.dtype == np.int32 and not b.neurons.flags.writeable
        assert set(b.p_values) == set(run.categories) and 0 <= b.stability <= 1
        assert b.label is None or b.p_values[b.label] <= 0.001
        assert 0 < len(b.top_tokens) <= 8 and all(isinstance(t, str) for t in b.top_tokens)


def test_bricks_are_cached_per_params(run_copy):
    store, run_id = run_copy
    params = BrickParams(size=48, stability=False)
    first = bricks.compute_bricks(store, run_id, params)
    assert all(b.stability is None for b in first)
    store.cursor().execute("DELETE FROM firing")  # a recomputation would now find nothing to count
    again = bricks.compute_bricks(store, run_id, params)
    assert [b.brick_id for b in again] == [b.brick_id for b in first]
    assert all(np.array_equal(x.neurons, y.neurons) for x, y in zip(again, first, strict=True))
    assert [x.p_values for x in again] == [y.p_values for y in first]
    with pytest.raises(Exception):  # noqa: B017 - any failure proves these params were not cached
        bricks.compute_bricks(store, run_id, BrickParams(size=24, stability=False))


def test_functional_bricks_are_each_categorys_top_neurons(run_copy):
    store, run_id = run_copy
    run = store.require_run(run_id)
    found = bricks.compute_bricks(store, run_id, BrickParams(method="functional"))
    assert [b.brick_id for b in found] == [f"functional-{c}" for c in run.categories]
    assert all(b.size == round(0.05 * run.n_layers * run.d_ff) for b in found)
    assert all(0 <= b.stability <= 1 for b in found)


def test_random_baseline_shares_a_planted_set_less_often(run_copy):
    from core.bricks import scores

    store, run_id = run_copy
    top = scores.top_neurons(scores.functionality_scores(store, run_id), 5.0)
    planted = [bricks._brick(f"t{c}", "test", ids, 96, None, {}, (), None) for c, ids in enumerate(top)]
    params = BrickParams(alpha=0.01)
    share = np.mean([bricks._p_values(store, store.require_run(run_id), params, [b.neurons]).min() <= 0.01
                     for b in planted])  # fmt: skip
    assert share == 1.0
    assert bricks.random_baseline_share(store, run_id, planted, params) < share


def test_brick_to_config_splits_global_ids_by_layer(run_copy):
    store, run_id = run_copy
    brick = bricks._brick("b", "coact", np.array([5, 96, 100]), 96, "math", {}, (), None)
    config = bricks.brick_to_config(brick, 2, 96, mode="scale", factor=0.5)
    assert config.neurons == {0: (5,), 1: (0, 4)} and config.mode == "scale" and config.factor == 0.5
    assert config.label == "math" and config.name == "b"
    with pytest.raises(BricklabError, match="outside"):
        bricks.brick_to_config(brick, 1, 96)


def test_bad_runs_and_sizes_get_clear_errors(run_copy):
    store, run_id = run_copy
    with pytest.raises(BricklabError, match="larger than the layer width"):
        bricks.compute_bricks(store, run_id, BrickParams(size=97))
    with pytest.raises(BricklabError, match="no run"):
        bricks.compute_bricks(store, "missing", BrickParams())
    fake_run(store, np.ones((2, 1, 4)), ["a", "b"], status="incomplete", run_id="half")
    with pytest.raises(BricklabError, match="incomplete"):
        bricks.compute_bricks(store, "half", BrickParams())


def test_top_tokens_are_the_distinctive_ones_not_the_frequent_ones(store):
    from tests.bricks.test_distinctive import planted_run

    run, _ = planted_run(store)
    got = bricks.top_tokens(store, run, [np.array([0, 1]), np.array([8 + 2])], 3)
    assert got[0][0] == "ĠParis" and got[1][0] == "Ġcat"
    assert not {"Ġthe", "Ġa"} & set(got[0])  # the run's most frequent tokens
    assert bricks.top_tokens(store, run, [np.array([0])], 0) == [[]]


def test_by_significance_puts_labelled_bricks_first():
    def brick(name, label, p):
        return bricks._brick(name, "coact", [0], 4, label, {"a": p}, [], None)

    found = [brick("u1", None, 1e-9), brick("l2", "a", 1e-3), brick("l1", "a", 1e-8), brick("u0", None, 0.5)]
    assert [b.brick_id for b in bricks.by_significance(found)] == ["l1", "l2", "u1", "u0"]


@pytest.mark.parametrize(("n_parts", "seed"), [(4, 0), (12, 0), (12, 3)])  # recursive to 8 parts, then k-way
def test_metis_through_ctypes_is_pymetis(n_parts, seed):
    import pymetis

    counts, n_tokens, _ = planted_counts(6, 16)
    weights = bricks._graph(counts, n_tokens, BrickParams())
    rows, cols = np.nonzero(weights)
    edge = np.maximum(np.rint(weights[rows, cols] * 1000 / weights.max()), 1).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(weights)))])
    graph = pymetis.CSRAdjacency(starts, cols)
    options = pymetis.Options(seed=seed)
    expected = pymetis.part_graph(n_parts, graph, eweights=edge, options=options).vertex_part
    assert bricks._metis(n_parts, starts, cols, edge, seed).tolist() == list(expected)


def test_partitions_in_threads_equal_those_one_at_a_time():
    from concurrent.futures import ThreadPoolExecutor

    graphs = [planted_counts(16, 32, seed=s) for s in range(6)]
    params = BrickParams(size=16)
    alone = [bricks.partition(c, n, params) for c, n, _ in graphs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda g: bricks.partition(g[0], g[1], params), graphs * 2))
    for a, b in zip(alone * 2, together, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
