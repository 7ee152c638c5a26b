"""Loss per prompt and the neuron masks the analysis measures it under."""

import numpy as np
import pytest
import torch

from core.live import evaluate, interventions
from core.prompts import encode

TEXTS = [
    "Write a Python function that adds two numbers.",
    "What is 7 times 8?",
    "Translate 'good morning' to French.",
]


def hand_loss(lm, text: str, chat_template: bool = True) -> float:
    e = encode(lm.tokenizer, text, 256, chat_template)
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([e.ids])).logits[0].double()
    logp = logits.log_softmax(-1)
    first = max(e.start, 1)
    targets = [logp[t - 1, e.ids[t]].item() for t in range(first, e.end)]
    return -sum(targets) / len(targets)


def test_loss_per_prompt_equals_hand_computed_cross_entropy(tiny_lm):
    got = evaluate.loss_per_prompt(tiny_lm, TEXTS[:1])
    assert got[0] == pytest.approx(hand_loss(tiny_lm, TEXTS[0]), abs=1e-4)


def test_batched_with_shared_prefix_equals_one_at_a_time(tiny_lm):
    together = evaluate.loss_per_prompt(tiny_lm, TEXTS, batch_size=2)
    alone = [evaluate.loss_per_prompt(tiny_lm, [t])[0] for t in TEXTS]
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert len(set(np.round(together, 3))) == 3  # really three different texts


def test_loss_without_chat_template(tiny_lm):
    got = evaluate.loss_per_prompt(tiny_lm, TEXTS[1:2], chat_template=False)
    assert got[0] == pytest.approx(hand_loss(tiny_lm, TEXTS[1], chat_template=False), abs=1e-4)


def test_masks_change_the_loss_and_leave_no_hooks(tiny_lm):
    base = evaluate.loss_per_prompt(tiny_lm, TEXTS)
    masked = evaluate.loss_per_prompt(tiny_lm, TEXTS, per_layer=evaluate.masked_neurons(2, 96, range(96)))
    assert not np.allclose(base, masked, atol=1e-4)
    np.testing.assert_allclose(evaluate.loss_per_prompt(tiny_lm, TEXTS, per_layer={}), base, atol=1e-6)
    assert interventions.hook_count(tiny_lm.model) == 0


def test_masked_neurons_zero_exactly_the_given_ids():
    fns = evaluate.masked_neurons(2, 96, [0, 5, 96 + 7])
    a = torch.randn(2, 3, 96) + 5  # no accidental zeros
    assert sorted(fns) == [0, 1]
    zero0 = (fns[0](a) == 0).nonzero()[:, -1].unique().tolist()
    zero1 = (fns[1](a) == 0).nonzero()[:, -1].unique().tolist()
    assert zero0 == [0, 5] and zero1 == [7]
    assert torch.equal(fns[0](a)[..., 1:5], a[..., 1:5])


def test_masked_neurons_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="neuron ids"):
        evaluate.masked_neurons(2, 96, [192])


def test_kept_neurons_zero_everything_else():
    fns = evaluate.kept_neurons(2, 96, [3, 96 + 10, 96 + 11])
    a = torch.randn(4, 96) + 5
    assert (fns[0](a) != 0).nonzero()[:, -1].unique().tolist() == [3]
    assert (fns[1](a) != 0).nonzero()[:, -1].unique().tolist() == [10, 11]


@pytest.mark.parametrize("indicator", ["abs", "output"])
@pytest.mark.parametrize("k", [0.0, 0.3, 0.9])
def test_lowest_k_mask_keeps_exactly_the_top_per_token(indicator, k):
    norms = [torch.rand(96) + 0.1, torch.rand(96) + 0.1]
    fn = evaluate.lowest_k_mask(k, indicator, norms)[1]
    a = torch.randn(3, 5, 96)
    out = fn(a)
    keep = 96 - int(np.floor(k * 96))
    score = a.abs() * (norms[1] if indicator == "output" else 1)
    kept = out != 0
    assert (kept.sum(-1) == keep).all()
    assert torch.equal(out[kept], a[kept])  # survivors are untouched
    lowest_kept = torch.where(kept, score, torch.inf).amin(-1)
    highest_dropped = torch.where(kept, -torch.inf, score).amax(-1)
    assert (lowest_kept >= highest_dropped).all()


def test_lowest_k_mask_validates():
    with pytest.raises(ValueError):
        evaluate.lowest_k_mask(1.0, "abs", [torch.ones(4)])
    with pytest.raises(ValueError):
        evaluate.lowest_k_mask(0.5, "gate", [torch.ones(4)])


MIXED = [
    "Hi.",
    "Name a colour.",
    "def add(a, b):\n    return a + b",
    "Translate 'the cat sleeps on the warm windowsill all afternoon' into French, please.",
    "What is 12 squared?",
    "Write two sentences about a lighthouse keeper who collects shells and letters from the sea.",
    "Ok",
]


@pytest.mark.parametrize("masked", [False, True])
def test_one_padded_pass_equals_one_prompt_at_a_time(tiny_lm, masked, monkeypatch):
    per_layer = evaluate.masked_neurons(2, 96, range(0, 192, 3)) if masked else None
    alone = evaluate.loss_per_prompt(tiny_lm, MIXED, 1, per_layer)
    tight = evaluate.loss_per_prompt(tiny_lm, MIXED, 64, per_layer)  # a few passes, little padding
    monkeypatch.setitem(evaluate.PASS_COST, "cpu", 10**6)  # every text in one padded pass
    together = evaluate.loss_per_prompt(tiny_lm, MIXED, 64, per_layer)
    np.testing.assert_allclose(together, alone, atol=1e-4)
    np.testing.assert_allclose(tight, alone, atol=1e-4)
    if not masked:  # and both equal a plain full-sequence forward without any cache or padding
        np.testing.assert_allclose(together, [hand_loss(tiny_lm, t) for t in MIXED], atol=1e-4)
    assert interventions.hook_count(tiny_lm.model) == 0


def test_passes_cover_every_text_once_sorted_and_capped():
    widths = [5] * 50 + [60, 64]
    groups = evaluate.passes(widths, 64)
    assert sorted(i for g in groups for i in g) == list(range(52))
    assert len(groups) == 2 and sorted(groups[1]) == [50, 51]  # the two long ones run apart
    assert all(len(g) <= 16 for g in evaluate.passes(widths, 16))
    assert len(evaluate.passes([7] * 56, 64)) == 1 and evaluate.passes([], 8) == []
    mixed = list(range(10, 66))  # 56 widths: a wide pass costs padding, a narrow one its fixed cost
    assert len(evaluate.passes(mixed, 64, pass_cost=10**6)) == 1
    assert len(evaluate.passes(mixed, 64, pass_cost=64)) > 2


def test_static_masks_run_sparsely_and_equal_the_dense_masks(tiny_lm, monkeypatch):
    from core.live import sparse

    calls = []
    real = sparse.KeepOnly.__call__
    monkeypatch.setattr(sparse.KeepOnly, "__call__", lambda self, f, x: calls.append(1) or real(self, f, x))
    kept = evaluate.kept_neurons(2, 96, list(range(0, 96, 7)) + list(range(96, 192, 5)))  # ~17% kept
    zeroed = evaluate.masked_neurons(2, 96, range(0, 192, 3))  # 67% kept: sparse too
    for per_layer in (kept, zeroed):
        calls.clear()
        quick = evaluate.loss_per_prompt(tiny_lm, MIXED, 64, per_layer)
        assert calls  # the sparse path ran
        monkeypatch.setattr(evaluate, "SPARSE_SHARE", -1.0)  # every mask through the dense transforms
        calls.clear()
        dense = evaluate.loss_per_prompt(tiny_lm, MIXED, 64, per_layer)
        assert not calls
        monkeypatch.setattr(evaluate, "SPARSE_SHARE", 0.8)
        np.testing.assert_allclose(quick, dense, atol=1e-4)
        assert not np.allclose(quick, evaluate.loss_per_prompt(tiny_lm, MIXED, 64), atol=1e-3)
    assert interventions.hook_count(tiny_lm.model) == 0 and sparse.patched_count(tiny_lm.model) == 0


def test_a_mask_keeping_most_neurons_stays_dense():
    assert evaluate.masked_neurons(2, 96, [5])[0].share == pytest.approx(95 / 96)
    assert evaluate.masked_neurons(2, 96, [5])[0].share > evaluate.SPARSE_SHARE


def test_counts_add_up_the_tokens_run(tiny_lm):
    counts = {}
    evaluate.loss_per_prompt(tiny_lm, MIXED, 64, counts=counts)
    evaluate.loss_per_prompt(tiny_lm, MIXED[:2], 64, counts=counts)
    encoded = [encode(tiny_lm.tokenizer, t, 256) for t in MIXED]
    shared = evaluate._shared_prefix(encoded)
    own = sum(e.end - max(e.start, 1) for e in encoded)
    assert counts["evaluations"] == 2 and counts["texts"] == 9
    assert counts["targets"] == own + sum(e.end - max(e.start, 1) for e in encoded[:2])
    # the last own token is only a target: each text runs its tokens after the prefix but that one
    assert counts["tokens"] == sum(e.end - 1 - shared for e in encoded + encoded[:2])
    assert counts["padded_tokens"] >= counts["tokens"] and counts["passes"] >= 2


@pytest.mark.parametrize("gated", [True, False])
def test_masks_sharing_passes_equal_one_call_per_mask(tiny_lm, gated, monkeypatch):
    """Each row of a shared pass runs its own mask: as a whole FFN per row on a gated MLP (sparsely for
    the keep-only mask), as activation transforms per row otherwise."""
    from core.live import sparse

    if not gated:
        monkeypatch.setattr(sparse, "supported", lambda model: False)
    calls = []
    real = sparse.KeepOnly.__call__
    monkeypatch.setattr(sparse.KeepOnly, "__call__", lambda self, f, x: calls.append(1) or real(self, f, x))
    norms = [torch.rand(96) + 0.5 for _ in range(2)]
    masks = [
        None,
        evaluate.masked_neurons(2, 96, range(0, 96, 2)),  # one layer only: the other's rows pass unchanged
        evaluate.kept_neurons(2, 96, range(0, 192, 5)),  # 20% kept: sparse on its rows of a gated MLP
        evaluate.lowest_k_mask(0.5, "abs", norms),
        evaluate.lowest_k_mask(0.8, "output", norms),
    ]
    counts, steps = {}, []
    together = evaluate.losses_under(
        tiny_lm, MIXED, masks, 8, counts=counts, on_pass=lambda d, t: steps.append((d, t))
    )  # rows of several masks in one pass: each row under its own mask
    assert bool(calls) == gated
    apart: dict = {}
    alone = np.array([evaluate.loss_per_prompt(tiny_lm, MIXED, 8, m, counts=apart) for m in masks])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert len({tuple(np.round(row, 3)) for row in alone}) == len(masks)  # five different models
    assert counts["evaluations"] == 5 and counts["texts"] == 5 * len(MIXED)
    assert steps[-1][0] == steps[-1][1] == counts["passes"] and len(steps) == counts["passes"]
    # equal widths of different masks share a pass: fewer passes, less padding than a call per mask
    cost = lambda c: c["padded_tokens"] + evaluate.PASS_COST["cpu"] * c["passes"]  # noqa: E731 - what passes minimise
    assert counts["tokens"] == apart["tokens"] and cost(counts) < cost(apart)
    assert interventions.hook_count(tiny_lm.model) == 0 and sparse.patched_count(tiny_lm.model) == 0
    assert evaluate.losses_under(tiny_lm, MIXED, []).shape == (0, len(MIXED))


def test_rows_apply_each_rows_transform():
    double, negate = (lambda a: 2 * a), (lambda a: -a)
    rows = evaluate.Rows([double, None, negate])
    a = torch.randn(4, 3, 5)
    rows.select([0, 1, 2, 0])
    got = rows(a)
    assert (
        torch.equal(got[[0, 3]], 2 * a[[0, 3]]) and torch.equal(got[1], a[1]) and torch.equal(got[2], -a[2])
    )
    rows.select([2, 2, 2, 2])
    assert torch.equal(rows(a), -a)
    rows.select([1, 1])
    assert rows(a[:2]) is not None and torch.equal(rows(a[:2]), a[:2])


def test_sparse_rows_keep_their_gathered_weights_within_the_budget():
    """Masks sharing passes run sparsely the smallest first, while their kept shares add up to at most
    the copies of a layer's weights allowed (SPARSE_BUDGET); the rest, and masks keeping most neurons,
    run dense."""
    kept = lambda n: evaluate.kept_neurons(1, 100, range(n))[0]  # noqa: E731 - keeps n of 100 neurons
    rows = evaluate.FfnRows([kept(50), kept(10), kept(45), kept(30), kept(90), None])
    assert evaluate.SPARSE_BUDGET == 1.0
    assert [k is not None for k in rows.keep] == [False, True, True, True, False, False]  # 10 + 30 + 45
    assert rows.dense.fns[0] is not None and rows.dense.fns[1] is None and rows.dense.fns[5] is None
    assert all(k is not None for k in evaluate.FfnRows([kept(50), kept(60)], copies=1.2).keep)
