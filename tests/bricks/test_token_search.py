"""Token search over the whole run: neurons ranked by their recomputed activation at a token."""

import shutil
from collections import Counter

import numpy as np
import pytest

from core import prompts
from core.bricks import neurons, token_search
from core.capture import run as capture
from core.errors import BricklabError
from core.store import Store


@pytest.fixture
def run_copy(small_run, tmp_path):
    path, run_id = small_run
    shutil.copy(path, tmp_path / "copy.duckdb")
    store = Store(tmp_path / "copy.duckdb")
    yield store, run_id
    store.close()


def _common_token(store, run_id) -> str:
    _, _, texts = store.run_tokens(run_id)
    word, _ = Counter(neurons.display_token(t).strip().lower() for t in texts if len(t) > 2).most_common(1)[0]
    return word


def test_mean_activation_at_the_token_equals_one_prompt_at_a_time(tiny_lm, run_copy):
    store, run_id = run_copy
    word = _common_token(store, run_id)
    found = token_search.token_activity(tiny_lm, store, run_id, word.upper(), max_prompts=5)
    where = store.token_positions(run_id, word, 5)
    assert found["prompts"] == len(where) and found["positions"] == sum(len(p) for p in where.values())
    for layer, neuron in [(0, 3), (1, 50)]:
        values = [
            neurons.token_activations(tiny_lm, store, run_id, idx, layer, neuron)[pos]
            for idx, positions in where.items()
            for pos in positions
        ]
        gid = layer * tiny_lm.info.d_ff + neuron
        assert found["mean"][gid] == pytest.approx(np.mean(values), abs=1e-4)
        assert found["mean_abs"][gid] == pytest.approx(np.mean(np.abs(values)), abs=1e-4)


def test_the_answer_is_cached_and_ranked(tiny_lm, run_copy, monkeypatch):
    store, run_id = run_copy
    word = _common_token(store, run_id)
    first = token_search.token_activity(tiny_lm, store, run_id, word)
    monkeypatch.setattr(token_search, "_activations_at", lambda *a: pytest.fail("recomputed"))
    again = token_search.token_activity(tiny_lm, store, run_id, f"  {word} ")
    assert np.array_equal(first["mean"], again["mean"]) and again["positions"] == first["positions"]
    rows = token_search.rank_neurons(store, run_id, again, limit=10)
    assert len(rows) == 10
    assert [r["z"] for r in rows] == sorted((r["z"] for r in rows), reverse=True)
    assert rows[0]["z"] == pytest.approx(float(first["z"].max()))
    plain = token_search.rank_neurons(store, run_id, again, limit=3, by="mean")
    assert plain[0]["mean a"] == pytest.approx(float(first["mean"].max()))
    with pytest.raises(BricklabError, match="ranking"):
        token_search.rank_neurons(store, run_id, again, by="best")


def test_z_measures_the_token_against_the_same_prompts_other_tokens(tiny_lm, run_copy):
    store, run_id = run_copy
    word = _common_token(store, run_id)
    found = token_search.token_activity(tiny_lm, store, run_id, word, max_prompts=3)
    where = store.token_positions(run_id, word, 3)
    gid = tiny_lm.info.d_ff + 9
    every = np.concatenate(
        [np.abs(neurons.token_activations(tiny_lm, store, run_id, i, 1, 9)) for i in where]
    )
    assert found["context_tokens"] == len(every)
    assert found["context_abs"][gid] == pytest.approx(every.mean(), abs=1e-4)
    assert found["z"][gid] == pytest.approx((found["mean_abs"][gid] - every.mean()) / every.std(), rel=1e-3)


def test_a_missing_or_empty_token_is_a_clear_error(tiny_lm, run_copy):
    store, run_id = run_copy
    with pytest.raises(BricklabError, match="No token"):
        token_search.token_activity(tiny_lm, store, run_id, "zzqqxx")
    with pytest.raises(BricklabError, match="empty"):
        token_search.token_activity(tiny_lm, store, run_id, " ")


PARIS = [
    "The capital of France is Paris.",
    "Paris is famous for the Eiffel Tower.",
    "We flew from London to Paris in the spring.",
    "def add(a, b):\n    return a + b",
    "Solve 3x + 5 = 20 for x.",
    "Water boils at one hundred degrees Celsius.",
    "She wrote a short poem about the sea.",
    "Translate 'good morning' into Spanish.",
]


@pytest.mark.slow
def test_the_readme_example_finds_paris_neurons_on_the_default_model(default_lm, tmp_path):
    """README: "Which neurons fire most on 'Paris'?" on a small run of the real default model."""
    store = Store(tmp_path / "paris.duckdb")
    run_id = capture.capture(default_lm, prompts.from_texts(PARIS), store, capture.CaptureConfig()).run_id
    found = token_search.token_activity(default_lm, store, run_id, "Paris")
    assert found["prompts"] == 3 and found["positions"] == 3
    rows = token_search.rank_neurons(store, run_id, found, limit=20)
    assert rows[0]["z"] > 2  # far above their activity on the prompts' other tokens
    assert np.median([r["× run mean"] for r in rows]) > 2  # and on the run as a whole
    store.close()
