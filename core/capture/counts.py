"""Exact co-activation counts accumulated during capture (issue #16), for runs whose firing sample
does not hold every token: bricks partition these counts instead of counting the sample's bits.

Per layer, two int32 (d_ff, d_ff) symmetric matrices, stored as their upper triangles: over the
tokens of half A of the prompts and of half B (`prompts.halves` of COACT_SEED, 0: the default brick
seed), so stability needs no other pass and the run's counts are their sum. They grow with the model's
width, never with its tokens; they are summed where the capture runs (GPU or CPU, core.kernels.
coact_gpu: exact int8 products into int32) over every token or a hashed share of them (count_rate),
and saved every `checkpoint_seconds` and with the last chunk, so a killed capture resumes from them.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from core.kernels import coact_gpu
from core.store import sample
from core.store.schema import COACT_ARRAYS as NAMES

MAX_TOKENS = 2**31 - 1  # int32 counts


class CoactCounts:
    """The run's counts so far, per layer and half, on the capture's device."""

    def __init__(self, n_layers: int, d_ff: int, half: np.ndarray, rate: float = 1.0, device="cpu"):
        """`half`: bool per prompt, True in half A; `rate`: the share of tokens counted (a hashed sample
        of (prompt, position), core.store.sample; 1: every token)."""
        self.n_layers, self.d_ff, self.half, self.rate = n_layers, d_ff, np.asarray(half, bool), rate
        self.device = torch.device(device)
        self.out = [[coact_gpu.counts_buffer(d_ff, self.device) for _ in range(n_layers)] for _ in NAMES]
        self.n_tokens = 0

    def rows(self, prompt: np.ndarray, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices, among a batch's own tokens (each row's prompt and position), of the counted
        tokens of half A and of half B."""
        counted = sample.in_sample(prompt, pos, self.rate)
        in_a = self.half[prompt]
        self.n_tokens += int(counted.sum())
        if self.n_tokens > MAX_TOKENS:
            raise OverflowError("co-activation counts are int32: a run counts at most 2**31 - 1 tokens")
        return tuple(
            torch.from_numpy(np.flatnonzero(counted & side)).to(self.device, non_blocking=True)
            for side in (in_a, ~in_a)
        )

    def add(self, layer: int, bits: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Count one layer's batch: bits (N, 2W) int32 words (as the reducer packs them)."""
        words = bits.view(torch.int64)
        for out, picked in zip(self.out, rows, strict=True):
            if len(picked):
                coact_gpu.add_counts(words.index_select(0, picked), out[layer])

    def arrays(self) -> list[tuple[int, str, np.ndarray]]:
        """(layer, name, int32 (d_ff (d_ff + 1) / 2,)) rows for the store's `arrays`: each matrix's upper
        triangle with its diagonal, row by row (core.kernels.coact.symmetric_from_upper reads it)."""
        return [
            (layer, name, out[layer][: self.d_ff, : self.d_ff][self._upper].cpu().numpy())
            for name, out in zip(NAMES, self.out, strict=True)
            for layer in range(self.n_layers)
        ]

    def load(self, store, run_id: str) -> None:
        """Continue from the counts the run committed (a resume); zeros when it committed none."""
        for name, out in zip(NAMES, self.out, strict=True):
            for layer in range(self.n_layers):
                saved = store.read_array(run_id, name, layer)
                if saved is not None:  # the upper triangle is what add_counts accumulates
                    out[layer].zero_()
                    packed = torch.from_numpy(np.array(saved)).to(self.device)
                    out[layer][: self.d_ff, : self.d_ff][self._upper] = packed

    @functools.cached_property
    def _upper(self) -> torch.Tensor:
        """bool (d_ff, d_ff): the upper triangle with its diagonal, the stored part of each matrix (made
        once: 205 MB on an 8B shape)."""
        return torch.ones((self.d_ff, self.d_ff), dtype=torch.bool, device=self.device).triu()
