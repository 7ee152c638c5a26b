"""Neuron detail, recomputed token activations and token search, on the tiny capture."""

import numpy as np
import pytest

from core.bricks import neurons
from core.errors import BricklabError
from core.store import Store


@pytest.fixture
def run_store(small_run):
    path, run_id = small_run
    s = Store(path)
    yield s, run_id
    s.close()


def test_detail_lists_ranked_examples_with_their_tokens(run_store):
    s, run_id = run_store
    run = s.require_run(run_id)
    detail = neurons.neuron_detail(s, run_id, 1, 7)
    assert detail.global_id == run.d_ff + 7
    assert len(detail.examples) == run.settings["top_k"]
    values = [e.value for e in detail.examples]
    assert values == sorted(values, reverse=True)
    for e in detail.examples:
        assert 0 <= e.pos < len(e.tokens)
        assert e.tokens == neurons.display_tokens([t[2] for t in s.tokens(run_id, e.prompt_idx)])
    assert set(detail.scores) == set(run.categories)
    assert all(0 <= v <= 1 for v in detail.scores.values())
    assert detail.fire_rate == pytest.approx(float(s.layer_array(run_id, "fire_rate")[1, 7]))


def test_detail_refuses_a_neuron_outside_the_run(run_store):
    s, run_id = run_store
    run = s.require_run(run_id)
    with pytest.raises(BricklabError, match="does not exist"):
        neurons.neuron_detail(s, run_id, run.n_layers, 0)
    with pytest.raises(BricklabError, match="does not exist"):
        neurons.neuron_detail(s, run_id, 0, run.d_ff)


def test_recomputed_activations_match_the_captured_top_example(run_store, tiny_lm):
    s, run_id = run_store
    top = neurons.neuron_detail(s, run_id, 1, 3, with_scores=False).examples[0]
    acts = neurons.token_activations(tiny_lm, s, run_id, top.prompt_idx, 1, 3)
    assert acts.shape == (len(top.tokens),)
    assert abs(acts[top.pos]) == pytest.approx(top.value, rel=1e-3)
    assert np.abs(acts).max() == pytest.approx(top.value, rel=1e-3)  # it was the prompt's strongest token


def test_search_finds_the_neuron_whose_top_token_it_is(run_store):
    s, run_id = run_store
    detail = neurons.neuron_detail(s, run_id, 0, 5, with_scores=False)
    word = detail.examples[0].tokens[detail.examples[0].pos].strip()
    found = neurons.search_tokens(s, run_id, word.upper(), limit=10_000)
    assert (0, 5) in {(r["layer"], r["neuron"]) for r in found}
    assert all(r["hits"] >= 1 and r["prompts"] >= 1 for r in found)
    hits = [r["hits"] for r in found]
    assert hits == sorted(hits, reverse=True)


def test_search_treats_wildcards_as_text(run_store):
    s, run_id = run_store
    assert neurons.search_tokens(s, run_id, "%%%%", exact=False) == []  # unescaped, it matches all
    assert neurons.search_tokens(s, run_id, "____", exact=False) == []
    assert neurons.search_tokens(s, run_id, "the", exact=False)  # a substring of common tokens
    with pytest.raises(BricklabError, match="empty"):
        neurons.search_tokens(s, run_id, "  ")


@pytest.mark.parametrize(
    ("token", "text"),
    [("ĠParis", " Paris"), ("Ċ", "\n"), ("▁Paris", " Paris"), ("Ã©", "é"), ("plain", "plain")],
)
def test_display_token(token, text):
    assert neurons.display_token(token) == text


def test_display_tokens_keep_characters_split_over_tokens_whole(tiny_lm):
    text = "首都是巴黎。東京は日本の首都です 🧱"
    stored = tiny_lm.tokenizer.convert_ids_to_tokens(tiny_lm.tokenizer.encode(text))
    assert "\ufffd" in "".join(neurons.display_token(t) for t in stored)  # one at a time: broken
    pieces = neurons.display_tokens(stored)
    assert len(pieces) == len(stored) and "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert neurons.display_tokens(["<0xE4>", "<0xBD>", "<0xA0>", "▁ok"]) == ("", "", "你", " ok")
    assert neurons.display_tokens(["Ã"]) == ("\ufffd",)  # a lone lead byte never completes
