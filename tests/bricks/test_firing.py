"""The one reader of per-token firing: its counts and sample equal what the stored bits give, and the
bricks, distinctive tokens and explanations read through it equal those of the path before it."""

import numpy as np
import pytest

from core.bricks import candidates, distinctive, scores
from core.bricks.candidates import BrickParams
from core.bricks.firing import RunFiring
from core.errors import BricklabError
from core.kernels import coact as kernels
from core.store import Store
from tests.bricks.test_candidates import run_copy  # noqa: F401 - a fixture
from tests.bricks.test_distinctive import planted_run


def test_counts_are_the_coactivations_of_the_stored_bits(small_store):
    store, run = small_store
    firing = RunFiring(store, run)
    half = scores.prompt_halves(store, run.run_id, seed=3)
    token_half = half[store.token_prompts(run.run_id)]
    assert firing.complete and np.array_equal(firing.sample_index, np.arange(run.n_tokens))
    assert firing.n_tokens(half) == token_half.sum() and firing.n_tokens() == run.n_tokens
    for layer in range(run.n_layers):
        bits = store.firing_bits(run.run_id, layer)
        assert np.array_equal(firing.sample(layer), bits)
        want = kernels.coactivation_counts_numpy(bits, run.d_ff)
        assert np.array_equal(firing.counts(layer), want) and want.trace() > 0
        a, b = firing.split_counts(layer, half)
        assert np.array_equal(a, kernels.coactivation_counts_numpy(bits[token_half], run.d_ff))
        assert np.array_equal(a + b, want) and 0 < a.trace() < want.trace()


def old_coact_bricks(store: Store, run, params: BrickParams):
    """The co-activation bricks' neurons, stability and tokens by the path before the reading seam
    (issue #16 step 2): bits straight from the store, token rows from `token_prompts`."""
    half = scores.prompt_halves(store, run.run_id, params.seed)[store.token_prompts(run.run_id)]
    n_a, n_b = int(half.sum()), int((~half).sum())
    full, halves = [], ([], [])
    for layer in range(run.n_layers):
        bits = store.firing_bits(run.run_id, layer)
        a, b = (kernels.coactivation_counts(bits[rows], run.d_ff) for rows in (half, ~half))
        offset = layer * run.d_ff
        full += [offset + g for g in candidates.partition(a + b, n_a + n_b, params)]
        halves[0].extend(offset + g for g in candidates.partition(a, n_a, params))
        halves[1].extend(offset + g for g in candidates.partition(b, n_b, params))
    prompt, ids, texts = store.run_tokens(run.run_id)
    types, first, kind = np.unique(ids, return_index=True, return_inverse=True)
    counts = np.zeros((len(types), len(full)), np.float32)
    for layer in range(run.n_layers):
        fired = distinctive.firing_by_type(store.firing_bits(run.run_id, layer), kind, len(types), run.d_ff)
        for g, group in enumerate(full):
            mine = group[group // run.d_ff == layer] % run.d_ff
            counts[:, g] += fired[:, mine].sum(axis=1)
    z = distinctive.log_odds_z(counts, np.bincount(kind, minlength=len(types)).astype(np.float64))
    tokens = [texts[first][t].tolist() for t in distinctive.top_types(z, params.n_tokens)]
    return full, candidates._stability(full, halves), tokens


@pytest.mark.parametrize("graph, stability", [("jaccard", True), ("pmi", True), ("pmi", False)])
def test_coact_bricks_equal_those_of_the_path_before_the_seam(run_copy, graph, stability):  # noqa: F811
    store, run_id = run_copy
    run, params = store.require_run(run_id), BrickParams(size=24, graph=graph, stability=stability, seed=2)
    want_full, want_stability, want_tokens = old_coact_bricks(store, run, params)
    got = candidates.compute_bricks(store, run_id, params)
    assert len(got) == len(want_full) == run.n_layers * -(-run.d_ff // params.size) > 1
    assert all(np.array_equal(b.neurons, np.sort(w)) for b, w in zip(got, want_full, strict=True))
    assert [b.stability for b in got] == (want_stability.tolist() if stability else [None] * len(got))
    assert [list(b.top_tokens) for b in got] == want_tokens and any(want_tokens)


def test_layer_counts_on_the_fit_half_are_those_of_the_bits(small_store):
    store, run = small_store
    tokens = distinctive.run_tokens(store, run)
    rows = scores.prompt_halves(store, run.run_id)[tokens.prompt]
    bits = store.firing_bits(run.run_id, 1)
    want = distinctive.firing_by_type(bits, tokens.kind, len(tokens.token_ids), run.d_ff, rows)
    got = distinctive.layer_counts(RunFiring(store, run), 1, tokens, rows)
    assert np.array_equal(got, want) and 0 < got.sum() < bits.size * 64


def test_a_partial_sample_counts_only_its_tokens_and_refuses_exact_counts(store, monkeypatch):
    run, words = planted_run(store)
    prompt, pos = store.sample_rows("fake")
    keep = pos % 3 == 0  # every third token of each prompt stands in for a sample
    bits = {layer: store.firing_bits("fake", layer) for layer in range(2)}
    monkeypatch.setattr(store, "sample_rows", lambda run_id: (prompt[keep], pos[keep]))
    monkeypatch.setattr(store, "firing_sample", lambda run_id, layer: bits[layer][keep])
    monkeypatch.setattr(store, "sample_complete", lambda run_id: False)
    tokens = distinctive.run_tokens(store, run)
    assert len(tokens.kind) == words.size  # the tokens themselves are all there
    assert np.array_equal(tokens.sample, np.flatnonzero(keep)) and tokens.counts.sum() == keep.sum()
    got = distinctive.group_counts(store, run, [np.array([0])], tokens)[:, 0]
    fired = kernels.unpack_bits(bits[0], 8)[:, 0]
    want = np.bincount(tokens.kind[keep], weights=fired[keep], minlength=len(tokens.token_ids))
    assert np.array_equal(got, want) and got.sum() < fired.sum()
    with pytest.raises(BricklabError, match="sample of its tokens"):
        RunFiring(store, run).counts(0)
