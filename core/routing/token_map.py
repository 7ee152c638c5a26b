"""The learned token router's map: per layer, a reduced-rank least-squares map from the FFN input x to
each brick's activation mass sum |a|, fitted on a run's prompts in one pass (normal equations)."""

from __future__ import annotations

import numpy as np
import torch

from core.bricks import candidates as bricks
from core.bricks import scores
from core.live import sparse
from core.prompts import encode
from core.store import Store

MAP_KIND = "router_map"  # store.put_arrays kind of learned token maps, shared by routers of every budget
MAP_ARRAYS = ("w_in", "w_out", "bias")


def brick_assignment(store: Store, run, size: int) -> np.ndarray:
    """int (L, d_ff): each neuron's brick within its layer; size 1 makes every neuron a brick."""
    if size == 1:
        return np.tile(np.arange(run.d_ff), (run.n_layers, 1))
    found = bricks.compute_bricks(store, run.run_id, bricks.BrickParams(method="coact", size=size))
    brick_of = np.full((run.n_layers, run.d_ff), -1)
    for brick in found:
        layer, index = brick.neurons // run.d_ff, brick.neurons % run.d_ff
        brick_of[layer, index] = brick_of[layer].max() + 1
    for layer in range(run.n_layers):  # a neuron in no brick becomes one of its own
        loose = np.flatnonzero(brick_of[layer] < 0)
        brick_of[layer, loose] = brick_of[layer].max() + 1 + np.arange(len(loose))
    return brick_of


class _Normal:
    """Least-squares normal equations x -> brick mass for one layer, accumulated over tokens."""

    def __init__(self, brick_of: np.ndarray, d_model: int):
        self.brick_of = torch.from_numpy(brick_of)
        self.n_bricks = int(brick_of.max()) + 1
        self.xtx = torch.zeros(d_model + 1, d_model + 1, dtype=torch.float64)
        self.xty = torch.zeros(d_model + 1, self.n_bricks, dtype=torch.float64)
        self.valid: torch.Tensor | None = None  # (B, T) bool: positions of the current batch to use

    def __call__(self, f: sparse.Ffn, x: torch.Tensor) -> torch.Tensor:
        a = f.activations(x)
        valid = self.valid.to(x.device)
        rows, acts = x[valid].float(), a[valid].abs().float()  # (n, d), (n, d_ff)
        mass = acts.new_zeros((len(acts), self.n_bricks)).index_add_(1, self.brick_of.to(x.device), acts)
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], dim=1)
        self.xtx += (rows.T @ rows).double().cpu()  # float32 within a batch, float64 across batches
        self.xty += (rows.T @ mass).double().cpu()
        return f.down(a)

    def solve(self, rank: int, ridge: float = 1e-2) -> dict:
        """Ridge regression of the masses on x with an intercept, cut to `rank` by reduced-rank
        regression (the top principal directions of the fitted masses), so routing costs about
        rank * (d_model + n_bricks) multiply-adds per token."""
        n = self.xtx[-1, -1]
        mx, my = self.xtx[:-1, -1] / n, self.xty[-1] / n
        cxx = self.xtx[:-1, :-1] - n * torch.outer(mx, mx)  # centred sums of squares
        cxy = self.xty[:-1] - n * torch.outer(mx, my)
        eye = torch.eye(len(cxx), dtype=cxx.dtype)
        w = torch.linalg.solve(cxx + ridge * torch.trace(cxx) / len(cxx) * eye, cxy)  # (d, n_bricks)
        v = torch.eye(self.n_bricks, dtype=w.dtype)
        if 0 < rank < self.n_bricks:
            v = torch.linalg.eigh(w.T @ cxx @ w)[1][:, -rank:]  # (n_bricks, r), largest eigenvalues
        bias = my - mx @ w @ v @ v.T
        return {"w_in": (w @ v).float(), "w_out": v.T.float(), "bias": bias.float()}


def fit_token(lm, store, run, params, progress) -> dict:
    brick_of = brick_assignment(store, run, params.brick_size)
    if params.oracle:
        return {"brick_of": brick_of}
    if (cached := store.get_arrays(run.run_id, MAP_KIND, params.map_key())) is not None:
        return {"brick_of": brick_of} | cached[0]
    half = np.flatnonzero(scores.prompt_halves(store, run.run_id, params.seed))
    if params.fit_prompts:
        half = np.sort(np.random.default_rng(params.seed).permutation(half)[: params.fit_prompts])
    rows = store.prompts(run.run_id)
    limit, chat_template = run.settings["max_tokens"], run.settings["chat_template"]
    encoded = [encode(lm.tokenizer, rows[i][3], limit, chat_template) for i in half]
    normals = {layer: _Normal(brick_of[layer], lm.info.d_model) for layer in range(run.n_layers)}
    device = next(lm.model.parameters()).device
    with torch.inference_mode(), sparse.sparse(lm.model, normals):
        for b in range(0, len(encoded), 8):
            ids, mask = _padded([e.ids for e in encoded[b : b + 8]], lm.tokenizer.pad_token_id or 0)
            for normal in normals.values():
                normal.valid = mask.bool()
            lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            if progress:
                progress(min(b + 8, len(encoded)), len(encoded), "fitting the token router")
    solved = [normals[layer].solve(params.router_rank) for layer in range(run.n_layers)]
    learned = {k: torch.stack([s[k] for s in solved]).numpy() for k in MAP_ARRAYS}
    store.put_arrays(run.run_id, MAP_KIND, params.map_key(), learned)
    return {"brick_of": brick_of} | learned


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask
