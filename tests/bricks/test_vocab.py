"""Vocabulary projection: what a neuron's output promotes, through the final norm and the unembedding."""

import numpy as np
import pytest
import torch

from core import models
from core.bricks import vocab
from core.errors import BricklabError
from core.live import interventions


def _tiny_gpt2() -> models.LoadedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).eval()
    return models.LoadedModel(model, None, models.describe(model, "tiny-gpt2"))


def _pushed_logits(lm: models.LoadedModel, layer: int, neuron: int, push: float) -> torch.Tensor:
    """The last position's logits when one neuron's activation is raised by `push` everywhere."""

    def fn(a):
        a = a.clone()
        a[..., neuron] += push
        return a

    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode(), interventions.transforms(lm.model, {layer: fn}):
        return lm.model(input_ids=ids).logits[0, -1].float()


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_a_hugely_raised_neuron_makes_its_first_promoted_token_the_model_s_choice(which, tiny_lm):
    """The final norm divides by the residual's size, so with one neuron dominating the last layer's
    output the logits follow W_U (g * w): the projection, centred for GPT-2's LayerNorm."""
    lm = tiny_lm if which == "llama" else _tiny_gpt2()
    last = lm.info.n_layers - 1
    for neuron in (0, 5, 17):
        got = vocab.projection(lm).promoted[last * lm.info.d_ff + neuron]
        logits = _pushed_logits(lm, last, neuron, 1e4)
        assert int(torch.argmax(logits)) == int(got[0])
        assert set(torch.topk(logits, 5).indices.tolist()) == set(got[:5].tolist())


def test_projection_matches_a_brute_force_readout_and_is_cached(tiny_lm, store, monkeypatch):
    p = vocab.projection(tiny_lm, store)
    n = tiny_lm.info.n_neurons
    assert p.promoted.shape == (n, vocab.TOP) and p.suppressed_logit.dtype == np.float16
    w_u = tiny_lm.model.lm_head.weight.detach().float()
    g = tiny_lm.model.model.norm.weight.detach().float()
    column = models.down_weight(tiny_lm.model, 1).detach().float()[:, 7]
    want = (w_u @ (g * column)).numpy()
    gid = tiny_lm.info.d_ff + 7
    assert p.promoted[gid].tolist() == np.argsort(-want)[: vocab.TOP].tolist()
    assert p.suppressed[gid].tolist() == np.argsort(want)[: vocab.TOP].tolist()
    assert np.all(np.diff(p.promoted_logit[gid].astype(np.float32)) <= 0)
    monkeypatch.setattr(vocab, "_directions", lambda *a: pytest.fail("recomputed"))
    again = vocab.projection(tiny_lm, store)
    assert np.array_equal(again.promoted, p.promoted) and not again.promoted.flags.writeable
    cached = vocab.neuron_tokens(tiny_lm, gid, 4, store)  # from the cache: no _directions call
    monkeypatch.undo()
    direct = vocab.neuron_tokens(tiny_lm, gid, 4)
    assert [t for t, _ in cached["promoted"]] == [t for t, _ in direct["promoted"]]
    assert cached["suppressed"][0][1] == pytest.approx(direct["suppressed"][0][1], abs=1e-2)


def test_promoting_neurons_ranks_every_neuron_by_the_token_s_row(tiny_lm):
    token, rows = vocab.promoting_neurons(tiny_lm, "Paris", limit=5)
    assert token == " Paris"
    token_id = tiny_lm.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    w_u = tiny_lm.model.lm_head.weight.detach().float()[token_id] * tiny_lm.model.model.norm.weight.float()
    all_ = torch.cat([w_u @ models.down_weight(tiny_lm.model, i).float() for i in range(2)])
    best = int(torch.argmax(all_))
    assert (rows[0]["layer"], rows[0]["neuron"]) == divmod(best, tiny_lm.info.d_ff)
    assert [r["logit per unit a"] for r in rows] == sorted(
        (r["logit per unit a"] for r in rows), reverse=True
    )
    with pytest.raises(BricklabError, match="empty"):
        vocab.promoting_neurons(tiny_lm, "  ")


def test_group_tokens_weigh_columns_by_sign(tiny_lm):
    gid = 5
    one = vocab.neuron_tokens(tiny_lm, gid, 3)
    same = vocab.group_tokens(tiny_lm, np.array([gid]), np.array([2.0]), 3)
    flipped = vocab.group_tokens(tiny_lm, np.array([gid]), np.array([-1.0]), 3)
    assert [t for t, _ in same["promoted"]] == [t for t, _ in one["promoted"]]
    assert [t for t, _ in flipped["promoted"]] == [t for t, _ in one["suppressed"]]
    assert vocab.group_tokens(tiny_lm, np.zeros(0, np.int64)) == {"promoted": [], "suppressed": []}


def test_an_unknown_readout_is_a_clear_error(tiny_lm, monkeypatch):
    monkeypatch.delitem(vocab.FINAL_NORMS, "llama")
    with pytest.raises(BricklabError, match="logits"):
        vocab.projection(tiny_lm)
