"""The routing trade-off for the app, on the tiny model: the curve is measured once and then read
from the cache, and a routed run reports the neurons that ran for the prompt."""

import shutil

import numpy as np
import pytest

from core.errors import BricklabError
from core.routing import route as routing
from core.routing import tradeoff
from core.store import Store


@pytest.fixture
def run_store(small_run, tmp_path):
    path = tmp_path / "cache.duckdb"
    shutil.copy(small_run[0], path)
    store = Store(path)
    yield store, small_run[1]
    store.close()


def test_the_curve_is_measured_once_then_read_from_the_cache(tiny_lm, run_store, monkeypatch):
    store, run_id = run_store
    params = tradeoff.CurveParams(budgets=(0.3, 0.6), presets=("static",))
    seen = []
    first = tradeoff.curve(tiny_lm, store, run_id, params, lambda done, total, what: seen.append(done))
    assert seen == [0, 1, 2] and first["n_prompts"] == len(tradeoff.held_out(store, run_id, 2))
    shares = [p["active_share"] for p in first["lines"]["static"]]
    assert shares[0] < shares[1]  # a larger budget runs more neurons

    def refit(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr(routing, "fit", refit)
    assert tradeoff.curve(tiny_lm, store, run_id, params) == first
    with pytest.raises(AssertionError, match="fitted again"):  # other parameters are measured anew
        tradeoff.curve(tiny_lm, store, run_id, tradeoff.CurveParams(budgets=(0.3,), presets=("static",)))


def test_a_routed_run_keeps_the_routers_set(tiny_lm, run_store):
    store, run_id = run_store
    router = routing.fit(tiny_lm, store, run_id, tradeoff.router_params("static", 0.25))
    result = tradeoff.routed_run(tiny_lm, router, "Name a colour.", 6)
    assert np.array_equal(result.kept, router.arrays["keep"]) and result.brick_use is None
    assert result.route.active_share == pytest.approx(result.kept.mean())
    assert len(result.dense_pieces) == 6
    with pytest.raises(BricklabError, match="Unknown router kind"):
        tradeoff.router_params("psychic", 0.3)
