"""Routers fitted on a small tiny-model run: what they keep, the prompt classifier, the learned
token map, the cache and configuration round trip, and running a model under a router."""

import numpy as np
import pytest
import torch

from core import configuration
from core.bricks import scores
from core.errors import BricklabError
from core.live import evaluate, interventions, plan, sparse
from core.routing import route as routing
from core.routing import token_map, topk
from core.routing.route import RouterParams
from core.store import Store


@pytest.fixture
def run_store(small_run):
    path, run_id = small_run
    store = Store(path)
    yield store, run_id
    store.close()


def texts(store, run_id, held_out=True):
    half = routing.selection_half(store, run_id)
    return [text for (_, _, _, text), h in zip(store.prompts(run_id), half, strict=True) if h != held_out]


@pytest.mark.parametrize("kind", ["static", "category"])
def test_kept_sets_fill_the_budget_per_layer(tiny_lm, run_store, kind):
    store, run_id = run_store
    router = routing.fit(tiny_lm, store, run_id, RouterParams(kind=kind, budget=0.25))
    keep = router.arrays["keep"].reshape(-1, *router.shape)  # (sets, L, d_ff)
    resident = np.zeros(router.shape, bool).reshape(-1)
    resident[scores.resident_neurons(store, run_id)] = True
    assert keep.reshape(len(keep), -1)[:, resident].all()  # residents always run
    per_layer = keep.sum(axis=2)
    assert (per_layer >= 24).all() and (
        per_layer <= np.maximum(24, resident.reshape(router.shape).sum(1))
    ).all()
    if kind == "category":
        assert len(keep) == 7 and len({k.tobytes() for k in keep}) > 1  # categories keep different sets


def test_category_profile_matches_the_capture(tiny_lm, run_store):
    """The classifier reads the same mean |a| profile at routing time that the capture stored."""
    store, run_id = run_store
    text = store.prompts(run_id)[4][3]
    ids, span = routing.prompt_span(tiny_lm, text)
    profile = routing._profile(tiny_lm, ids, span, 2)
    stored = store.prompt_activations(run_id)[4].astype(np.float32)
    assert np.allclose(profile, stored, rtol=2e-2, atol=1e-3)
    assert sparse.patched_count(tiny_lm.model) == 0  # the early stop left nothing behind


def test_category_routing_classifies_and_keeps_that_category(tiny_lm, run_store):
    store, run_id = run_store
    router = routing.fit(tiny_lm, store, run_id, RouterParams(kind="category", budget=0.3, profile_layers=1))
    train = texts(store, run_id, held_out=False)
    labels, names = scores.category_labels(store, run_id)
    half = routing.selection_half(store, run_id)
    right = 0
    for text, label in zip(train, labels[half], strict=True):
        ids, span = routing.prompt_span(tiny_lm, text)
        probabilities = routing.classify(tiny_lm, router, ids, span)
        assert abs(sum(probabilities.values()) - 1) < 1e-6
        right += max(probabilities, key=probabilities.get) == names[label]
    assert right >= len(train) - 2  # fitted on these prompts: nearly all right
    ids, span = routing.prompt_span(tiny_lm, train[0])
    with routing.routed(tiny_lm, router, ids, span) as route:
        got = tiny_lm.model(torch.tensor([ids])).logits
    keep = router.arrays["keep"][names.index(route.category)]
    with interventions.transforms(tiny_lm.model, evaluate.kept_neurons(2, 96, np.flatnonzero(keep))):
        want = tiny_lm.model(torch.tensor([ids])).logits
    assert torch.allclose(got, want, atol=1e-4) and route.sparse
    assert route.active_share == pytest.approx(keep.mean())


def test_reduced_rank_solve_recovers_a_low_rank_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    w = rng.normal(size=(16, 3)) @ rng.normal(size=(3, 10))  # rank 3
    y = x @ w + 0.5
    normal = token_map._Normal(np.arange(10), 16)
    rows = torch.from_numpy(np.c_[x, np.ones(500)])
    normal.xtx, normal.xty = rows.T @ rows, rows.T @ torch.from_numpy(y)
    fitted = normal.solve(rank=3, ridge=1e-8)
    pred = (
        x @ fitted["w_in"].double().numpy() @ fitted["w_out"].double().numpy()
        + fitted["bias"].double().numpy()
    )
    assert np.allclose(pred, y, atol=1e-3)
    assert fitted["w_in"].shape == (16, 3)
    assert not np.allclose(
        x @ normal.solve(rank=1, ridge=1e-8)["w_in"].numpy() @ np.ones((1, 10)), y, atol=1e-2
    )


def ffn_input(lm, ids: list[int], layer: int) -> torch.Tensor:
    """The input of layer `layer`'s FFN for a prompt: (T, d_model)."""
    seen = []

    def record(f, x):
        seen.append(x[0])
        return f.down(f.activations(x))

    with sparse.sparse(lm.model, {layer: record}):
        lm.model(torch.tensor([ids]))
    return seen[0]


@torch.inference_mode()
def test_learned_token_router_beats_chance_on_held_out_prompts(tiny_lm, run_store):
    store, run_id = run_store
    params = RouterParams(kind="token", budget=0.25, brick_size=1, router_rank=0)
    router = routing.fit(tiny_lm, store, run_id, params)
    assert router.arrays["w_in"].shape == (2, tiny_lm.info.d_model, 96)
    f, captured = sparse.ffn(tiny_lm.model, 1), []
    scorer = routing.layer_fns(router)[1].score
    for text in texts(store, run_id)[:4]:
        x = ffn_input(tiny_lm, routing.prompt_span(tiny_lm, text)[0], 1)
        mass = f.activations(x).abs()
        top = scorer(x).topk(24, dim=-1).indices
        captured.append(float((mass.gather(-1, top).sum(-1) / mass.sum(-1)).mean()))
    assert np.mean(captured) > 0.25 + 0.05  # 24 of 96 neurons at random hold a quarter of the mass


def test_router_round_trip_through_cache_and_configuration(tiny_lm, run_store):
    store, run_id = run_store
    router = routing.fit(
        tiny_lm, store, run_id, RouterParams(kind="token", budget=0.5, brick_size=1, router_rank=8)
    )
    config = routing.to_config(router, tiny_lm.info)
    again = configuration.loads(config.to_json(), tiny_lm.info)
    loaded = routing.from_config(store, again)
    assert loaded.params == router.params and loaded.shape == router.shape
    assert set(loaded.arrays) == set(router.arrays)
    assert all(np.array_equal(loaded.arrays[k], router.arrays[k]) for k in router.arrays)
    ids, span = routing.prompt_span(tiny_lm, "Name three colours.")
    outputs = []
    for r in (router, loaded):
        with torch.inference_mode(), routing.routed(tiny_lm, r, ids, span):
            outputs.append(tiny_lm.model(torch.tensor([ids])).logits)
    assert torch.equal(*outputs)
    assert sparse.patched_count(tiny_lm.model) == 0


def test_static_router_config_applies_without_the_cache(tiny_lm, run_store):
    store, run_id = run_store
    router = routing.fit(tiny_lm, store, run_id, RouterParams(kind="static", budget=0.4))
    config = routing.to_config(router, tiny_lm.info)
    assert plan.active_share(config) == pytest.approx(routing.active_share(router))
    some = texts(store, run_id)[:3]
    with interventions.configured(tiny_lm, config):
        want = evaluate.loss_per_prompt(tiny_lm, some)
    got, chosen = routing.routed_losses(tiny_lm, router, some)
    assert np.allclose(got, want, rtol=1e-4) and chosen == [None] * 3


def test_oracle_router_needs_no_fit_and_routes_the_top_mass(tiny_lm, run_store):
    store, run_id = run_store
    router = routing.fit(
        tiny_lm, store, run_id, RouterParams(kind="token", budget=0.25, brick_size=1, oracle=True)
    )
    assert set(router.arrays) == {"brick_of"}
    some = texts(store, run_id)[:3]
    norms = [torch.ones(96)] * 2
    want = evaluate.loss_per_prompt(tiny_lm, some, per_layer=evaluate.lowest_k_mask(0.75, "abs", norms))
    got, _ = routing.routed_losses(tiny_lm, router, some)
    assert np.allclose(got, want, rtol=1e-4)


def test_bad_references_and_foreign_models_are_refused(tiny_lm, run_store):
    store, run_id = run_store
    with pytest.raises(BricklabError, match="router reference"):
        routing.load(store, {"run_id": 3})
    with pytest.raises(BricklabError, match="Unknown router parameters"):
        routing.load(store, {"run_id": run_id, "params": {"colour": "red"}})
    router = routing.fit(tiny_lm, store, run_id, RouterParams(kind="static", budget=0.3))
    config = routing.to_config(router, tiny_lm.info)
    missing = configuration.BrickConfig(
        **{**vars(config), "source": {"router": router.ref() | {"params": {"kind": "static", "budget": 0.9}}}}
    )
    with pytest.raises(BricklabError, match="not in this cache"):
        routing.from_config(store, missing)
    other = routing.Router(router.params, run_id, "0" * 16, router.shape, router.categories, router.arrays)
    with pytest.raises(BricklabError, match="another model"), routing.routed(tiny_lm, other):
        pass
    with pytest.raises(BricklabError, match="budget"):
        RouterParams(budget=0)


def test_gate_router_needs_no_map_and_round_trips(tiny_lm, run_store):
    store, run_id = run_store
    params = RouterParams(kind="token", budget=0.25, brick_size=1, gate=True, proposed=2)
    router = routing.fit(tiny_lm, store, run_id, params)
    assert set(router.arrays) == {"brick_of"} and params.key()["gate"] is True
    assert "gate" not in RouterParams(kind="token", budget=0.25).key()  # keys stored before it still match
    loaded = routing.from_config(
        store, configuration.loads(routing.to_config(router, tiny_lm.info).to_json())
    )
    assert loaded.params == params
    fns = routing.layer_fns(loaded)
    assert all(fn.mode == topk.GATE and (fn.k, fn.proposed) == (24, 48) for fn in fns.values())
    with pytest.raises(BricklabError, match="exclude"):
        RouterParams(kind="token", gate=True, oracle=True)


def test_dense_prefill_routes_only_one_token_passes(tiny_lm, run_store):
    store, run_id = run_store
    router = routing.fit(
        tiny_lm, store, run_id, RouterParams(kind="token", budget=0.25, brick_size=1, oracle=True)
    )
    ids = torch.tensor([routing.prompt_span(tiny_lm, "Name three colours.")[0]])

    def logits(prefill, x):
        with torch.inference_mode(), routing.routed(tiny_lm, router, prefill=prefill):
            return tiny_lm.model(x).logits

    dense = tiny_lm.model(ids).logits.detach()
    assert torch.allclose(logits("dense", ids), dense, atol=1e-5)  # the prompt's pass runs dense
    assert not torch.allclose(logits("routed", ids), dense, atol=1e-3)
    one = ids[:, :1]
    assert torch.equal(logits("dense", one), logits("routed", one))  # one token is routed either way
    assert not torch.allclose(logits("dense", one), tiny_lm.model(one).logits.detach(), atol=1e-3)
    with pytest.raises(BricklabError, match="prefill"), routing.routed(tiny_lm, router, prefill="half"):
        pass
