"""Mixture-of-experts experts as bricks (core/experts.py, core/live/experts.py, core/capture/experts.py):
tiny random mixtral and qwen2_moe models (hidden 64, 2 layers, 4 experts, top-2, expert FFN 32) through
capture -> expert bricks -> live ablation by mask and by router -> apply, leaving nothing installed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from core import experts, models, prompts
from core.bricks import candidates
from core.bricks.configure import config_from_bricks
from core.capture import experts as expert_routes
from core.capture import run as capture
from core.errors import BricklabError
from core.live import compare, interventions
from core.live import experts as live_experts
from core.store import Store

N_EXPERTS, D_EXPERT, TOP_K = 4, 32, 2
MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", {"intermediate_size": D_EXPERT, "num_local_experts": N_EXPERTS}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "moe_intermediate_size": D_EXPERT,
            "num_experts": N_EXPERTS,
            "shared_expert_intermediate_size": 48,
            "intermediate_size": 48,
            "norm_topk_prob": False,
        },
    ),  # fmt: skip
}
SMALL = capture.CaptureConfig(chunk_prompts=8)


def save_tiny_moe(path, default_dir: str, model_type: str) -> str:
    import transformers

    cls, sizes = MOE_CONFIGS[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(
        vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts_per_tok=TOP_K, max_position_embeddings=512, tie_word_embeddings=True, **sizes,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(default_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=sorted(MOE_CONFIGS))
def moe_lm(request, tmp_path_factory, default_dir) -> models.LoadedModel:
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return models.load_model(save_tiny_moe(folder, default_dir, request.param), device="cpu")


@pytest.fixture(scope="module")
def moe_run(moe_lm, small_prompts, tmp_path_factory):
    """(store path, run id) of a complete capture of 21 prompts with the tiny MoE model."""
    path = tmp_path_factory.mktemp("moe-run") / "cache.duckdb"
    store = Store(path)
    result = capture.capture(moe_lm, small_prompts, store, SMALL)
    store.close()
    return path, result.run_id


@pytest.fixture
def moe_store(moe_run):
    store = Store(moe_run[0])
    yield store, moe_run[1]
    store.close()


def _ids(lm, text="Write a short poem about the sea."):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def _logits(lm, ids) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids).logits


def _nothing_left(lm) -> bool:
    return experts.leftovers(lm.model) == 0 and interventions.hook_count(lm.model) == 0


# --- the model ------------------------------------------------------------------------------------


def test_a_moe_layer_is_its_experts_side_by_side(moe_lm):
    info, model = moe_lm.info, moe_lm.model
    assert (info.n_layers, info.d_ff) == (2, N_EXPERTS * D_EXPERT)
    assert experts.layout(model) == experts.Layout(N_EXPERTS, D_EXPERT, TOP_K)
    fused = experts.experts_modules(model)[1]
    w = models.down_weight(model, 1)
    assert tuple(w.shape) == (64, N_EXPERTS * D_EXPERT)
    assert torch.equal(w[:, 2 * D_EXPERT + 5], fused.down_proj[2, :, 5])


def test_the_exposed_forward_matches_transformers_and_is_removed(moe_lm):
    ids = _ids(moe_lm)
    plain = _logits(moe_lm, ids)
    with interventions.transforms(moe_lm.model, {0: lambda a: a, 1: lambda a: a}):
        assert all(experts.exposed(m) for m in experts.experts_modules(moe_lm.model))
        seen = _logits(moe_lm, ids)
    torch.testing.assert_close(seen, plain, atol=1e-5, rtol=1e-5)
    assert _nothing_left(moe_lm)


def test_a_dense_model_is_refused_by_the_router_tools(tiny_lm):
    with (
        pytest.raises(BricklabError, match="no mixture-of-experts"),
        live_experts.router_choice(tiny_lm.model, np.ones((2, 4))),
    ):
        pass
    assert experts.leftovers(tiny_lm.model) == 0


# --- capture ----------------------------------------------------------------------------------------


def _reference(lm, text: str, config: capture.CaptureConfig):
    """For one prompt, alone and unpadded, from the model's own router and expert weights: the own tokens'
    activations (T, d_ff) per layer and their routed experts (T, top_k) per layer."""
    limit = prompts.token_limit(lm.model, config.max_tokens)
    enc = prompts.encode(lm.tokenizer, text, limit, config.chat_template)
    inputs = {}
    blocks = models.blocks(lm.model)
    handles = [
        block.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0][0].detach()))
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([enc.ids]))
    finally:
        for h in handles:
            h.remove()
    acts, routes = [], []
    for i, block in enumerate(blocks):
        x = inputs[i][enc.start : enc.end]
        with torch.no_grad():
            _, _, chosen = block.mlp.gate(x)
        fused, a = block.mlp.experts, torch.zeros((len(x), N_EXPERTS, D_EXPERT))
        for t in range(len(x)):
            for e in chosen[t].tolist():
                gate, up = (fused.gate_up_proj[e] @ x[t]).chunk(2)
                a[t, e] = (fused.act_fn(gate) * up).detach()
        acts.append(a.reshape(len(x), -1).numpy())
        routes.append(chosen.numpy())
    return acts, routes


def test_capture_keeps_each_experts_neurons_and_the_routers_choices(moe_lm, moe_store, small_prompts):
    store, run_id = moe_store
    means = store.prompt_activations(run_id).astype(np.float32).reshape(len(small_prompts), 2, -1)
    counts = expert_routes.route_counts(store, run_id)
    assert counts.shape == (len(small_prompts), 2, N_EXPERTS)
    assert expert_routes.layout(store, run_id) == experts.Layout(N_EXPERTS, D_EXPERT, TOP_K)
    for p in (0, 7, 20):  # in different chunks and batches
        acts, routes = _reference(moe_lm, small_prompts.prompts[p].text, SMALL)
        for layer in range(2):
            np.testing.assert_allclose(means[p, layer], np.abs(acts[layer]).mean(0), rtol=2e-2, atol=1e-4)
            expected = np.bincount(routes[layer].ravel(), minlength=N_EXPERTS)
            np.testing.assert_array_equal(counts[p, layer], expected)
            # an expert's neurons are 0 for a prompt whose tokens never went to it
            silent = means[p, layer].reshape(N_EXPERTS, D_EXPERT).max(1) == 0
            np.testing.assert_array_equal(silent, expected == 0)
    tokens = np.bincount(store.token_prompts(run_id), minlength=len(small_prompts))
    np.testing.assert_array_equal(counts.sum(axis=2), TOP_K * tokens[:, None].repeat(2, 1))


def test_usage_by_category_sums_to_top_k_per_layer(moe_store):
    store, run_id = moe_store
    usage, names = expert_routes.usage_by_category(store, run_id)
    assert names == store.require_run(run_id).categories and usage.shape == (len(names), 2, N_EXPERTS)
    np.testing.assert_allclose(usage.sum(axis=2), TOP_K)


def test_a_dense_run_has_no_routes(small_run):
    store = Store(small_run[0])
    try:
        assert expert_routes.layout(store, small_run[1]) is None
        with pytest.raises(BricklabError, match="not of a mixture-of-experts model"):
            candidates.compute_bricks(store, small_run[1], candidates.BrickParams(method="expert"))
    finally:
        store.close()


# --- bricks -----------------------------------------------------------------------------------------


def test_each_expert_is_a_brick(moe_store):
    store, run_id = moe_store
    found = candidates.compute_bricks(store, run_id, candidates.BrickParams(method="expert"))
    assert [b.brick_id for b in found] == [f"expert-L{la}-E{e}" for la in range(2) for e in range(N_EXPERTS)]
    run = store.require_run(run_id)
    brick = found[N_EXPERTS + 2]  # layer 1, expert 2
    assert brick.layers == (1,) and brick.size == D_EXPERT
    np.testing.assert_array_equal(brick.neurons, run.d_ff + 2 * D_EXPERT + np.arange(D_EXPERT))
    coact = candidates.compute_bricks(store, run_id, candidates.BrickParams(method="coact", size=32))
    assert sum(b.size for b in coact) == 2 * run.d_ff  # co-activation bricks partition MoE layers too


# --- live -------------------------------------------------------------------------------------------


def _configured_logits(lm, config, ids):
    with interventions.configured(lm, config):
        return _logits(lm, ids)


def _routed_logits(lm, factors, ids, renormalise):
    with live_experts.router_choice(lm.model, factors, renormalise):
        return _logits(lm, ids)


def test_masking_an_expert_equals_removing_it_from_the_router_without_renormalising(moe_lm, moe_store):
    store, run_id = moe_store
    run, layout, ids = store.require_run(run_id), experts.layout(moe_lm.model), _ids(moe_lm)
    found = {
        b.brick_id: b for b in candidates.compute_bricks(store, run_id, candidates.BrickParams("expert"))
    }
    plain = _logits(moe_lm, ids)
    masked = _configured_logits(moe_lm, config_from_bricks(run, {found["expert-L0-E1"]: "off"}), ids)
    factors = live_experts.router_factors(layout, 2, {(0, 1): 0.0})
    removed = _routed_logits(moe_lm, factors, ids, renormalise=False)
    renormalised = _routed_logits(moe_lm, factors, ids, renormalise=True)
    torch.testing.assert_close(masked, removed, atol=1e-5, rtol=1e-5)
    assert (masked - plain).abs().max() > 1e-3  # expert 1 of layer 0 was routed to and mattered
    assert (renormalised - removed).abs().max() > 1e-3
    assert _nothing_left(moe_lm)


def test_keep_and_scale_by_mask_equal_the_router_factors(moe_lm):
    layout, ids, info = experts.layout(moe_lm.model), _ids(moe_lm), moe_lm.info
    pairs = [(0, 1), (0, 2), (1, 0), (1, 3)]
    kept = [live_experts.expert_brick(layout, layer, e, "keep") for layer, e in pairs]
    scaled = replace(live_experts.expert_brick(layout, 0, 2, "scale", 0.5), name="half")
    config = config_from_bricks(_RunLike(info), [*kept, scaled])
    by_mask = _configured_logits(moe_lm, config, ids)
    factors = live_experts.router_factors(layout, 2, {(0, 2): 0.5}, keep=pairs)
    by_router = _routed_logits(moe_lm, factors, ids, renormalise=False)
    torch.testing.assert_close(by_mask, by_router, atol=1e-5, rtol=1e-5)
    assert _nothing_left(moe_lm)


class _RunLike:
    """The fields of a store Run that config_from_bricks reads, from a loaded model."""

    def __init__(self, info):
        self.model_id, self.fingerprint = info.model_id, info.fingerprint
        self.n_layers, self.d_ff, self.run_id = info.n_layers, info.d_ff, None


def test_renormalised_removal_keeps_each_tokens_weight():
    w = torch.tensor([[0.6, 0.0, 0.3, 0.0], [0.0, 0.5, 0.0, 0.5], [0.7, 0.0, 0.0, 0.0]])
    out = live_experts.reweigh([0.0, 1.0, 1.0, 1.0], renormalise=True)(w)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.9, 0.0], [0.0, 0.5, 0.0, 0.5], [0.0] * 4]))
    plain = live_experts.reweigh([0.0, 1.0, 1.0, 1.0], renormalise=False)(w)
    torch.testing.assert_close(plain, torch.tensor([[0.0, 0.0, 0.3, 0.0], [0.0, 0.5, 0.0, 0.5], [0.0] * 4]))


def test_nested_contexts_compose_and_other_threads_see_nothing(moe_lm):
    import threading

    layout, ids = experts.layout(moe_lm.model), _ids(moe_lm)
    plain = _logits(moe_lm, ids)
    seen = {}
    gate, go = threading.Event(), threading.Event()

    def other():
        gate.wait()
        seen["other"] = _logits(moe_lm, ids)
        go.set()

    thread = threading.Thread(target=other)
    thread.start()
    both = _routed_logits(
        moe_lm, live_experts.router_factors(layout, 2, {(0, 0): 0.0, (0, 1): 0.0}), ids, False
    )
    with (
        live_experts.router_choice(
            moe_lm.model, live_experts.router_factors(layout, 2, {(0, 0): 0.0}), False
        ),
        live_experts.router_choice(
            moe_lm.model, live_experts.router_factors(layout, 2, {(0, 1): 0.0}), False
        ),
    ):
        nested = _logits(moe_lm, ids)
        gate.set()
        assert go.wait(60)
    thread.join()
    torch.testing.assert_close(seen["other"], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nested, both, atol=1e-5, rtol=1e-5)
    assert (nested - plain).abs().max() > 1e-4
    assert _nothing_left(moe_lm)


def test_apply_compares_with_expert_bricks_and_leaves_nothing(moe_lm):
    layout = experts.layout(moe_lm.model)
    config = config_from_bricks(_RunLike(moe_lm.info), [live_experts.expert_brick(layout, 0, 0, "off")])
    result = compare.compare(moe_lm, "Hello", config, max_new_tokens=4)
    assert result.active_share == pytest.approx(1 - D_EXPERT / (2 * N_EXPERTS * D_EXPERT))
    assert _nothing_left(moe_lm)


def test_an_error_inside_leaves_nothing_installed(moe_lm):
    layout = experts.layout(moe_lm.model)
    with (
        pytest.raises(RuntimeError),
        live_experts.router_choice(moe_lm.model, live_experts.router_factors(layout, 2, {(1, 1): 0.0})),
    ):
        raise RuntimeError("boom")
    assert _nothing_left(moe_lm)
    with pytest.raises(BricklabError, match="does not exist"):
        live_experts.router_factors(layout, 2, {(0, N_EXPERTS): 0.0})


def test_sharded_capture_keeps_the_same_routes(moe_lm, moe_store, small_prompts, tmp_path):
    from core.capture import shards

    store, run_id = moe_store
    sharded = Store(tmp_path / "sharded.duckdb")
    try:
        for i in range(2):
            capture.capture(moe_lm, small_prompts, sharded, SMALL, shard=(i, 2))
        assert shards.finish(sharded, [run_id]) == []
        np.testing.assert_array_equal(
            expert_routes.route_counts(sharded, run_id), expert_routes.route_counts(store, run_id)
        )
    finally:
        sharded.close()


def test_compare_routed_generates_with_and_without_the_experts(moe_lm):
    layout = experts.layout(moe_lm.model)
    same = live_experts.compare_routed(moe_lm, "Hello", np.ones((2, N_EXPERTS)), max_new_tokens=6)
    assert same.baseline == same.routed and same.first_divergence is None
    ids = compare.prompt_ids(moe_lm, "Hello")
    factors = live_experts.router_factors(layout, 2, {(0, 0): 0.0, (1, 3): 0.0})
    with live_experts.router_choice(moe_lm.model, factors, renormalise=False):
        routed = compare.generate(moe_lm, ids, 6)
    found = live_experts.compare_routed(moe_lm, "Hello", factors, renormalise=False, max_new_tokens=6)
    assert found.routed == moe_lm.tokenizer.decode(routed, skip_special_tokens=True)
    assert found.baseline == same.baseline and _nothing_left(moe_lm)
    with pytest.raises(BricklabError, match="shape"):
        live_experts.compare_routed(moe_lm, "Hello", np.ones((3, N_EXPERTS)))
