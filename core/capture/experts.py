"""The router's choices during capture of a mixture-of-experts model: per prompt, layer and expert, how
many of the prompt's own tokens were routed to the expert. Committed with each chunk as a partial
(a resumed or sharded capture keeps them) and finalised into a per-layer array of the run, from which
the layers' expert layout is read back too; usage shares per prompt or per category."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from core import experts
from core.bricks import scores
from core.errors import BricklabError
from core.live import experts as live_experts
from core.store import Store

KIND = "expert_routes"  # per layer: int32 (n_prompts, n_experts) routed own tokens


class RouteCounts:
    """Counts routed own tokens per (chunk-local prompt, layer, expert), reading the rows of each batch
    from the capture's ChunkReducer (its `flat` own-token rows, `bounds` and `batch`)."""

    def __init__(self, layout: experts.Layout, n_layers: int, n_prompts: int, reducer):
        self.layout, self.reducer = layout, reducer
        self.counts = np.zeros((n_prompts, n_layers, layout.n_experts), np.int32)

    def observer(self, layer: int):
        def observe(w: torch.Tensor) -> torch.Tensor:  # (N, n_experts) dense routing weights
            r = self.reducer
            chosen = (w.index_select(0, r.flat) != 0).int()  # (own tokens, n_experts)
            owner = torch.repeat_interleave(torch.from_numpy(np.diff(r.bounds)).to(w.device))
            per_prompt = chosen.new_zeros((len(r.batch), chosen.shape[1])).index_add_(0, owner, chosen)
            self.counts[r.batch, layer] += per_prompt.cpu().numpy()
            return w

        return observe


@contextmanager
def recording(lm, reducer, n_prompts: int):
    """Count the router's choices for one chunk while the capture runs; yields the RouteCounts, or None
    for a dense model (then nothing is installed)."""
    if not experts.is_moe(lm.model):
        yield None
        return
    layout = experts.layout(lm.model)
    counts = RouteCounts(layout, lm.info.n_layers, n_prompts, reducer)
    observers = {layer: counts.observer(layer) for layer in range(lm.info.n_layers)}
    with live_experts.routed(lm.model, observers):
        yield counts


def partials(counts: RouteCounts | None) -> list[tuple[int, str, np.ndarray]]:
    """A chunk's counts as `chunk_arrays` rows, committed with the chunk (so resumed and sharded
    captures keep them); finalising concatenates them in chunk order (core.capture.reduce)."""
    if counts is None:
        return []
    return [
        (layer, KIND, np.ascontiguousarray(counts.counts[:, layer]))
        for layer in range(counts.counts.shape[1])
    ]


def route_counts(store: Store, run_id: str | None) -> np.ndarray | None:
    """int32 (n_prompts, n_layers, n_experts): own tokens of each prompt routed to each expert; None for
    a run of a dense model."""
    run = store.require_run(run_id)
    flat = store.layer_array(run.run_id, KIND, np.int32)  # (n_layers, n_prompts * n_experts)
    if flat.size == 0:
        return None
    return flat.reshape(run.n_layers, run.n_prompts, -1).transpose(1, 0, 2)


def layout(store: Store, run_id: str | None) -> experts.Layout | None:
    """The run's expert layout, read from its routes, or None for a run of a dense model."""
    counts = route_counts(store, run_id)
    if counts is None:
        return None
    run = store.require_run(run_id)
    n_experts = counts.shape[2]
    top_k = int(counts[:, 0].sum()) // max(int(run.n_tokens or 0), 1)
    return experts.Layout(n_experts, run.d_ff // n_experts, max(top_k, 1))


def usage_by_category(store: Store, run_id: str | None) -> tuple[np.ndarray, list[str]]:
    """float64 (n_categories, n_layers, n_experts): each category's share of own tokens routed to each
    expert (a layer's shares sum to top_k), and the category names ("all" for a run without them)."""
    counts, found = route_counts(store, run_id), layout(store, run_id)
    if counts is None:
        raise BricklabError(
            f"Run '{store.require_run(run_id).run_id}' is not of a mixture-of-experts model.",
            "Expert usage needs a run captured with a MoE model (e.g. mixtral, qwen2_moe).",
        )
    counts = counts.astype(np.float64)
    labels, names = scores.category_labels(store, run_id)
    if not names:
        labels, names = np.zeros(len(counts), np.int32), ["all"]
    usage = np.zeros((len(names), *counts.shape[1:]))
    for c in range(len(names)):
        mine = counts[labels == c]
        tokens = mine[:, 0].sum() / found.top_k  # each token is counted top_k times
        usage[c] = mine.sum(axis=0) / max(tokens, 1.0)
    return usage, names
