"""One neuron up close: its statistics, category scores and top examples from the cache, the
per-token activations of a prompt recomputed on the fly, and a search of neurons by token text.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import numpy as np
import torch

from core.bricks import scores
from core.capture import run as capture
from core.errors import BricklabError
from core.live import interventions
from core.models import LoadedModel, check_match
from core.prompts import encode, token_limit
from core.store import Store


@dataclass(frozen=True)
class Example:
    rank: int  # 0 = the neuron's strongest token in the run
    prompt_idx: int
    prompt_id: str
    category: str | None
    pos: int  # position among the prompt's own tokens
    value: float  # |a| at that token
    tokens: tuple[str, ...]  # the prompt's own tokens as display text


@dataclass(frozen=True)
class NeuronDetail:
    layer: int
    neuron: int
    global_id: int  # layer * d_ff + neuron
    mean_abs: float  # mean |a| over every token of the run
    mean_act: float  # mean signed a
    fire_rate: float  # share of tokens at which it is among the layer's firing neurons
    scores: dict[str, float]  # category -> functionality score (average precision); {} without categories
    examples: tuple[Example, ...]


def check_neuron(store: Store, run_id: str, layer: int, neuron: int):
    """The run, after checking that (layer, neuron) exists in it."""
    run = store.require_run(run_id)
    if not (0 <= int(layer) < run.n_layers and 0 <= int(neuron) < run.d_ff):
        raise BricklabError(
            f"Neuron ({layer}, {neuron}) does not exist: run '{run.run_id}' has layers 0-{run.n_layers - 1} "
            f"and neurons 0-{run.d_ff - 1} per layer.",
            "Pick a layer and an index inside those ranges.",
        )
    return run


def neuron_detail(
    store: Store, run_id: str, layer: int, neuron: int, with_scores: bool = True
) -> NeuronDetail:
    """Everything the cache knows about one neuron (a few small queries, no model call)."""
    run = check_neuron(store, run_id, layer, neuron)
    layer, neuron = int(layer), int(neuron)
    stats = store.neuron_stats(run.run_id, layer, neuron)
    rows = store.neuron_examples(run.run_id, layer, neuron)
    texts = _prompt_tokens(store, run.run_id, sorted({r[1] for r in rows}))
    examples = tuple(Example(*r[:5], float(r[5]), texts.get(r[1], ())) for r in rows)
    category_scores = {}
    if with_scores and run.categories:
        column = scores.functionality_scores(store, run.run_id)[:, layer * run.d_ff + neuron]
        category_scores = {name: float(v) for name, v in zip(run.categories, column, strict=True)}
    return NeuronDetail(
        layer, neuron, layer * run.d_ff + neuron, stats.get("mean_abs", float("nan")),
        stats.get("mean_act", float("nan")), stats.get("fire_rate", float("nan")), category_scores, examples,
    )  # fmt: skip


def _prompt_tokens(store: Store, run_id: str, prompt_idxs: list[int]) -> dict[int, tuple[str, ...]]:
    tokens = store.prompt_tokens(run_id, prompt_idxs)
    return {idx: display_tokens(row) for idx, row in tokens.items()}


def neuron_stat(store: Store, run_id: str, name: str) -> np.ndarray:
    """A per-neuron statistic of the run ('mean_abs', 'mean_act', 'fire_rate'), float32 (n_layers * d_ff,)."""
    return store.layer_array(run_id, name).reshape(-1)


class _Seen(Exception):
    """Raised by the observer once it has the activation: the layers above are not needed."""


@torch.inference_mode()
def token_activations(
    lm: LoadedModel, store: Store, run_id: str, prompt_idx: int, layer: int, neuron: int
) -> np.ndarray:
    """Signed activation of one neuron at each of a captured prompt's own tokens, recomputed with the
    model (same tokenisation as the capture). float32 (n_tokens,)."""
    run = check_neuron(store, run_id, layer, neuron)
    check_match(run, lm.info, f"Run '{run.run_id}'", f"Load {run.model_id} to recompute its activations.")
    text = store.prompt_text(run.run_id, int(prompt_idx))
    if text is None:
        raise BricklabError(
            f"Run '{run.run_id}' has no prompt {prompt_idx}.", "Pick one of the run's prompts."
        )
    config = capture.CaptureConfig(**run.settings)
    enc = encode(lm.tokenizer, text, token_limit(lm.model, config.max_tokens), config.chat_template)
    seen: list[torch.Tensor] = []

    def observe(a: torch.Tensor) -> torch.Tensor:
        seen.append(a[0, enc.start : enc.end, int(neuron)].float().cpu())
        raise _Seen

    device = next(lm.model.parameters()).device
    ids = torch.tensor([enc.ids], device=device)
    try:
        with interventions.transforms(lm.model, {int(layer): observe}):
            lm.model.base_model(input_ids=ids, use_cache=False)
    except _Seen:
        pass
    return seen[0].numpy()


def search_tokens(store: Store, run_id: str, text: str, exact: bool = True, limit: int = 50) -> list[dict]:
    """Neurons whose top examples land most often on tokens reading `text` (case-insensitive; the
    leading-space marker of the tokenizer ignored). exact=False matches tokens containing it."""
    run = store.require_run(run_id)
    needle = text.strip().lower()
    if not needle:
        raise BricklabError("The search text is empty.", "Type a word or token, e.g. Paris.")
    rows = store.search_tokens(run.run_id, needle, exact, limit)
    keys = ("layer", "neuron", "hits", "prompts", "best")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table used by byte-level BPE tokenizers."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTES = _byte_decoder()


def display_token(token: str) -> str:
    """A stored token as text: byte-level BPE characters decoded, SentencePiece's '▁' as a space."""
    if token and all(ch in _BYTES for ch in token):
        return bytes(_BYTES[ch] for ch in token).decode("utf-8", errors="replace")
    return token.replace("▁", " ")


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback tokens


def _token_bytes(token: str) -> bytes:
    if match := _BYTE_PIECE.fullmatch(token):
        return bytes([int(match[1], 16)])
    if token and all(ch in _BYTES for ch in token):
        return bytes(_BYTES[ch] for ch in token)
    return token.replace("▁", " ").encode()


def display_tokens(tokens) -> tuple[str, ...]:
    """Stored tokens of one text as display text, one piece per token, decoded with their neighbours:
    a character split over several tokens (Chinese, Japanese, emoji) shows whole at the token that
    completes it and the tokens before it show empty; bytes that never make a character show as �."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(_token_bytes(t)) for t in tokens]
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return tuple(pieces)
