"""The Bricks page's "Edit bricks" section in Streamlit's AppTest on the tiny run: grow, merge, a
refusal, undo, and the operations in the session's configuration."""

from __future__ import annotations

import json

import pytest

from tests.conftest import app


@pytest.fixture
def bricks_page(monkeypatch, small_run, tiny_dir):
    path, _ = small_run
    monkeypatch.setenv("BRICKLAB_DB", str(path))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    at = app("3_Bricks.py").run()
    assert not at.exception
    return at


def sizes(at) -> dict[str, int]:
    return {name: sum(map(len, b.neurons.values())) for name, b in at.session_state["config_bricks"].items()}


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_grow_merge_and_undo(bricks_page):
    at = bricks_page
    at.radio(key="edit-op").set_value("grow")
    at.selectbox(key="edit-brick").set_value("coact-L01-00")
    at.number_input(key="edit-n").set_value(3)
    at.button(key="edit-apply").click().run()
    assert not at.exception and not at.error
    assert sizes(at) == {"coact-L01-00": 35}
    grown = at.session_state["config_bricks"]["coact-L01-00"]
    assert grown.mode == "scale" and grown.factor == 1.0  # it joined with no effect
    shown = metrics(at)
    assert shown["coherence before"] != shown["coherence after"]
    assert float(shown["coherence after"]) > 0

    at.radio(key="edit-op").set_value("merge").run()
    at.selectbox(key="edit-other").set_value("coact-L01-01")
    at.button(key="edit-apply").click().run()
    assert not at.exception and not at.error
    merged = at.session_state["config_bricks"]["coact-L01-00+coact-L01-01"]
    assert list(sizes(at)) == [merged.name] and set(merged.neurons[1]) > set(grown.neurons[1])
    assert 64 <= len(merged.neurons[1]) <= 67  # grown may have taken some of coact-L01-01's neurons
    assert at.selectbox(key="edit-brick").value == "coact-L01-00+coact-L01-01"
    assert len(metrics(at)["coherence before"].split(" · ")) == 2
    history = at.dataframe[-1].value
    assert history["operation"].tolist() == ["grow", "merge"]
    operations = at.session_state["config_history"].records()
    assert [r["result"] for r in operations] == [["coact-L01-00"], ["coact-L01-00+coact-L01-01"]]

    at.button(key="edit-undo").click().run()
    assert not at.exception
    assert at.session_state["config_bricks"] == {"coact-L01-00": grown}
    at.button(key="edit-undo").click().run()
    assert not at.exception
    assert sizes(at) == {} and at.button(key="edit-undo").disabled


def test_a_refused_operation_says_why_and_changes_nothing(bricks_page):
    at = bricks_page
    at.radio(key="edit-op").set_value("shrink")
    at.selectbox(key="edit-brick").set_value("coact-L00-00")
    at.number_input(key="edit-n").set_value(32)
    at.button(key="edit-apply").click().run()
    assert not at.exception
    assert "would leave none" in "\n".join(e.value for e in at.error)
    assert sizes(at) == {} and at.button(key="edit-undo").disabled


def test_split_then_rename_and_label(bricks_page):
    at = bricks_page
    at.radio(key="edit-op").set_value("split")
    at.selectbox(key="edit-brick").set_value("coact-L00-01")
    at.button(key="edit-apply").click().run()
    assert not at.exception and not at.error
    assert sizes(at) == {"coact-L00-01-a": 16, "coact-L00-01-b": 16}
    assert len(metrics(at)["coherence after"].split(" · ")) == 2
    at.radio(key="edit-op").set_value("rename").run()
    at.text_input(key="edit-name-coact-L00-01-a").input("early")
    at.text_input(key="edit-label-coact-L00-01-a").input("syntax")
    at.button(key="edit-apply").click().run()
    assert not at.exception and not at.error
    assert list(sizes(at)) == ["early", "coact-L00-01-b"]
    assert at.session_state["config_bricks"]["early"].label == "syntax"


def test_the_exported_configuration_records_the_operations(bricks_page):
    at = bricks_page
    at.radio(key="edit-op").set_value("grow")
    at.selectbox(key="edit-brick").set_value("coact-L01-02")
    at.button(key="edit-apply").click().run()
    export = app("6_Export.py")
    for key in ("config_bricks", "config_fingerprint", "config_history", "run_id"):
        export.session_state[key] = at.session_state[key]
    export.run()
    assert not export.exception
    doc = json.loads(export.code[0].value)
    (record,) = doc["operations"]
    assert (record["op"], record["bricks"], record["params"]["n"]) == ("grow", ["coact-L01-02"], 4)
    assert len(doc["bricks"][0]["neurons"]["1"]) == 36
