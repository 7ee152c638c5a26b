"""Side-by-side generation: identical to plain Hugging Face without bricks, divergence and KL with them."""

import pytest
import torch

from core.configuration import Brick, BrickConfig
from core.errors import BricklabError
from core.live import compare
from core.live.interventions import configured, hook_count
from core.live.plan import active_share
from core.prompts import encode

PROMPT = "Explain why the sky is blue."


def make(lm, *bricks: Brick) -> BrickConfig:
    info = lm.info
    return BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, bricks)


def test_empty_configuration_matches_plain_generate(tiny_lm):
    result = compare.compare(tiny_lm, PROMPT, make(tiny_lm), max_new_tokens=8)
    ids = torch.tensor([list(result.prompt_ids)])
    plain = tiny_lm.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
    )
    assert list(result.baseline_tokens) == plain[0, ids.shape[1] :].tolist()
    assert result.configured_tokens == result.baseline_tokens
    assert result.first_divergence is None
    assert result.kl == (0.0,) * len(result.baseline_tokens) and len(result.kl) == 8
    assert result.active_share == 1.0 and result.baseline_text == result.configured_text


def test_prompt_is_wrapped_in_the_chat_template_like_capture(tiny_lm):
    result = compare.compare(tiny_lm, PROMPT, make(tiny_lm), max_new_tokens=1)
    assert list(result.prompt_ids) == encode(tiny_lm.tokenizer, PROMPT, 10**6).ids
    assert "<|im_start|>assistant" in tiny_lm.tokenizer.decode(list(result.prompt_ids))
    raw = compare.compare(tiny_lm, PROMPT, make(tiny_lm), max_new_tokens=1, chat_template=False)
    assert "<|im_start|>" not in tiny_lm.tokenizer.decode(list(raw.prompt_ids))


def test_bricks_off_move_the_distribution(tiny_lm):
    config = make(tiny_lm, Brick("x", {0: list(range(80)), 1: list(range(80))}, "off"))
    result = compare.compare(tiny_lm, PROMPT, config, max_new_tokens=6)
    assert len(result.kl) == len(result.baseline_tokens) == 6
    assert min(result.kl) > 0 and result.mean_kl > 0
    assert result.active_share == pytest.approx(active_share(config)) == pytest.approx(1 - 160 / 192)
    assert len(result.baseline_pieces) == len(result.configured_pieces) == 6
    assert result.to_dict()["mean_kl"] == result.mean_kl
    assert hook_count(tiny_lm.model) == 0


def _reference_kl(lm, result, config) -> list[float]:
    """The obvious way: both models read prompt + baseline text in one full pass each."""
    ids = list(result.prompt_ids) + list(result.baseline_tokens)
    with torch.no_grad():
        base = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0], -1)
    with configured(lm, config), torch.no_grad():
        conf = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0], -1)
    rows = slice(len(result.prompt_ids) - 1, len(ids) - 1)  # the positions predicting each new token
    return (base[rows].exp() * (base[rows] - conf[rows])).sum(-1).clamp_min(0).tolist()


@pytest.mark.parametrize(
    "brick",
    [
        Brick("x", {1: list(range(50))}, "scale", 0.2),  # diverges late or not at all
        Brick("x", {0: list(range(96)), 1: list(range(96))}, "off"),  # diverges early
        Brick("x", {0: list(range(96)), 1: list(range(96))}, "scale", 3.0),
    ],
)
def test_kl_is_teacher_forced_on_the_baseline(tiny_lm, brick):
    config = make(tiny_lm, brick)
    result = compare.compare(tiny_lm, PROMPT, config, max_new_tokens=10)
    assert result.kl == pytest.approx(_reference_kl(tiny_lm, result, config), rel=1e-3, abs=1e-5)


def test_kl_after_divergence_reads_the_baseline_text(tiny_lm):
    """After the texts part, the configured model's own steps read other text: KL must not use them."""
    for factor in (0.0, 3.0, 8.0, 0.5):
        config = make(tiny_lm, Brick("x", {0: list(range(96)), 1: list(range(96))}, "scale", factor))
        result = compare.compare(tiny_lm, PROMPT, config, max_new_tokens=10)
        if result.first_divergence is not None and result.first_divergence < 8:
            break
    else:
        pytest.fail("no configuration diverged early; the test needs one")
    assert result.kl == pytest.approx(_reference_kl(tiny_lm, result, config), rel=1e-3, abs=1e-5)
    assert hook_count(tiny_lm.model) == 0
    ids = compare.prompt_ids(tiny_lm, PROMPT)  # the tail reused the generation's cache, not a full pass
    assert compare.generate_scored(tiny_lm, ids, 3, keep_cache=True).cache is not None


def test_a_known_baseline_is_reused_not_regenerated(tiny_lm, monkeypatch):
    config = make(tiny_lm, Brick("x", {0: list(range(60))}, "off"))
    plain = compare.generate_scored(tiny_lm, compare.prompt_ids(tiny_lm, PROMPT), 5)
    fresh = compare.compare(tiny_lm, PROMPT, config, max_new_tokens=5)
    calls = []
    real = compare.generate_scored
    monkeypatch.setattr(compare, "generate_scored", lambda *a, **k: calls.append(a) or real(*a, **k))
    reused = compare.compare(tiny_lm, PROMPT, config, max_new_tokens=5, baseline=plain)
    assert reused == fresh and len(calls) == 1  # only the configured generation ran
    tokens_only = compare.compare(tiny_lm, PROMPT, config, max_new_tokens=5, baseline=plain.tokens)
    assert tokens_only.kl == pytest.approx(fresh.kl, rel=1e-3, abs=1e-5) and len(calls) == 2


def test_scored_generation_keeps_one_distribution_per_token(tiny_lm):
    ids = compare.prompt_ids(tiny_lm, PROMPT)
    scored = compare.generate_scored(tiny_lm, ids, 6)
    assert list(scored.tokens) == compare.generate(tiny_lm, ids, 6)
    assert scored.logprobs.shape == (6, tiny_lm.model.config.vocab_size)
    assert scored.logprobs.argmax(-1).tolist() == list(scored.tokens)  # greedy picked each argmax
    assert torch.allclose(torch.from_numpy(scored.logprobs).exp().sum(-1), torch.ones(6), atol=1e-4)


def test_first_divergence():
    assert compare.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert compare.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert compare.first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.mark.parametrize("n", [0, -1, compare.MAX_NEW_TOKENS + 1, 2.5, True])
def test_max_new_tokens_is_capped(tiny_lm, n):
    with pytest.raises(BricklabError, match="max_new_tokens"):
        compare.compare(tiny_lm, PROMPT, make(tiny_lm), max_new_tokens=n)


def test_empty_prompt_is_refused(tiny_lm):
    with pytest.raises(BricklabError, match="empty"):
        compare.compare(tiny_lm, "   ", make(tiny_lm))


def test_too_long_prompt_is_refused(tiny_lm):
    with pytest.raises(BricklabError, match="longer than"):
        compare.compare(tiny_lm, "word " * (compare.MAX_PROMPT_TOKENS + 10), make(tiny_lm))


def test_display_pieces_keep_characters_whole_and_hide_special_tokens(tiny_lm):
    tokenizer = tiny_lm.tokenizer
    ids = tokenizer.encode("巴黎是法国的首都。") + tokenizer.convert_tokens_to_ids(["<|im_end|>"])
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)  # one at a time: broken
    pieces = compare.display_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == "巴黎是法国的首都。" and pieces[-1] == ""
