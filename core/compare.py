"""Greedy generation with and without a brick configuration, side by side: both texts, where they
part, and how far the configured model's next-token distribution moves from the baseline's."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from core import configuration, interventions
from core.capture import CaptureConfig, encode
from core.configuration import BrickConfig
from core.errors import BricklabError
from core.models import LoadedModel

MAX_NEW_TOKENS = 256  # a side-by-side view, not a long-form generator
MAX_PROMPT_TOKENS = 1024  # chat template included


@dataclass(frozen=True)
class Comparison:
    prompt: str
    prompt_ids: tuple[int, ...]  # what the model saw: chat template included
    baseline_tokens: tuple[int, ...]  # generated ids only, without the prompt
    configured_tokens: tuple[int, ...]
    baseline_pieces: tuple[str, ...]  # each generated token decoded on its own, for display
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
    encoded = encode(lm.tokenizer, prompt, CaptureConfig(chat_template=chat_template), MAX_PROMPT_TOKENS)
    if encoded.truncated:
        raise BricklabError(
            f"The prompt is longer than {MAX_PROMPT_TOKENS} tokens.",
            "Shorten it; comparisons are for short prompts.",
        )
    return encoded.ids


def compare(
    lm: LoadedModel,
    prompt: str,
    config: BrickConfig,
    max_new_tokens: int = 32,
    store=None,
    run_id: str | None = None,
    chat_template: bool = True,
    baseline: list[int] | tuple[int, ...] | None = None,
) -> Comparison:
    """Generate greedily without and with `config`; store and run_id are needed for `mean` bricks.
    `baseline`: the plain continuation when already known (a UI caches it), so only the configured
    model generates."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or not 1 <= max_new_tokens <= MAX_NEW_TOKENS
    ):
        raise BricklabError(
            f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}.",
            f"Ask for at most {MAX_NEW_TOKENS} new tokens.",
        )
    plan = interventions.plan_for(lm, config, store, run_id)  # validates before generating anything
    ids = prompt_ids(lm, prompt, chat_template)
    baseline = list(baseline) if baseline is not None else generate(lm, ids, max_new_tokens)
    with interventions.apply_plan(lm.model, plan):
        configured = generate(lm, ids, max_new_tokens)
    kl = token_kl(lm, ids, baseline, plan)
    return Comparison(
        prompt=prompt,
        prompt_ids=tuple(ids),
        baseline_tokens=tuple(baseline),
        configured_tokens=tuple(configured),
        baseline_pieces=_pieces(lm.tokenizer, baseline),
        configured_pieces=_pieces(lm.tokenizer, configured),
        baseline_text=lm.tokenizer.decode(baseline, skip_special_tokens=True),
        configured_text=lm.tokenizer.decode(configured, skip_special_tokens=True),
        first_divergence=first_divergence(baseline, configured),
        kl=tuple(kl),
        active_share=configuration.active_share(config),
    )


@torch.inference_mode()
def generate(lm: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain Hugging Face greedy generation; returns the new token ids only."""
    device = next(lm.model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    out = lm.model.generate(
        inputs,
        attention_mask=torch.ones_like(inputs),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return out[0, len(ids) :].tolist()


@torch.inference_mode()
def token_kl(lm: LoadedModel, ids: list[int], continuation: list[int], plan: dict) -> list[float]:
    """KL(p_baseline || p_configured) at each position that predicts a continuation token, both
    models reading the same (baseline) text, so the numbers compare like with like."""
    if not continuation:
        return []
    device = next(lm.model.parameters()).device
    inputs = torch.tensor([ids + continuation[:-1]], device=device)
    rows = slice(len(ids) - 1, None)  # (n_new, vocab): the logits that predict each new token
    base = torch.log_softmax(lm.model(inputs, use_cache=False).logits[0, rows].float(), dim=-1)
    with interventions.apply_plan(lm.model, plan):
        conf = torch.log_softmax(lm.model(inputs, use_cache=False).logits[0, rows].float(), dim=-1)
    kl = (base.exp() * (base - conf)).sum(dim=-1).clamp_min(0.0)
    return kl.cpu().tolist()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _pieces(tokenizer, ids: list[int]) -> tuple[str, ...]:
    return tuple(tokenizer.decode([i]) for i in ids)
