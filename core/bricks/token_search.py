"""Which neurons fire most on a token, over the whole run: the live model reruns the run's prompts
that contain the token (a bounded number, batched) and every neuron is ranked by its mean activation
at those positions. The cache keeps firing bits per token, not activation values, so the values are
recomputed; the answer is cached per (run, token).
"""

from __future__ import annotations

import numpy as np
import torch

from core.capture import run as capture
from core.errors import BricklabError
from core.live import interventions
from core.models import LoadedModel, check_match
from core.progress import Progress
from core.prompts import encode, token_limit
from core.store import Store

VERSION = 1  # part of the cache key
MAX_PROMPTS = 64  # prompts rerun at most per search
BATCH = 8  # prompts per forward pass


_SUMS = (
    "at",
    "at_abs",
    "ctx_abs",
    "ctx_sq",
)  # a and |a| at the token; |a| and a^2 over the prompts' own tokens


def _batch(encoded, pad: int):
    """Right-padded ids and attention mask (B, T) of a batch of encoded prompts."""
    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, e in enumerate(encoded):
        ids[r, : len(e.ids)], mask[r, : len(e.ids)] = torch.tensor(e.ids), 1
    return ids, mask


@torch.inference_mode()
def _activations_at(lm: LoadedModel, texts: list[str], positions: list[list[int]], config, report) -> tuple:
    """({name: float64 (n_neurons,)} sums named in _SUMS, positions at the token, own tokens in all):
    one batched forward pass per BATCH texts; positions count among each text's own tokens."""
    sums = {name: torch.zeros(lm.info.n_layers, lm.info.d_ff, dtype=torch.float64) for name in _SUMS}
    limit = token_limit(lm.model, config.max_tokens)
    encoded = [encode(lm.tokenizer, t, limit, config.chat_template) for t in texts]
    device, pad = next(lm.model.parameters()).device, lm.tokenizer.pad_token_id or 0
    n_at = n_ctx = 0
    for lo in range(0, len(encoded), BATCH):
        report(
            lo, len(encoded), f"rerunning prompts {lo + 1}-{min(lo + BATCH, len(encoded))} of {len(encoded)}"
        )
        batch = encoded[lo : lo + BATCH]
        at = [
            (r, e.start + p)
            for r, (e, pos) in enumerate(zip(batch, positions[lo : lo + BATCH], strict=True))
            for p in pos
        ]
        at = torch.tensor([(r, c) for r, c in at if c < batch[r].end], dtype=torch.long).reshape(-1, 2).T
        own = [(r, c) for r, e in enumerate(batch) for c in range(e.start, e.end)]
        own = torch.tensor(own, dtype=torch.long).T  # (2, n_own)

        def observe(layer, at=at.to(device), own=own.to(device)):
            def fn(a: torch.Tensor) -> torch.Tensor:  # (B, T, d_ff)
                here, every = a[at[0], at[1]].double().cpu(), a[own[0], own[1]].double().cpu()
                for name, values in zip(_SUMS, (here, here.abs(), every.abs(), every**2), strict=True):
                    sums[name][layer] += values.sum(dim=0)
                return a

            return fn

        ids, mask = _batch(batch, pad)
        with interventions.transforms(lm.model, {layer: observe(layer) for layer in range(lm.info.n_layers)}):
            lm.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        n_at, n_ctx = n_at + at.shape[1], n_ctx + own.shape[1]
    report(len(encoded), len(encoded), "reran")
    return {name: v.reshape(-1).numpy() for name, v in sums.items()}, n_at, n_ctx


def token_activity(
    lm: LoadedModel,
    store: Store,
    run_id: str | None,
    text: str,
    max_prompts: int = MAX_PROMPTS,
    progress: Progress | None = None,
) -> dict:
    """Every neuron's mean activation where a token reading `text` occurs in the run (case-insensitive,
    the tokenizer's space marker ignored, as the search on top examples matches). Float32
    (n_neurons,) arrays 'mean' (a at the token), 'mean_abs' (|a| there), 'context_abs' (|a| over all
    own tokens of the same prompts) and 'z' ((mean_abs - context_abs) / the std of |a| there), with
    'token', 'positions', 'prompts' and 'context_tokens'. Reruns up to `max_prompts` prompts that
    hold the token; cached per (run, token, max_prompts)."""
    run = store.require_run(run_id)
    check_match(run, lm.info, f"Run '{run.run_id}'", f"Load {run.model_id} to search its activations.")
    needle = text.strip().lower()
    if not needle:
        raise BricklabError("The search text is empty.", "Type a word or token, e.g. Paris.")
    key = {"token": needle, "max_prompts": int(max_prompts), "version": VERSION}
    if (cached := store.get_arrays(run.run_id, "token_search", key)) is not None:
        return {**cached[0], **cached[1]}
    where = store.token_positions(run.run_id, needle, max_prompts)
    if not where:
        raise BricklabError(
            f"No token of run '{run.run_id}' reads '{text.strip()}'.",
            "Try another spelling or a shorter word (the search matches whole tokens, case-insensitive).",
        )
    report = progress or (lambda done, total, message: None)
    texts = [store.prompt_text(run.run_id, idx) for idx in where]
    config = capture.CaptureConfig(**run.settings)
    sums, count, n_ctx = _activations_at(lm, texts, list(where.values()), config, report)
    ctx_mean = sums["ctx_abs"] / max(n_ctx, 1)
    ctx_std = np.sqrt(np.maximum(sums["ctx_sq"] / max(n_ctx, 1) - ctx_mean**2, 0))
    mean_abs = sums["at_abs"] / max(count, 1)
    arrays = {
        "mean": (sums["at"] / max(count, 1)).astype(np.float32),
        "mean_abs": mean_abs.astype(np.float32),
        "context_abs": ctx_mean.astype(np.float32),
        "z": ((mean_abs - ctx_mean) / np.maximum(ctx_std, 1e-6)).astype(np.float32),
    }
    meta = {"token": text.strip(), "positions": count, "prompts": len(where), "context_tokens": n_ctx}
    if not store.read_only:
        store.put_arrays(run.run_id, "token_search", key, arrays, meta)
    return arrays | meta


RANKINGS = ("z", "mean")


def rank_neurons(
    store: Store, run_id: str | None, activity: dict, limit: int = 50, by: str = "z"
) -> list[dict]:
    """The `limit` neurons that fire most on the token. by='z' (the default): how far their |a| at the
    token stands above their |a| elsewhere in the same prompts, in standard deviations, so that neither
    a layer's scale nor a neuron that is large everywhere tops the list; by='mean': the plain mean
    activation at the token. Each row also has the ratio of its mean |a| at the token to its mean |a|
    over the whole run ('× run mean')."""
    if by not in RANKINGS:
        raise BricklabError(f"Unknown ranking {by!r}.", f"Use one of {', '.join(RANKINGS)}.")
    run = store.require_run(run_id)
    base = store.layer_array(run.run_id, "mean_abs").reshape(-1)
    best = np.argsort(-activity[by], kind="stable")[:limit]
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = activity["mean_abs"][best] / base[best]
    return [
        {"layer": int(i) // run.d_ff, "neuron": int(i) % run.d_ff, "z": float(activity["z"][i]),
         "mean a": float(activity["mean"][i]), "mean |a|": float(activity["mean_abs"][i]),
         "× run mean": float(x)}
        for i, x in zip(best, lift, strict=True)
    ]  # fmt: skip
