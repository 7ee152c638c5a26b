"""Sparse FFN execution: equal to the masked dense computation, composing with interventions,
context-local across threads, and leaving the model's own forward in place afterwards."""

import threading

import numpy as np
import pytest
import torch

from core import models
from core.configuration import Brick, BrickConfig
from core.errors import BricklabError
from core.live import compare, evaluate, interventions, sparse
from core.live.plan import compile_plan
from core.routing import topk
from tests.conftest import save_tiny

IDS = torch.tensor([[1, 502, 3312, 7, 981, 44, 12000, 5, 77, 3001]])  # (1, 10) arbitrary tokens


def logits(lm, ids=IDS):
    with torch.inference_mode():
        return lm.model(ids).logits


def keep_mask(lm, share: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((lm.info.n_layers, lm.info.d_ff)) < share


def close(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_keep_only_equals_masked_dense(tiny_lm):
    keep = keep_mask(tiny_lm, 0.3)
    with interventions.transforms(tiny_lm.model, evaluate.kept_neurons(*keep.shape, np.flatnonzero(keep))):
        want = logits(tiny_lm)
    with sparse.sparse(tiny_lm.model, {layer: sparse.KeepOnly(row) for layer, row in enumerate(keep)}):
        got = logits(tiny_lm)
    assert close(got, want)
    assert not close(got, logits(tiny_lm))  # the mask matters: not the dense output
    assert sparse.patched_count(tiny_lm.model) == 0 and interventions.hook_count(tiny_lm.model) == 0


def test_compiled_plan_runs_sparse_like_apply_plan(tiny_lm):
    info = tiny_lm.info
    bricks = (
        Brick("k", {0: range(0, 60), 1: range(30, 90)}, "keep"),
        Brick("s", {0: range(10, 20)}, "scale", factor=1.7),
        Brick("m", {1: range(40, 50)}, "mean"),
        Brick("o", {1: [31, 32]}, "off"),
    )
    config = BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, bricks)
    means = np.random.default_rng(1).random(config.shape).astype(np.float32)
    plan = compile_plan(config, means)
    with interventions.apply_plan(tiny_lm.model, plan):
        want = logits(tiny_lm)
    with sparse.sparse(tiny_lm.model, sparse.from_plan(plan)):
        got = logits(tiny_lm)
    assert close(got, want)


@pytest.mark.parametrize("scaled", [False, True])
def test_keep_only_one_token_kernel_equals_its_torch_path(tiny_lm, scaled):
    """A generated token runs through the packed numba kernel; two tokens at once run through torch."""
    f = sparse.ffn(tiny_lm.model, 1)
    rng = np.random.default_rng(6)
    keep = rng.random(96) < 0.4
    scale = np.where(keep, rng.uniform(0.5, 2.0, 96), 0.0) if scaled else None
    add = np.where(keep, 0.0, rng.normal(size=96)) if scaled else None
    fn = sparse.KeepOnly(keep, scale, add)
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(1, 1, tiny_lm.info.d_model, generator=torch.Generator().manual_seed(seed))
            twice = fn(f, torch.cat([x, x], dim=1))[:, :1]  # the torch path
            assert sparse.one_token(f, x) and not sparse.one_token(f, torch.cat([x, x], dim=1))
            assert close(fn(f, x), twice)
            factor = torch.from_numpy(keep if scale is None else scale).float()
            want = layer_reference(f, x, factor)
            if add is not None:
                want = want + torch.from_numpy(add).float() @ f.down.weight.T
            assert close(twice, want)


def layer_reference(f: sparse.Ffn, x, keep_neurons):
    """The masked dense FFN written out with the model's own modules."""
    mlp = sparse._mlp(f.model, f.layer)
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * keep_neurons)


def brick_mask(brick_of, chosen):
    return chosen[..., torch.from_numpy(brick_of)]


def linear_router(d_model: int, n_bricks: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(d_model, 4)), rng.normal(size=(4, n_bricks)), rng.normal(size=n_bricks)


@pytest.mark.parametrize("dense_above", [0.0, 1.0])  # the masked-dense path and the gathered path
def test_learned_top_bricks_equal_masked_dense(tiny_lm, dense_above):
    f = sparse.ffn(tiny_lm.model, 1)
    x = torch.randn(2, 5, tiny_lm.info.d_model)
    brick_of = np.random.default_rng(0).permutation(np.arange(96) % 12)  # 12 bricks of 8
    fn = topk.TopBricks(brick_of, 3, linear_router(tiny_lm.info.d_model, 12), dense_above=dense_above)
    with torch.inference_mode():
        want = layer_reference(f, x, brick_mask(brick_of, fn.top(fn.score(x), 3)))
        assert close(fn(f, x), want)


def test_oracle_and_verified_proposals_keep_the_true_top_mass(tiny_lm):
    f = sparse.ffn(tiny_lm.model, 0)
    x = torch.randn(1, 6, tiny_lm.info.d_model)
    brick_of = np.arange(96) // 8
    with torch.inference_mode():
        mass = torch.zeros(1, 6, 12).index_add_(-1, torch.from_numpy(brick_of), f.activations(x).abs())
        best = topk.TopBricks.top(mass, 4)
        assert close(topk.TopBricks(brick_of, 4)(f, x), layer_reference(f, x, brick_mask(brick_of, best)))
        # a router that proposes all bricks, verified by their true mass, is the oracle
        verified = topk.TopBricks(brick_of, 4, linear_router(tiny_lm.info.d_model, 12), proposed=12)
        assert close(verified(f, x), layer_reference(f, x, brick_mask(brick_of, best)))


def test_gate_proposals_keep_the_top_gate_mass_then_the_top_true_mass(tiny_lm):
    f = sparse.ffn(tiny_lm.model, 1)
    x = torch.randn(2, 5, tiny_lm.info.d_model)
    brick_of = np.random.default_rng(4).permutation(np.arange(96) // 8)  # 12 bricks of 8
    by = torch.from_numpy(brick_of)
    with torch.inference_mode():
        gate_mass = torch.zeros(2, 5, 12).index_add_(-1, by, f.act(x @ f.gate.T).abs())
        proposed = topk.TopBricks.top(gate_mass, 3)
        fn = topk.TopBricks(brick_of, 3, gate=True, dense_above=0.0)
        assert close(fn(f, x), layer_reference(f, x, brick_mask(brick_of, proposed)))
        true_mass = torch.zeros(2, 5, 12).index_add_(-1, by, f.activations(x).abs())
        verified = topk.TopBricks.top(true_mass.masked_fill(~topk.TopBricks.top(gate_mass, 6), -1.0), 3)
        fn = topk.TopBricks(brick_of, 3, proposed=6, gate=True)
        assert close(fn(f, x), layer_reference(f, x, brick_mask(brick_of, verified)))
        assert not torch.equal(verified, topk.TopBricks.top(true_mass, 3))  # not simply the oracle


@pytest.mark.parametrize("size", [1, 8])
@pytest.mark.parametrize(
    ("proposer", "proposed"),
    [("oracle", None), ("learned", None), ("learned", 2), ("gate", None), ("gate", 2), ("gate", 3)],
)
def test_one_token_kernel_equals_its_torch_twin(tiny_lm, size, proposer, proposed):
    """Generation runs one token at a time through the numba kernel; prompts through torch."""
    f = sparse.ffn(tiny_lm.model, 1)
    n_bricks = 96 // size
    brick_of = np.random.default_rng(1).permutation(np.arange(96) // size)
    k = n_bricks // 4
    router = linear_router(tiny_lm.info.d_model, n_bricks, seed=2) if proposer == "learned" else None
    fn = topk.TopBricks(
        brick_of, k, router, None if proposed is None else proposed * k, gate=proposer == "gate"
    )
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(1, 1, tiny_lm.info.d_model, generator=torch.Generator().manual_seed(seed))
            assert close(fn(f, x), fn.dense_or_union(f, x))
            assert not close(fn(f, x), f.down(f.activations(x)))


def test_intervention_in_the_same_context_sees_the_sparse_activation(tiny_lm):
    keep = keep_mask(tiny_lm, 0.5, seed=3)
    doubled = {layer: lambda a: 2 * a for layer in range(tiny_lm.info.n_layers)}
    masks = evaluate.kept_neurons(*keep.shape, np.flatnonzero(keep))
    with interventions.transforms(tiny_lm.model, masks), interventions.transforms(tiny_lm.model, doubled):
        want = logits(tiny_lm)
    keep_only = {layer: sparse.KeepOnly(row) for layer, row in enumerate(keep)}
    with sparse.sparse(tiny_lm.model, keep_only), interventions.transforms(tiny_lm.model, doubled):
        got = logits(tiny_lm)
    assert close(got, want)


def test_generation_under_keep_only_equals_masked_generation(tiny_lm):
    keep = keep_mask(tiny_lm, 0.4, seed=5)
    ids = compare.prompt_ids(tiny_lm, "Count to five.")
    with interventions.transforms(tiny_lm.model, evaluate.kept_neurons(*keep.shape, np.flatnonzero(keep))):
        want = compare.generate(tiny_lm, ids, 12)
    with sparse.sparse(tiny_lm.model, {layer: sparse.KeepOnly(row) for layer, row in enumerate(keep)}):
        got = compare.generate(tiny_lm, ids, 12)
    assert got == want


def test_other_threads_see_the_dense_model_and_everything_is_restored(tiny_lm):
    dense = logits(tiny_lm)
    keep = keep_mask(tiny_lm, 0.2)
    inside, outside = threading.Event(), {}

    def other():
        inside.wait(10)
        outside["logits"] = logits(tiny_lm)

    thread = threading.Thread(target=other)
    thread.start()
    with (
        pytest.raises(RuntimeError, match="boom"),
        sparse.sparse(tiny_lm.model, {0: sparse.KeepOnly(keep[0])}),
    ):
        assert sparse.patched_count(tiny_lm.model) == tiny_lm.info.n_layers
        inside.set()
        thread.join(10)
        raise RuntimeError("boom")
    assert torch.equal(outside["logits"], dense)
    assert sparse.patched_count(tiny_lm.model) == 0
    assert torch.equal(logits(tiny_lm), dense)


@pytest.mark.parametrize("overrides", [{"mlp_bias": True}, {"hidden_act": "gelu_pytorch_tanh"}])
def test_llama_variants(tmp_path, default_dir, overrides):
    lm = models.load_model(save_tiny(tmp_path / "m", default_dir, **overrides), device="cpu")
    keep = keep_mask(lm, 0.3, seed=2)
    with interventions.transforms(lm.model, evaluate.kept_neurons(*keep.shape, np.flatnonzero(keep))):
        want = logits(lm)
    with sparse.sparse(lm.model, {layer: sparse.KeepOnly(row) for layer, row in enumerate(keep)}):
        got = logits(lm)
    assert close(got, want)


def test_fused_gate_up(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    model = Phi3ForCausalLM(config).eval()
    keep = np.random.default_rng(4).random((2, 48)) < 0.4
    ids = IDS % 300
    with torch.inference_mode():
        with interventions.transforms(model, evaluate.kept_neurons(2, 48, np.flatnonzero(keep))):
            want = model(ids).logits
        with sparse.sparse(model, {layer: sparse.KeepOnly(row) for layer, row in enumerate(keep)}):
            got = model(ids).logits
    assert close(got, want)


def test_plain_mlp_is_refused_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).eval()
    assert not sparse.supported(model)
    with (
        pytest.raises(BricklabError, match="gated MLP"),
        sparse.sparse(model, {0: sparse.KeepOnly(np.ones(64, bool))}),
    ):
        pass
    assert sparse.patched_count(model) == 0


def test_default_model_keep_only_equals_masked_dense(default_lm):
    keep = keep_mask(default_lm, 0.35)
    with interventions.transforms(default_lm.model, evaluate.kept_neurons(*keep.shape, np.flatnonzero(keep))):
        want = logits(default_lm)
    with sparse.sparse(default_lm.model, {layer: sparse.KeepOnly(row) for layer, row in enumerate(keep)}):
        got = logits(default_lm)
    assert close(got, want)


def test_a_forward_set_by_someone_else_is_used_and_restored(tiny_lm):
    """accelerate, for one, wraps a module's forward as an instance attribute."""
    mlp, calls = sparse._mlp(tiny_lm.model, 0), []
    original = mlp.forward

    def wrapper(x):
        calls.append(x.shape)
        return original(x)

    mlp.forward = wrapper
    try:
        with sparse.sparse(tiny_lm.model, {1: sparse.KeepOnly(keep_mask(tiny_lm, 0.5)[1])}):
            logits(tiny_lm)  # layer 0 has no sparse function here: its own forward runs
        assert calls and vars(mlp)["forward"] is wrapper
        assert sparse.patched_count(tiny_lm.model) == 0
    finally:
        del mlp.forward


def test_threshold_equals_masked_dense_and_zero_thresholds_are_dense(tiny_lm):
    dense = logits(tiny_lm)
    with sparse.sparse(tiny_lm.model, {layer: sparse.Threshold(0.0) for layer in range(2)}):
        assert close(logits(tiny_lm), dense)
    tau = 0.3

    def below(a):  # the same neurons masked by an intervention on the dense model
        return a.masked_fill(a.abs() < tau * a.abs().amax(dim=-1, keepdim=True), 0.0)

    with interventions.transforms(tiny_lm.model, {0: below, 1: below}):
        want = logits(tiny_lm)
    with sparse.sparse(tiny_lm.model, {layer: sparse.Threshold(tau) for layer in range(2)}):
        got = logits(tiny_lm)
    assert close(got, want) and not close(got, logits(tiny_lm))


@torch.no_grad()
def test_threshold_on_the_input_skips_small_inputs(tiny_lm):
    f = sparse.ffn(tiny_lm.model, 1)
    x = torch.randn(3, tiny_lm.info.d_model)
    t_x = float(x.abs().median())
    xm = torch.where(x.abs() >= t_x, x, 0.0)
    want = f.down(f.activations(xm))
    assert close(sparse.Threshold(0.0, t_x)(f, x), want)
    assert not close(sparse.Threshold(0.0, t_x)(f, x), f.down(f.activations(x)))
    assert not sparse.gpu_token(f, x[:1])  # the CPU: the torch path
    with pytest.raises(ValueError):
        sparse.Threshold(1.5)
