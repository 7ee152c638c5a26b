"""Routing in the app (AppTest, tiny model, a copy of the small run): the Playground's auto mode fits
a router on request, then shows what it chose, the share of neurons that ran, the time per token and
the dense and routed outputs; the Paper page draws the quality–compute curve."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil

import numpy as np
import pytest
import torch

from core.live import compare, evaluate
from core.routing import route as routing
from core.routing import tradeoff
from core.store import Store
from tests.conftest import app, texts
from ui import routing_view


@pytest.fixture
def run_copy(monkeypatch, small_run, tiny_dir, tmp_path) -> tuple[str, str]:
    """The app looks at a private copy of the small run, so routers start unfitted; (path, run id)."""
    path = tmp_path / "cache.duckdb"
    shutil.copy(small_run[0], path)
    monkeypatch.setenv("BRICKLAB_DB", str(path))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    return str(path), small_run[1]


def stored(path: str, run_id: str, preset: str, budget: float) -> routing.Router | None:
    return routing.load(
        Store(path), {"run_id": run_id, "params": tradeoff.router_params(preset, budget).key()}
    )


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def strip_text(element) -> str:
    """The tokens of a token strip, as its HTML escapes them."""
    return re.sub(r"<[^>]+>", "", element.proto.body)


def escaped(lm, ids: list[int]) -> str:
    return "".join(html.escape(lm.tokenizer.decode([i])).replace("\n", "⏎") for i in ids)


def chart_array(value) -> np.ndarray:
    """A figure array as Plotly writes it: a list, or base64 bytes with a dtype."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.array(value, dtype=float)


def auto(at, kind: str | None = None):
    at.pills[0].set_value("Auto (router)").run()
    if kind:
        at.radio[0].set_value(kind).run()
    return at


def test_auto_mode_fits_the_router_on_request_and_shows_what_it_chose(run_copy, tiny_lm):
    path, run_id = run_copy
    at = auto(app("4_Playground.py").run())
    assert not at.exception
    at.slider[0].set_value(10).run()  # a budget at which the tiny model's output changes
    fit = [b for b in at.button if b.label == "Fit the category router at 10%"]
    assert fit and not at.metric  # nothing runs before the click
    fit[0].click().run()
    assert not at.exception and not at.error
    router = stored(path, run_id, "category", 0.1)
    assert router is not None  # fitted into the cache
    shown = metrics(at)
    category = re.search(r"read the prompt as \*\*(\w+)\*\*", texts(at.markdown)).group(1)
    keep = router.arrays["keep"][router.categories.index(category)]
    assert shown["neurons that ran"] == f"{keep.mean():.1%}"
    assert shown["time saved"].endswith("%") and float(shown["routed, ms per token"]) > 0

    ids, span = routing.prompt_span(tiny_lm, "What is the capital of France?")
    dense = compare.generate(tiny_lm, ids, 32)
    with routing.routed(tiny_lm, router, ids, span) as route:
        routed = compare.generate(tiny_lm, ids, 32)
    assert route.category == category and dense != routed
    assert shown["first divergent token"] == str(compare.first_divergence(dense, routed) + 1)
    strips = at.get("html")
    assert [strip_text(s) for s in strips] == [escaped(tiny_lm, dense), escaped(tiny_lm, routed)]

    assert "Category probabilities" in at.get("plotly_chart")[0].proto.spec
    table = at.dataframe[0].value
    assert (np.diff(table["ran"].to_numpy()) <= 0).all()  # most-run bricks first
    from core.bricks import candidates as bricks

    found = {b.brick_id: b for b in bricks.compute_bricks(Store(path), run_id)}
    for _, row in table.iterrows():
        assert row["ran"] == pytest.approx(keep.reshape(-1)[found[row["brick"]].neurons].mean())
    assert f"{(table['ran'] >= 0.5).sum()} of {len(table)} bricks" in texts(at.markdown)

    again = auto(app("4_Playground.py").run())  # a new session: the router comes from the cache
    again.slider[0].set_value(10).run()
    assert not [b for b in again.button if b.label.startswith("Fit")]
    assert f"read the prompt as **{category}**" in texts(again.markdown)


def test_auto_mode_token_router_shows_the_bricks_per_token(run_copy, tiny_lm):
    at = auto(app("4_Playground.py").run(), "token · oracle")
    next(b for b in at.button if b.label == "Fit the token (oracle) router at 35%").click().run()
    assert not at.exception and not at.error
    assert "co-activation bricks** of each layer" in texts(at.markdown)
    use = chart_array(json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["z"])
    router = stored(*run_copy, "token_oracle", 0.35)
    k = max(1, round(0.35 * (router.arrays["brick_of"].max() + 1)))
    assert use.shape == (2, router.arrays["brick_of"].max() + 1)
    assert np.allclose(use.sum(axis=1), k)  # every token ran exactly k bricks per layer
    assert len(at.get("html")) == 2


def test_auto_mode_neuron_oracle_runs_k_single_neurons_per_token(run_copy, tiny_lm):
    at = auto(app("4_Playground.py").run(), "neurons · oracle")
    next(b for b in at.button if b.label == "Fit the neurons (oracle) router at 35%").click().run()
    assert not at.exception and not at.error
    assert "neurons** of each layer" in texts(at.markdown)
    use = chart_array(json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["z"])
    d_ff = tiny_lm.info.d_ff
    assert use.shape == (2, d_ff) and np.allclose(use.sum(axis=1), max(1, round(0.35 * d_ff)))


def test_auto_mode_refuses_an_empty_prompt(run_copy):
    at = auto(app("4_Playground.py").run(), "static")
    next(b for b in at.button if b.label.startswith("Fit")).click().run()
    at.text_area[0].input("   ").run()
    assert not at.exception
    assert "prompt is empty" in texts(at.error)


@torch.inference_mode()
def test_paper_draws_the_quality_compute_curve(run_copy, tiny_lm):
    path, run_id = run_copy
    at = app("5_Paper.py").run()
    at.toggle[0].set_value(True).run()  # quick analysis first: the curve is the page's last section
    next(b for b in at.button if b.label.startswith("Compute the")).click().run()
    assert "6 · Routing: run only the neurons an input needs" in [h.value for h in at.header]
    assert len(at.get("plotly_chart")) == 5  # the curve waits for its button
    next(b for b in at.button if b.label.startswith("Measure the quality–compute curve")).click().run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 6
    traces = json.loads(at.get("plotly_chart")[-1].proto.spec)["data"]
    assert [t["name"] for t in traces] == [*(routing_view.LABELS[p] for p in tradeoff.CURVE_PRESETS), "dense"]
    held = tradeoff.held_out(Store(path), run_id, 2)
    assert f"Measured on {len(held)} held-out prompts" in texts(at.caption)

    category = traces[0]  # recompute one point of the category line by hand
    router = stored(path, run_id, "category", 0.35)
    losses, chosen = routing.routed_losses(tiny_lm, router, held)
    want = np.mean(losses) / np.mean(evaluate.loss_per_prompt(tiny_lm, held))
    assert chart_array(category["y"])[1] == pytest.approx(want, rel=1e-5)
    assert chart_array(category["x"])[1] == pytest.approx(
        np.mean([routing.active_share(router, c) for c in chosen])
    )
