"""On-the-fly reductions of FFN activations for capture, and their merge across chunks.

A `ChunkReducer` hooks every layer's down projection for one chunk of prompts and never keeps a
tokens x neurons float matrix beyond the current batch.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from core import models

PARTIAL_NAMES = ("sum_act", "sum_abs", "fire_count", "hist_abs", "hist_out", "top_val", "top_prompt", "top_pos")


class ChunkReducer:
    def __init__(self, n_layers: int, d_ff: int, config, norms: list[torch.Tensor]):
        self.n_layers, self.d_ff, self.config = n_layers, d_ff, config
        self.norms = norms  # ||W_down[:, i]|| per layer, for the output-magnitude indicator
        self.k_fire = max(1, math.ceil(config.fire_fraction * d_ff))
        self.words = (d_ff + 63) // 64
        self.n_tokens = 0
        self.prompt_means: dict[int, list[np.ndarray]] = {}  # chunk-local prompt -> per layer
        self.prompt_bits: dict[int, list[np.ndarray]] = {}
        self.sums = np.zeros((3, n_layers, d_ff), dtype=np.float64)  # sum a, sum |a|, fire count
        self.hist = np.zeros((2, n_layers, config.hist_bins), dtype=np.int64)
        self.top_val = [None] * n_layers  # (k, d_ff) float32 running top |a|
        self.top_tok = [None] * n_layers  # (k, d_ff) int64 chunk-global token index
        self.tok_prompt: list[int] = []  # chunk-global token index -> chunk-local prompt
        self.tok_pos: list[int] = []  # -> position among the prompt's own tokens

    def set_batch(self, batch: list[int], spans: list[tuple[int, int]], width: int, device) -> None:
        """Tell the hooks which rows of the next forward pass belong to which prompt."""
        flat, owner = [], []
        for row, (start, end) in enumerate(spans):
            flat.extend(range(row * width + start, row * width + end))
            owner.extend([row] * (end - start))
            self.tok_prompt.extend([batch[row]] * (end - start))
            self.tok_pos.extend(range(end - start))
        self.batch = batch
        self.flat = torch.tensor(flat, dtype=torch.long, device=device)
        self.owner = torch.tensor(owner, dtype=torch.long, device=device)
        counts = torch.bincount(self.owner, minlength=len(batch))
        self.counts = counts.float().unsqueeze(1)  # (B, 1) tokens per prompt
        self.segment = torch.zeros((len(batch), len(flat)), device=device)  # (B, N) mean weights
        self.segment[self.owner, torch.arange(len(flat), device=device)] = 1.0 / counts.clamp_min(1)[self.owner].float()
        self.ones = torch.ones((1, len(flat)), device=device)
        self.bounds = np.concatenate([[0], np.cumsum(counts.cpu().numpy())])
        self.token_base = self.n_tokens
        self.n_tokens += len(flat)
        for i in batch:
            self.prompt_means[i] = [None] * self.n_layers
            self.prompt_bits[i] = [None] * self.n_layers

    @contextmanager
    def hooks(self, model):
        handles = []
        try:
            for layer in range(self.n_layers):
                module = models.down_proj(model, layer)
                handles.append(module.register_forward_pre_hook(self._hook(layer)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, layer: int):
        def hook(module, args):
            self.reduce(layer, args[0])

        return hook

    def reduce(self, layer: int, a: torch.Tensor) -> None:
        x = a.reshape(-1, a.shape[-1]).index_select(0, self.flat).float()  # (N, d_ff) own tokens
        absx = x.abs()
        means = self.segment @ absx  # (B, d_ff): a matmul is the fastest segment mean here
        out = absx * self.norms[layer].to(x.device)
        score = out if self.config.fire_indicator == "output" else absx
        top = score.topk(self.k_fire, dim=1, sorted=False)
        fire = torch.zeros((x.shape[0], self.words * 64), dtype=torch.bool, device=x.device)
        fire.scatter_(1, top.indices, True)
        self.sums[0, layer] += (self.ones @ x).squeeze(0).double().cpu().numpy()
        self.sums[1, layer] += (self.counts.T @ means).squeeze(0).double().cpu().numpy()
        self.sums[2, layer] += torch.bincount(top.indices.reshape(-1), minlength=self.d_ff).cpu().numpy()
        self._histograms(layer, absx, out)
        self._top(layer, absx)
        means, bits = means.half().cpu().numpy(), _pack(fire)
        for row, i in enumerate(self.batch):
            self.prompt_means[i][layer] = means[row]
            self.prompt_bits[i][layer] = bits[self.bounds[row] : self.bounds[row + 1]]

    def _histograms(self, layer: int, absx: torch.Tensor, out: torch.Tensor) -> None:
        """Distributions of |a| and output magnitude over every `hist_stride`-th token."""
        step, bins = self.config.hist_stride, self.config.hist_bins
        for slot, values in enumerate((absx[::step], out[::step])):
            normalised = values / values.amax(dim=1, keepdim=True).clamp_min(1e-12)
            self.hist[slot, layer] += torch.histc(normalised, bins, 0.0, 1.0).long().cpu().numpy()

    def _top(self, layer: int, absx: torch.Tensor) -> None:
        k = min(self.config.top_k, absx.shape[0])
        vals, idx = absx.topk(k, dim=0)  # (k, d_ff)
        idx = idx + self.token_base
        if self.top_val[layer] is not None:
            vals = torch.cat([self.top_val[layer], vals])
            idx = torch.cat([self.top_tok[layer], idx])
            vals, pick = vals.topk(min(self.config.top_k, vals.shape[0]), dim=0)
            idx = idx.gather(0, pick)
        self.top_val[layer], self.top_tok[layer] = vals, idx

    def partials(self, prompt_offset: int) -> list[tuple[int, str, np.ndarray]]:
        """The chunk's partial reductions as (layer, name, array) rows for `chunk_arrays`."""
        tok_prompt = np.asarray(self.tok_prompt, dtype=np.int32) + prompt_offset
        tok_pos = np.asarray(self.tok_pos, dtype=np.int32)
        rows = []
        for layer in range(self.n_layers):
            tok = self.top_tok[layer].cpu().numpy()
            rows += [
                (layer, "sum_act", self.sums[0, layer]),
                (layer, "sum_abs", self.sums[1, layer]),
                (layer, "fire_count", self.sums[2, layer]),
                (layer, "hist_abs", self.hist[0, layer]),
                (layer, "hist_out", self.hist[1, layer]),
                (layer, "top_val", self.top_val[layer].cpu().numpy().astype(np.float32)),
                (layer, "top_prompt", tok_prompt[tok]),
                (layer, "top_pos", tok_pos[tok]),
            ]
        return rows


def _pack(fire: torch.Tensor) -> np.ndarray:
    """bool (N, 64*W) -> uint64 (N, W); neuron j is bit j % 64 of word j // 64."""
    packed = np.packbits(fire.cpu().numpy(), axis=1, bitorder="little")
    return packed.view("<u8")


def merge_partials(store, run_id: str, n_layers: int, top_k: int, n_tokens: int):
    """Sum chunk partials per layer; merge the chunks' top examples (stable, chunk order)."""
    cur = store.cursor()
    sql = "SELECT chunk, layer, name, data FROM chunk_arrays WHERE run_id = ? ORDER BY chunk, layer"
    parts: dict[tuple[int, str], list[bytes]] = {}
    for _, layer, name, data in cur.execute(sql, [run_id]).fetchall():
        parts.setdefault((layer, name), []).append(bytes(data))
    dtypes = {"sum_act": np.float64, "sum_abs": np.float64, "fire_count": np.float64,
              "hist_abs": np.int64, "hist_out": np.int64, "top_val": np.float32,
              "top_prompt": np.int32, "top_pos": np.int32}  # fmt: skip
    layer_rows, top = [], {"layer": [], "neuron": [], "rank": [], "prompt_idx": [], "pos": [], "value": []}
    denom = max(n_tokens, 1)
    for layer in range(n_layers):
        arr = {name: [np.frombuffer(b, dtypes[name]) for b in parts[(layer, name)]] for name in PARTIAL_NAMES}
        layer_rows += [
            (layer, "mean_act", (sum(arr["sum_act"]) / denom).astype(np.float32)),
            (layer, "mean_abs", (sum(arr["sum_abs"]) / denom).astype(np.float32)),
            (layer, "fire_rate", (sum(arr["fire_count"]) / denom).astype(np.float32)),
            (layer, "hist_abs", sum(arr["hist_abs"]).astype(np.int64)),
            (layer, "hist_out", sum(arr["hist_out"]).astype(np.int64)),
        ]
        d_ff = layer_rows[-3][2].shape[0]
        vals = np.concatenate([v.reshape(-1, d_ff) for v in arr["top_val"]])
        prompt = np.concatenate([v.reshape(-1, d_ff) for v in arr["top_prompt"]])
        pos = np.concatenate([v.reshape(-1, d_ff) for v in arr["top_pos"]])
        order = np.argsort(-vals, axis=0, kind="stable")[:top_k]  # (k, d_ff)
        k = order.shape[0]
        top["layer"].append(np.full(k * d_ff, layer, np.int32))
        top["neuron"].append(np.repeat(np.arange(d_ff, dtype=np.int32), k))
        top["rank"].append(np.tile(np.arange(k, dtype=np.int32), d_ff))
        for name, source in (("prompt_idx", prompt), ("pos", pos), ("value", vals)):
            top[name].append(np.take_along_axis(source, order, 0).T.reshape(-1))
    top = {name: np.concatenate(chunks) for name, chunks in top.items()}
    return layer_rows, top
