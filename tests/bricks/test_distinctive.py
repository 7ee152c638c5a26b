"""Distinctive input tokens: the log-odds z-score, firing counts per token type, and groups."""

import numpy as np
import pyarrow as pa
import pytest

from core.bricks import distinctive
from core.kernels import coact
from core.store import Store
from tests.bricks.test_scores import fake_run

WORDS = ["ĠParis", "Ġthe", "Ġcat", "Ġa"]


def planted_run(store: Store, n_prompts: int = 40, tokens_per_prompt: int = 20, seed: int = 0):
    """A 2-layer, d_ff 8 run whose neurons 0-1 (layer 0) fire on 'Paris', neuron 8+2 on 'cat', and
    every neuron also fires at random (10%); prompts hold common 'the'/'a' and a few rare words.
    Returns (run, tokens (n_prompts, tokens_per_prompt) word indices)."""
    rng = np.random.default_rng(seed)
    words = rng.choice([1, 3], size=(n_prompts, tokens_per_prompt))
    words[::2, 3] = 0  # 'Paris' in every other prompt
    words[1::3, 5] = 2  # 'cat' in every third
    acts = rng.random((n_prompts, 2, 8)).astype(np.float16)
    acts[:, 0, 0] = (words == 0).mean(axis=1) * 4  # neuron 0's per-prompt activity follows 'Paris'
    fake_run(store, acts, ["x"] * n_prompts)
    run = store.require_run("fake")
    fired = rng.random((n_prompts, tokens_per_prompt, 2, 8)) < 0.1
    fired[..., 0, 0] |= words == 0
    fired[..., 0, 1] |= words == 0
    fired[..., 1, 2] |= words == 2
    flat = words.reshape(-1)
    with store.write() as cur:
        store.insert(cur, "tokens", {
            "run_id": ["fake"] * len(flat),
            "prompt_idx": pa.array(np.repeat(np.arange(n_prompts), tokens_per_prompt), pa.int32()),
            "pos": pa.array(np.tile(np.arange(tokens_per_prompt), n_prompts), pa.int32()),
            "token_id": pa.array(flat + 100, pa.int32()), "token": [WORDS[w] for w in flat],
            "truncated": [False] * len(flat),
        })  # fmt: skip
        blobs = [
            coact.pack_bits(fired[p, :, layer]).tobytes() for p in range(n_prompts) for layer in range(2)
        ]
        store.insert(cur, "firing", {
            "run_id": ["fake"] * len(blobs),
            "prompt_idx": pa.array(np.repeat(np.arange(n_prompts), 2), pa.int32()),
            "layer": pa.array(np.tile(np.arange(2), n_prompts), pa.int32()),
            "bits": pa.array(blobs, pa.binary()),
        })  # fmt: skip
    return run, words


def test_log_odds_ranks_over_represented_tokens_first():
    background = np.array([1000, 1000, 10, 10], float)
    group = np.array([[100, 10], [100, 100], [10, 0], [1, 1]], float)  # group 0: token 2 is 10x its share
    z = distinctive.log_odds_z(group, background)
    assert z.shape == (4, 2)
    assert np.argmax(z[:, 0]) == 2
    assert z[0, 1] < z[1, 1]  # group 1 over-uses token 1
    assert np.isneginf(distinctive.log_odds_z(np.array([1.0, 0.0]), np.array([1.0, 0.0]))[1, 0])


def test_rare_tokens_need_more_evidence_than_common_ones():
    z = distinctive.log_odds_z(np.array([[2.0], [200.0], [98.0]]), np.array([1.0, 100.0, 10000.0]))
    assert z[1, 0] > z[0, 0]  # the same ratio over 100 occurrences beats it over 1


def test_top_types_orders_and_drops_weak():
    z = np.array([[5.0, 0.0], [1.0, 3.0], [9.0, -np.inf]])
    got = distinctive.top_types(z, 2)
    assert got[0].tolist() == [2, 0] and got[1].tolist() == [1]
    assert [g.tolist() for g in distinctive.top_types(z, 0)] == [[], []]


def test_firing_by_type_matches_a_loop():
    rng = np.random.default_rng(3)
    fired = rng.random((50, 70)) < 0.3
    kind = rng.integers(0, 5, 50)
    rows = rng.random(50) < 0.5
    want = np.zeros((5, 70))
    for i in np.flatnonzero(rows):
        want[kind[i]] += fired[i]
    got = distinctive.firing_by_type(coact.pack_bits(fired), kind, 5, 70, rows)
    assert np.array_equal(got, want)


def test_planted_groups_find_their_tokens(store):
    run, _ = planted_run(store)
    got = distinctive.distinctive_tokens(store, run, [np.array([0, 1]), np.array([8 + 2]), np.array([5])], 2)
    assert got[0][0] == "ĠParis" and got[1][0] == "Ġcat"
    assert "Ġthe" not in got[0] and "Ġa" not in got[0]
    assert distinctive.distinctive_tokens(store, run, [np.array([0])], 0) == [[]]


@pytest.mark.parametrize("half", [True, False])
def test_group_counts_respect_the_rows(store, half):
    run, words = planted_run(store)
    tokens = distinctive.run_tokens(store, run)
    rows = (tokens.prompt % 2 == 0) if half else None
    counts = distinctive.group_counts(store, run, [np.array([0])], tokens, rows)
    paris = int(np.flatnonzero(tokens.texts == "ĠParis")[0])
    assert counts[paris, 0] == (words == 0).sum()  # every 'Paris' is in an even prompt
    assert tokens.counts.sum() == words.size
