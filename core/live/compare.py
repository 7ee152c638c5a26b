"""Greedy generation with and without a brick configuration, side by side: both texts, where they
part, and how far the configured model's next-token distribution moves from the baseline's."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from core.configuration import BrickConfig
from core.errors import BricklabError
from core.live import interventions
from core.live.plan import active_share
from core.models import LoadedModel
from core.prompts import encode

MAX_NEW_TOKENS = 256  # a side-by-side view, not a long-form generator
MAX_PROMPT_TOKENS = 1024  # chat template included


@dataclass(frozen=True, eq=False)
class Generation:
    """A greedy continuation and the model's log-probabilities at each of its steps."""

    tokens: tuple[int, ...]  # generated ids only
    logprobs: np.ndarray  # (len(tokens), vocab) float32: log-softmax of the logits that chose each token
    cache: DynamicCache | None = None  # keys/values of prompt + tokens[:-1], when asked for (keep_cache)


@dataclass(frozen=True)
class Comparison:
    prompt: str
    prompt_ids: tuple[int, ...]  # what the model saw: chat template included
    baseline_tokens: tuple[int, ...]  # generated ids only, without the prompt
    configured_tokens: tuple[int, ...]
    baseline_pieces: tuple[str, ...]  # each generated token's text, for display (display_pieces)
    configured_pieces: tuple[str, ...]
    baseline_text: str
    configured_text: str
    first_divergence: int | None  # first generated index where they differ; None when identical
    kl: tuple[float, ...]  # KL(baseline || configured) in nats, per baseline token, teacher-forced
    active_share: float  # share of FFN neurons still computed under the configuration

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl) if self.kl else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"mean_kl": self.mean_kl}


def prompt_ids(lm: LoadedModel, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids for a prompt, wrapped in the chat template like capture does for instruct models."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise BricklabError("The prompt is empty.", "Type a prompt to generate from.")
    encoded = encode(lm.tokenizer, prompt, MAX_PROMPT_TOKENS, chat_template)
    if encoded.truncated:
        raise BricklabError(
            f"The prompt is longer than {MAX_PROMPT_TOKENS} tokens.",
            "Shorten it; comparisons are for short prompts.",
        )
    return encoded.ids


def check_new_tokens(max_new_tokens) -> None:
    """Refuse a generation length that is not an integer from 1 to MAX_NEW_TOKENS."""
    n = max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
        raise BricklabError(
            f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {n!r}.",
            f"Ask for at most {MAX_NEW_TOKENS} new tokens.",
        )


def compare(
    lm: LoadedModel,
    prompt: str,
    config: BrickConfig,
    max_new_tokens: int = 32,
    store=None,
    run_id: str | None = None,
    chat_template: bool = True,
    baseline: Generation | Sequence[int] | None = None,
) -> Comparison:
    """Generate greedily without and with `config`; store and run_id are needed for `mean` bricks.
    `baseline`: the plain continuation when already known (a UI caches it, best as a Generation with
    its log-probabilities), so only the configured model generates."""
    check_new_tokens(max_new_tokens)
    plan = interventions.plan_for(lm, config, store, run_id)  # validates before generating anything
    ids = prompt_ids(lm, prompt, chat_template)
    if baseline is None:
        baseline = generate_scored(lm, ids, max_new_tokens)
    elif not isinstance(baseline, Generation):
        tokens = tuple(baseline)
        baseline = Generation(tokens, forced_logprobs(lm, ids, tokens, None, len(tokens)))
    with interventions.apply_plan(lm.model, plan):
        configured = generate_scored(lm, ids, max_new_tokens, keep_cache=True)
    b, c = list(baseline.tokens), list(configured.tokens)
    return Comparison(
        prompt=prompt,
        prompt_ids=tuple(ids),
        baseline_tokens=tuple(b),
        configured_tokens=tuple(c),
        baseline_pieces=display_pieces(lm.tokenizer, b),
        configured_pieces=display_pieces(lm.tokenizer, c),
        baseline_text=lm.tokenizer.decode(b, skip_special_tokens=True),
        configured_text=lm.tokenizer.decode(c, skip_special_tokens=True),
        first_divergence=first_divergence(b, c),
        kl=tuple(token_kl(lm, ids, baseline, configured, plan)),
        active_share=active_share(config),
    )


def generate(lm: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain Hugging Face greedy generation; returns the new token ids only."""
    return list(generate_scored(lm, ids, max_new_tokens).tokens)


@torch.inference_mode()
def generate_scored(lm: LoadedModel, ids: list[int], max_new_tokens: int, keep_cache=False) -> Generation:
    """Greedy generation that also keeps the log-probabilities of every step (one generate call),
    and with keep_cache its key/value cache."""
    device = next(lm.model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    out = lm.model.generate(
        inputs,
        attention_mask=torch.ones_like(inputs),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_logits=True,
    )
    tokens = tuple(out.sequences[0, len(ids) :].tolist())
    logits = torch.cat([step[:1] for step in out.logits[: len(tokens)]])  # (n_new, vocab)
    cache = out.past_key_values if keep_cache and _croppable(out.past_key_values) else None
    return Generation(tokens, _logprobs(logits), cache)


def _croppable(cache) -> bool:
    """A plain full-attention cache, which can be cut back to a prefix and extended again."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _logprobs(logits: torch.Tensor) -> np.ndarray:
    return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()


@torch.inference_mode()
def forced_logprobs(lm: LoadedModel, ids: list[int], tokens, plan: dict | None, keep: int) -> np.ndarray:
    """(keep, vocab) log-probabilities of the last `keep` of `tokens`, the model reading
    ids + tokens (teacher-forced), with a compiled plan applied (None: the plain model)."""
    device = next(lm.model.parameters()).device
    inputs = torch.tensor([list(ids) + list(tokens[:-1])], device=device)
    kwargs = {"logits_to_keep": keep} if _keeps_logits(lm.model) else {}
    scope = interventions.apply_plan(lm.model, plan) if plan is not None else contextlib.nullcontext()
    with scope:
        logits = lm.model(inputs, use_cache=False, **kwargs).logits[0, -keep:]
    return _logprobs(logits)


@torch.inference_mode()
def _tail_logprobs(lm: LoadedModel, ids, tokens, start: int, plan: dict, cache) -> np.ndarray:
    """Log-probabilities of tokens[start:], the configured model reading ids + tokens. `cache` (the
    configured generation's) already holds ids + tokens[:start - 1], the text both generations share,
    so only the tokens from there on are run."""
    if cache is None:
        return forced_logprobs(lm, ids, tokens, plan, len(tokens) - start)
    shared = len(ids) + start - 1
    cache.crop(shared - cache.get_seq_length())  # a negative count: drop the configured-only tail
    device = next(lm.model.parameters()).device
    inputs = torch.tensor([list(tokens[start - 1 : -1])], device=device)
    with interventions.apply_plan(lm.model, plan):
        logits = lm.model(inputs, past_key_values=cache, use_cache=True).logits[0]
    return _logprobs(logits)


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def token_kl(
    lm: LoadedModel, ids: list[int], baseline: Generation, configured: Generation, plan: dict
) -> list[float]:
    """KL(p_baseline || p_configured) at each position that predicts a baseline token, both models
    reading the same (baseline) text, so the numbers compare like with like.

    Up to the first divergent token the configured generation read exactly the baseline's text, so its
    own step log-probabilities are the teacher-forced ones; only the positions after it need one
    teacher-forced pass of the configured model (and none when nothing diverged)."""
    n = len(baseline.tokens)
    if n == 0:
        return []
    split = first_divergence(baseline.tokens, configured.tokens)
    reused = min(n, len(configured.tokens), n if split is None else split + 1)
    conf = configured.logprobs[:reused]
    if reused < n:
        tail = _tail_logprobs(lm, ids, baseline.tokens, reused, plan, configured.cache)
        conf = np.concatenate([conf, tail])
    base = torch.from_numpy(baseline.logprobs[:n])
    kl = (base.exp() * (base - torch.from_numpy(conf))).sum(dim=-1).clamp_min(0.0)
    return kl.tolist()


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def display_pieces(tokenizer, ids: Sequence[int]) -> tuple[str, ...]:
    """Each token's text for display, one piece per id, decoded with the tokens before it: a character
    split over several tokens (Chinese, Japanese, emoji) shows whole at the token that completes it,
    and special tokens such as <|im_end|> show empty."""
    pieces, shown = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        if text.endswith("\ufffd") and end < len(ids):  # a character still incomplete: wait for it
            pieces.append("")
        elif text.startswith(shown):
            pieces.append(text[len(shown) :])
            shown = text
        else:  # decoding the longer prefix rewrote earlier text (rare clean-up rules): this token alone
            pieces.append(tokenizer.decode(ids[end - 1 : end], skip_special_tokens=True))
            shown = text
    return tuple(pieces)
