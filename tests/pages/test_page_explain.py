"""AppTests of what a neuron does: its description and written tokens in neuron and brick detail, and
the Neuron map's whole-run token search, on the tiny model and run."""

from __future__ import annotations

import pytest

from tests.conftest import app, texts


def _markdown(at) -> str:
    return texts(at.markdown)


@pytest.mark.usefixtures("on_small_run")
def test_neuron_detail_says_in_words_what_it_does_and_what_it_writes():
    at = app("2_Neuron_map.py")
    at.session_state["neuron"] = (1, 7)
    at.run()
    assert not at.exception
    shown = _markdown(at)
    assert "**In words:**" in shown and "fires on" in shown and "promotes" in shown
    assert "**Promotes**" in shown and "**Suppresses:**" in shown
    assert "held-out prompts" in texts(at.caption)


@pytest.mark.usefixtures("on_small_run")
def test_search_reruns_the_run_and_opens_a_neuron():
    at = app("2_Neuron_map.py").run()
    at.text_input[0].input("the").run()
    assert not at.exception and not at.warning
    table = at.dataframe[0].value
    assert {"layer", "neuron", "z", "mean a", "× run mean"} <= set(table.columns)
    assert table["z"].is_monotonic_decreasing
    at.radio[1].set_value("promote it").run()
    assert not at.exception
    assert "logit per unit a" in at.dataframe[0].value.columns
    assert "raises the logit of" in texts(at.caption)


@pytest.mark.usefixtures("on_small_run")
def test_a_token_missing_from_the_run_says_so_and_offers_the_promoting_neurons():
    at = app("2_Neuron_map.py").run()
    at.text_input[0].input("Zanzibarqq").run()
    assert not at.exception
    assert "No token" in texts(at.info)
    assert "logit per unit a" in at.dataframe[0].value.columns


@pytest.mark.usefixtures("on_small_run")
def test_brick_detail_describes_the_brick_and_its_output():
    at = app("3_Bricks.py")
    at.session_state["brick"] = "coact-L01-00"
    at.run()
    assert not at.exception
    shown = _markdown(at)
    assert "**Distinctive input tokens**" in shown and "**Its summed output promotes**" in shown
    assert shown.count("**In words:**") == 2  # the brick's, and its first neuron's
    labels = at.dataframe[0].value["label"].tolist()
    assert labels == sorted(labels, key=lambda label: label == "")  # labelled bricks first
