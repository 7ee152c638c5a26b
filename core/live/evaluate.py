"""Quality of a (possibly intervened) model: mean next-token loss per text, and the neuron masks
that the analysis applies while measuring it (static zero-masks, per-token lowest-k masks).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Literal

import numpy as np
import torch

from core.live import interventions
from core.models import LoadedModel
from core.prompts import encode, token_limit


@torch.inference_mode()
def loss_per_prompt(
    lm: LoadedModel,
    texts: list[str],
    batch_size: int = 8,
    per_layer: dict | None = None,
    chat_template: bool = True,
    max_tokens: int = 256,
) -> np.ndarray:
    """float64 (len(texts),): mean cross-entropy of each text's own tokens given everything before.

    Texts are encoded as capture encodes them (chat template around, when asked and available);
    only the text's own tokens are targets, so template tokens never count. A text whose only
    own token is the first token of the sequence has nothing to predict and gets NaN.
    `per_layer` ({layer: fn(a) -> a'}) is applied to the FFN activations for these passes only.
    """
    limit = token_limit(lm.model, max_tokens)
    encoded = [encode(lm.tokenizer, t, limit, chat_template) for t in texts]
    out = np.full(len(texts), np.nan)
    if not encoded:
        return out
    shared = _shared_prefix(encoded)
    order = sorted(range(len(texts)), key=lambda i: encoded[i].end)  # similar lengths batch well
    scope = interventions.transforms(lm.model, per_layer) if per_layer else contextlib.nullcontext()
    with scope:
        prefix = _prefix_cache(lm.model, encoded[0].ids[:shared])
        for b in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[b : b + batch_size]]
            for row, loss in enumerate(_batch_losses(lm, batch, shared, prefix)):
                out[order[b + row]] = loss
    return out


def _shared_prefix(encoded: list) -> int:
    """Length of the token prefix every text shares and none predicts from (the chat template's
    system part): it runs once per call, not once per text, which saves most of the compute on
    short prompts."""
    first = encoded[0].ids
    n = min(max(e.start, 1) - 1 for e in encoded)
    for e in encoded[1:]:
        n = next((i for i in range(n) if e.ids[i] != first[i]), n)
    return n


def _prefix_cache(model, ids: list[int]):
    if not ids:
        return None
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values


def _batch_losses(lm: LoadedModel, batch: list, shared: int, prefix) -> list[float]:
    """One forward pass over the texts' tokens after the shared prefix, up to their last own token."""
    device = next(lm.model.parameters()).device
    width = max(e.end for e in batch) - shared
    ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for row, e in enumerate(batch):
        ids[row, : e.end - shared] = torch.tensor(e.ids[shared : e.end])
        mask[row, : e.end] = 1
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(batch))
    ids = ids.to(device)
    logits = lm.model(
        input_ids=ids, attention_mask=mask.to(device), past_key_values=cache, use_cache=cache is not None
    ).logits
    return [
        _text_loss(logits[row], ids[row], e.start - shared, e.end - shared) for row, e in enumerate(batch)
    ]


def _text_loss(logits: torch.Tensor, ids: torch.Tensor, start: int, end: int) -> float:
    """Mean CE of targets ids[max(start, 1):end], each predicted from the position before it."""
    first = max(start, 1)
    if end <= first:
        return float("nan")
    pred = logits[first - 1 : end - 1].float()  # (n_targets, vocab)
    return float(torch.nn.functional.cross_entropy(pred, ids[first:end]))


def masked_neurons(n_layers: int, d_ff: int, global_ids) -> dict[int, interventions.Transform]:
    """Per-layer transforms that zero the given neurons (global id = layer * d_ff + index)."""
    ids = np.unique(np.asarray(global_ids, dtype=np.int64))
    if ids.size and (ids[0] < 0 or ids[-1] >= n_layers * d_ff):
        raise ValueError(f"neuron ids must lie in [0, {n_layers * d_ff}) for {n_layers} x {d_ff} neurons")
    per_layer = {}
    for layer in np.unique(ids // d_ff):
        scale = torch.ones(d_ff)
        scale[torch.from_numpy(ids[ids // d_ff == layer] % d_ff)] = 0.0
        per_layer[int(layer)] = interventions.affine(scale)
    return per_layer


def kept_neurons(n_layers: int, d_ff: int, global_ids) -> dict[int, interventions.Transform]:
    """Per-layer transforms that zero every neuron except the given ones (keep-only)."""
    keep = np.zeros(n_layers * d_ff, dtype=bool)
    keep[np.asarray(global_ids, dtype=np.int64)] = True
    return masked_neurons(n_layers, d_ff, np.flatnonzero(~keep))


def lowest_k_mask(
    k_fraction: float, indicator: Literal["abs", "output"], norms: list[torch.Tensor]
) -> dict[int, interventions.Transform]:
    """Per-layer transforms zeroing, at each token, the lowest `k_fraction` of the layer's neurons.

    Neurons are ranked by |a| ("abs") or by the output magnitude |a| * ||W_down[:, i]|| ("output");
    `norms[layer]` holds the column norms and also fixes the layer count. Exactly
    d_ff - floor(k_fraction * d_ff) neurons survive per token (ties broken by torch.topk).
    """
    if not 0 <= k_fraction < 1:
        raise ValueError(f"k_fraction must be in [0, 1), got {k_fraction}")
    if indicator not in ("abs", "output"):
        raise ValueError("indicator must be 'abs' or 'output'")
    return {layer: _lowest_k(k_fraction, indicator, norm) for layer, norm in enumerate(norms)}


def _lowest_k(k_fraction: float, indicator: str, norm: torch.Tensor) -> interventions.Transform:
    keep = norm.shape[0] - int(np.floor(k_fraction * norm.shape[0]))

    def fn(a: torch.Tensor) -> torch.Tensor:
        score = a.abs() if indicator == "abs" else a.abs() * norm.to(a.device, a.dtype)
        top = score.topk(keep, dim=-1, sorted=False).indices  # (..., keep)
        return torch.zeros_like(a).scatter_(-1, top, a.gather(-1, top))

    return fn
