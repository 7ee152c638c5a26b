"""Quality of a (possibly intervened) model: mean next-token loss per text, and the neuron masks
that the analysis applies while measuring it (static zero-masks, per-token lowest-k masks).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from core.live import interventions, sparse
from core.live.hooks import Dispatcher
from core.models import LoadedModel
from core.prompts import encode, token_limit


@torch.inference_mode()
def loss_per_prompt(
    lm: LoadedModel,
    texts: list[str],
    batch_size: int = 64,
    per_layer: dict | None = None,
    chat_template: bool = True,
    max_tokens: int = 256,
    counts: dict | None = None,
) -> np.ndarray:
    """float64 (len(texts),): mean cross-entropy of each text's own tokens given everything before.

    Texts are encoded as capture encodes them (chat template around, when asked and available);
    only the text's own tokens are targets, so template tokens never count. A text whose only
    own token is the first token of the sequence has nothing to predict and gets NaN.
    `per_layer` ({layer: fn(a) -> a'}) is applied to the FFN activations for these passes only.
    Texts run in a few padded passes of at most `batch_size` (see `passes`). `counts`, when given,
    adds up what the call cost: "evaluations", "texts", "passes", "tokens" (run after the shared
    prefix), "padded_tokens" and "targets" (tokens whose log-probability is read).
    """
    return losses_under(lm, texts, [per_layer], batch_size, chat_template, max_tokens, counts)[0]


@torch.inference_mode()
def losses_under(
    lm: LoadedModel,
    texts: list[str],
    masks: list[dict | None],
    batch_size: int = 64,
    chat_template: bool = True,
    max_tokens: int = 256,
    counts: dict | None = None,
    on_pass: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """float64 (len(masks), len(texts)): `loss_per_prompt` of the texts under each of `masks`.

    One mask runs as `loss_per_prompt` describes (a static zero-mask keeping at most SPARSE_SHARE of a
    layer sparsely). Several share their forward passes: every (mask, text) pair is a row that runs
    under its own mask (FfnRows on a gated MLP, else Rows), and the passes group rows of equal width
    across masks, so they pad less than one call per mask would. `on_pass(done, total)` is
    called after each pass.
    """
    limit = token_limit(lm.model, max_tokens)
    encoded = [encode(lm.tokenizer, t, limit, chat_template) for t in texts]
    out = np.full((len(masks), len(texts)), np.nan)
    if not encoded or not masks:
        return out
    shared = _shared_prefix(encoded)
    pairs = [(m, i) for m in range(len(masks)) for i in range(len(texts))]
    widths = [_stop(encoded[i]) - shared for _, i in pairs]
    cost = PASS_COST.get(next(lm.model.parameters()).device.type, PASS_COST["cuda"])
    groups = passes(widths, batch_size, cost)
    if counts is not None:
        _count(counts, len(masks), widths, groups, [encoded[i] for _, i in pairs])
    with _applied(lm.model, masks[0] or {}) if len(masks) == 1 else _rows(lm.model, masks) as select:
        select(list(range(len(masks))))  # the prefix once per mask, under that mask
        prefix = _prefix_cache(lm.model, encoded[0].ids[:shared], len(masks))
        for n, group in enumerate(groups):
            batch = [pairs[g] for g in group]
            select([m for m, _ in batch])
            losses = _batch_losses(lm, [encoded[i] for _, i in batch], shared, prefix, [m for m, _ in batch])
            for (m, i), loss in zip(batch, losses, strict=True):
                out[m, i] = loss
            if on_pass:
                on_pass(n + 1, len(groups))
    return out


def _count(counts: dict, n_masks: int, widths: list[int], groups: list[list[int]], encoded: list) -> None:
    added = {
        "evaluations": n_masks,
        "texts": len(widths),
        "passes": len(groups),
        "tokens": sum(widths),
        "padded_tokens": sum(len(g) * max(widths[i] for i in g) for g in groups),
        "targets": sum(max(e.end - max(e.start, 1), 0) for e in encoded),
    }
    for name, value in added.items():
        counts[name] = counts.get(name, 0) + value


class Rows:
    """One layer's activation transform when a pass's rows carry different masks: row r goes through
    `fns[masks[r]]` (None: unchanged). `select` sets the rows' masks before each pass."""

    def __init__(self, fns: list):
        self.fns, self._groups, self._n = fns, [], 0

    def select(self, masks: list[int]) -> None:
        rows: dict[int, list[int]] = {}
        for r, m in enumerate(masks):
            if self.fns[m] is not None:
                rows.setdefault(m, []).append(r)
        self._n, self._groups = len(masks), [(self.fns[m], r) for m, r in rows.items()]

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        if not self._groups:
            return a
        if len(self._groups) == 1 and len(self._groups[0][1]) == self._n:
            return self._groups[0][0](a)  # every row under one transform
        out = a.clone()
        for fn, rows in self._groups:
            index = torch.tensor(rows, device=a.device)
            out[index] = fn(a[index])
        return out


class FfnRows:
    """One gated FFN (a core.live.sparse.LayerFn) when a pass's rows carry different masks: the rows
    of a static zero-mask keeping at most SPARSE_SHARE run sparsely (KeepOnly) as one mask alone
    would, the smallest first while their gathered weights (kept for the whole call) stay within
    `copies` copies of the layer's (SPARSE_BUDGET); the other rows run together, densely, each with
    its own activation transform (Rows)."""

    def __init__(self, transforms: list, copies: float | None = None):
        self.keep: list = [None] * len(transforms)
        small = [m for m, t in enumerate(transforms) if isinstance(t, Zeroed) and t.share <= SPARSE_SHARE]
        budget = SPARSE_BUDGET if copies is None else copies
        for m in sorted(small, key=lambda m: transforms[m].share):
            if transforms[m].share <= budget:
                self.keep[m] = sparse.KeepOnly(transforms[m].keep.numpy())
                budget -= transforms[m].share
        self.dense = Rows([t if k is None else None for t, k in zip(transforms, self.keep, strict=True)])

    def select(self, masks: list[int]) -> None:
        keep: dict[int, list[int]] = {}
        for r, m in enumerate(masks):
            if self.keep[m] is not None:
                keep.setdefault(m, []).append(r)
        self._dense = [r for r, m in enumerate(masks) if self.keep[m] is None]
        self._keep = [(self.keep[m], rows) for m, rows in keep.items()]
        self.dense.select([masks[r] for r in self._dense])

    def __call__(self, f: sparse.Ffn, x: torch.Tensor) -> torch.Tensor:
        if not self._keep:
            return f.down(self.dense(f.activations(x)))
        parts = list(self._keep)
        if self._dense:
            parts.append((lambda f, x: f.down(self.dense(f.activations(x))), self._dense))
        if len(parts) == 1:
            return parts[0][0](f, x)
        out = torch.empty_like(x)
        for fn, rows in parts:
            index = torch.tensor(rows, device=x.device)
            out[index] = fn(f, x[index])
        return out


@contextlib.contextmanager
def _rows(model, masks: list[dict | None]):
    """Per-row masks on every layer some mask changes, for this context; yields the function that
    sets the masks of a pass's rows: a FfnRows per layer of a gated MLP, else a Rows transform."""
    layers = sorted({layer for m in masks for layer in (m or {})})
    if sparse.supported(model):
        per_layer = {layer: FfnRows([(m or {}).get(layer) for m in masks]) for layer in layers}
        context = sparse.sparse(model, per_layer)
    else:
        per_layer = {layer: Rows([(m or {}).get(layer) for m in masks]) for layer in layers}
        context = interventions.transforms(model, per_layer)
    with context:
        yield lambda rows: [layer.select(rows) for layer in per_layer.values()]


@contextlib.contextmanager
def _applied(model, per_layer: dict):
    """`per_layer` on the model for this context: a static zero-mask keeping at most SPARSE_SHARE of its
    layer runs as core.live.sparse.KeepOnly (the zeroed neurons are not computed: the same outputs
    within float tolerance), every other transform through core.live.interventions."""
    quick = {}
    if per_layer and sparse.supported(model):
        quick = {
            layer: sparse.KeepOnly(fn.keep.numpy())
            for layer, fn in per_layer.items()
            if isinstance(fn, Zeroed) and fn.share <= SPARSE_SHARE
        }
    rest = {layer: fn for layer, fn in per_layer.items() if layer not in quick}
    with contextlib.ExitStack() as stack:
        if rest:
            stack.enter_context(interventions.transforms(model, rest))
        if quick:
            stack.enter_context(sparse.sparse(model, quick))
        yield lambda rows: None  # one mask on every row: nothing to select per pass


# A zero-mask runs sparsely when it keeps at most this share of its layer's neurons (keep-only sets, the
# recombination); one keeping more (an ablation of a category's top 5%) would save little and runs dense.
SPARSE_SHARE = 0.8
# Masks sharing passes (FfnRows) keep each sparse mask's gathered weights for the whole call: at most this
# many copies of a layer's FFN weights in all, the smallest masks first (the others run dense). On the
# default model's recombination (6 masks, 2.6 copies) a budget of 1 ran 15.7-16.8 s, every mask sparse
# 17.1-20.7 s, a call per mask 17.2-17.9 s (interleaved, 2 threads, load ~1.4): memory bounded costs no time.
SPARSE_BUDGET = 1.0


class Zeroed:
    """A static zero-mask of one layer, a' = a * keep: a transform (core.live.interventions) that also
    tells `loss_per_prompt` which neurons it keeps."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep  # bool (d_ff,)
        self.share = float(keep.float().mean())
        self._scale = interventions.affine(keep.float())

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return self._scale(a)


# A forward pass's fixed cost, in padded tokens: on a CPU compute follows the padded tokens and a pass
# costs little more, so short texts run in a few tight passes; on a GPU one wide pass is cheapest. (The
# default run's 56 held-out prompts, 929 tokens, two threads: 3 passes of 1,126 padded tokens 5.6 s,
# 7 passes of 975 5.7 s: narrower passes use the two threads worse, which eats the padding saved.)
PASS_COST = {"cpu": 64, "cuda": 4096}


def passes(widths: list[int], batch_size: int, pass_cost: int = PASS_COST["cpu"]) -> list[list[int]]:
    """Indices grouped into forward passes: consecutive runs of the widths sorted ascending, at most
    `batch_size` each, split where that minimises padded tokens + `pass_cost` per pass (exact dynamic
    programming over the sorted order)."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    w = [widths[i] for i in order]
    best, cut = [0.0] + [np.inf] * len(w), [0] * (len(w) + 1)
    for end in range(1, len(w) + 1):  # best[end]: cheapest grouping of the first `end` texts
        for start in range(max(0, end - batch_size), end):
            cost = best[start] + (end - start) * w[end - 1] + pass_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(w)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def _shared_prefix(encoded: list) -> int:
    """Length of the token prefix every text shares and none predicts from (the chat template's
    system part): it runs once per call, not once per text, which saves most of the compute on
    short prompts."""
    first = encoded[0].ids
    n = min(max(e.start, 1) - 1 for e in encoded)
    for e in encoded[1:]:
        n = next((i for i in range(n) if e.ids[i] != first[i]), n)
    return n


def _prefix_cache(model, ids: list[int], rows: int = 1):
    """The shared prefix's key/value cache, `rows` copies in one pass (one per mask, each under it)."""
    if not ids:
        return None
    device = next(model.parameters()).device
    return model.base_model(
        input_ids=torch.tensor([ids] * rows, device=device), use_cache=True
    ).past_key_values


def _heads(model) -> list:
    return [model.get_output_embeddings()]


# the unembedding sees only the hidden states of predicting positions (no padding, no template)
_targets_only = Dispatcher("loss_targets", "input", _heads)


def _stop(e) -> int:
    """End of a text's input: its last own token is only a target (nothing after it is predicted),
    so the pass stops before it; a text with nothing to predict keeps one token."""
    return max(e.end - 1, max(e.start, 1))


def _batch_losses(lm: LoadedModel, batch: list, shared: int, prefix, prefix_rows: list[int]) -> list[float]:
    """One forward pass over the texts' tokens after the shared prefix (row r continues the prefix's
    row prefix_rows[r]), up to the one before their last own token; logits only where a text's own
    token is predicted."""
    device = next(lm.model.parameters()).device
    width = max(_stop(e) for e in batch) - shared
    ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    rows, cols, spans, targets = [], [], [], []
    for row, e in enumerate(batch):
        ids[row, : _stop(e) - shared] = torch.tensor(e.ids[shared : _stop(e)])
        mask[row, : _stop(e)] = 1
        first = max(e.start, 1)  # targets ids[first:end], each predicted from the position before it
        n = max(e.end - first, 0)
        spans.append((len(cols), n))
        rows += [row] * n
        cols += range(first - 1 - shared, e.end - 1 - shared)
        targets += e.ids[first : e.end]
    if not cols:
        return [float("nan")] * len(batch)
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_select_indices(torch.tensor(prefix_rows, device=device))
    ids = ids.to(device)
    pick = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    with _targets_only.using(lm.model, [(lm.model.get_output_embeddings(), lambda h: h[pick][None])]):
        logits = lm.model(
            input_ids=ids, attention_mask=mask.to(device), past_key_values=cache, use_cache=cache is not None
        ).logits[0]  # (n_targets, vocab)
    targets = torch.tensor(targets, device=device)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return [float(loss[a : a + n].mean()) if n else float("nan") for a, n in spans]


def masked_neurons(n_layers: int, d_ff: int, global_ids) -> dict[int, Zeroed]:
    """Per-layer transforms that zero the given neurons (global id = layer * d_ff + index)."""
    ids = np.unique(np.asarray(global_ids, dtype=np.int64))
    if ids.size and (ids[0] < 0 or ids[-1] >= n_layers * d_ff):
        raise ValueError(f"neuron ids must lie in [0, {n_layers * d_ff}) for {n_layers} x {d_ff} neurons")
    per_layer = {}
    for layer in np.unique(ids // d_ff):
        keep = torch.ones(d_ff, dtype=torch.bool)
        keep[torch.from_numpy(ids[ids // d_ff == layer] % d_ff)] = False
        per_layer[int(layer)] = Zeroed(keep)
    return per_layer


def kept_neurons(n_layers: int, d_ff: int, global_ids) -> dict[int, Zeroed]:
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
