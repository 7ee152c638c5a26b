"""A mixture-of-experts run on the Bricks page (AppTest, a tiny random mixtral): the experts as a brick
method, and the per-category expert usage chart; a dense run shows neither."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import models
from core.capture import experts as expert_routes
from core.capture import run as capture
from core.store import Store
from tests.conftest import app
from tests.pages.test_page_routing import chart_array
from tests.test_experts import N_EXPERTS, SMALL, save_tiny_moe


@pytest.fixture(scope="module")
def mixtral_run(tmp_path_factory, default_dir, small_prompts) -> tuple[str, str, str]:
    """(model folder, store path, run id) of a capture of 21 prompts with a tiny random mixtral."""
    folder = save_tiny_moe(tmp_path_factory.mktemp("tiny-mixtral"), default_dir, "mixtral")
    path = tmp_path_factory.mktemp("mixtral-run") / "cache.duckdb"
    store = Store(path)
    run_id = capture.capture(models.load_model(folder, device="cpu"), small_prompts, store, SMALL).run_id
    store.close()
    return folder, str(path), run_id


@pytest.fixture
def on_mixtral_run(monkeypatch, mixtral_run) -> tuple[str, str]:
    folder, path, run_id = mixtral_run
    monkeypatch.setenv("BRICKLAB_DB", path)
    monkeypatch.setenv("BRICKLAB_MODEL", folder)
    return path, run_id


def test_a_moe_run_shows_expert_usage_per_category_and_offers_its_experts(on_mixtral_run):
    path, run_id = on_mixtral_run
    at = app("3_Bricks.py").run()
    assert not at.exception
    assert "Expert usage" in [h.value for h in at.subheader]
    store = Store(path)
    try:
        usage, names = expert_routes.usage_by_category(store, run_id)
    finally:
        store.close()
    chart = at.get("plotly_chart")[-1].proto.spec

    heatmap = json.loads(chart)["data"][0]
    np.testing.assert_allclose(chart_array(heatmap["z"]), 100 * usage[:, 0], rtol=1e-6)
    assert heatmap["y"] == names and heatmap["x"] == [f"E{e}" for e in range(N_EXPERTS)]
    at.slider(key="expert-usage-layer").set_value(1).run()
    heatmap = json.loads(at.get("plotly_chart")[-1].proto.spec)["data"][0]
    np.testing.assert_allclose(chart_array(heatmap["z"]), 100 * usage[:, 1], rtol=1e-6)

    method = at.radio[0]
    assert "trained experts (MoE)" in method.options  # the labels the page shows
    method.set_value("expert").run()
    assert not at.exception
    table = at.dataframe[0].value
    expected = [f"expert-L{layer}-E{e}" for layer in range(2) for e in range(N_EXPERTS)]
    assert sorted(table["brick"]) == sorted(expected)  # the page orders bricks by significance


def test_taking_an_expert_out_of_the_router_compares_the_continuations(on_mixtral_run, monkeypatch):
    """The page asks core for the expert it names, with the renormalisation chosen, and shows both texts
    (core.live.experts.compare_routed itself is tested in tests/test_experts.py)."""
    from core.live import experts as live_experts

    asked = {}

    def fake(lm, prompt, factors, renormalise=True, max_new_tokens=24):
        asked.update(prompt=prompt, factors=factors, renormalise=renormalise)
        return live_experts.RoutedText("the plain one", "the routed one", 1)

    monkeypatch.setattr(live_experts, "compare_routed", fake)
    at = app("3_Bricks.py").run()
    at.slider(key="expert-usage-layer").set_value(1).run()
    next(s for s in at.selectbox if s.label == "Expert").set_value(2)
    next(t for t in at.toggle if t.label == "Renormalise").set_value(False)
    at.text_input(key="expert-route-prompt").input("Tell me about the moon.")
    at.button(key="expert-route-go").click().run()
    assert not at.exception
    expected = np.ones((2, N_EXPERTS))
    expected[1, 2] = 0
    np.testing.assert_array_equal(asked.pop("factors"), expected)
    assert asked == {"prompt": "Tell me about the moon.", "renormalise": False}
    assert [m.value for m in at.markdown][-2:] == ["**Plain**", "**Without E2 of layer 1**"]
    assert [c.value for c in at.code][-2:] == ["the plain one", "the routed one"]
    assert "first differs at token 1" in [c.value for c in at.caption]


def test_a_dense_run_shows_no_experts(monkeypatch, small_run, tiny_dir):
    monkeypatch.setenv("BRICKLAB_DB", str(small_run[0]))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    at = app("3_Bricks.py").run()
    assert not at.exception
    assert "Expert usage" not in [h.value for h in at.subheader]
    assert len(at.radio[0].options) == 3 and "trained experts (MoE)" not in at.radio[0].options
