"""The one reader of a run's per-token firing (issue #16): exact co-activation counts per layer, over
all tokens or the tokens of some prompts, and the firing bits of the run's token sample with the
tokens they belong to. Candidates, coherence, distinctive tokens and explanations read only this.

A run whose sample holds every token (every run that fits `CaptureConfig.sample_bytes`, and every
run of format 2) gives its counts from the bits. A run that keeps a partial sample stored exact
counts per layer over the two halves of its prompts (core.capture.counts); its counts come from
those, and the sample is what the readers that need single tokens see.
"""

from __future__ import annotations

import functools

import numpy as np

from core.bricks import scores
from core.errors import BricklabError
from core.kernels import coact as kernels
from core.store import Run, Store, sample
from core.store.schema import COACT_ARRAYS, COACT_SEED


class RunFiring:
    """A run's per-token firing as bricks read it; reads lazily, each query once.

    Counting stays here, not in the store: core/store does SQL and bytes, core/bricks computes."""

    def __init__(self, store: Store, run: Run):
        self.store, self.run = store, run

    @functools.cached_property
    def complete(self) -> bool:
        """Whether the sample holds every token of the run (then its bits give exact counts)."""
        return self.store.sample_complete(self.run.run_id)

    @functools.cached_property
    def token_prompts(self) -> np.ndarray:
        """int32 (n_tokens,): the prompt of every token of the run, in (prompt, position) order."""
        return self.store.token_prompts(self.run.run_id)

    @functools.cached_property
    def sample_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_idx int32, pos int32) of each sample row: the rows of `sample`."""
        return self.store.sample_rows(self.run.run_id)

    @functools.cached_property
    def sample_index(self) -> np.ndarray:
        """int64 (n_sample,): each sample row's index among the run's tokens (`token_prompts` order);
        positions number a prompt's own tokens from 0, as the capture writes them."""
        prompt, pos = self.sample_rows
        starts = np.concatenate(
            [[0], np.cumsum(np.bincount(self.token_prompts, minlength=self.run.n_prompts))]
        )
        return starts[prompt].astype(np.int64) + pos

    def sample(self, layer: int) -> np.ndarray:
        """uint64 (n_sample, words): one layer's packed firing bits over the sample's tokens."""
        return self.store.firing_sample(self.run.run_id, int(layer))

    @functools.cached_property
    def counted(self) -> np.ndarray:
        """bool per token of the run (`token_prompts` order): the tokens its counts sum over. Every token,
        unless the run stored counts over a hashed share of its tokens (CaptureConfig.count_tokens)."""
        rate = self.store.count_rate(self.run.run_id)
        if self.complete or rate >= 1.0:
            return np.ones(len(self.token_prompts), bool)
        return sample.in_sample(*self.store.token_places(self.run.run_id), rate)

    def n_tokens(self, prompts: np.ndarray | None = None) -> int:
        """How many of the tokens `counts` sums over belong to the prompts where `prompts` (bool) is
        True (all)."""
        if prompts is None:
            return int(self.counted.sum())
        return int((prompts[self.token_prompts] & self.counted).sum())

    def counts(self, layer: int) -> np.ndarray:
        """int32 (d_ff, d_ff): co-activation counts of one layer over every token of the run."""
        if not self.complete:
            a, b = self._stored(layer)
            return a + b
        return kernels.coactivation_counts(self.sample(layer), self.run.d_ff)

    def split_counts(self, layer: int, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int32 (d_ff, d_ff) twice: one layer's co-activation counts over the tokens of the prompts
        where `prompts` (bool, per prompt) is True, and over the rest; they sum to `counts`."""
        if not self.complete:
            if np.array_equal(prompts, self.stored_halves):
                return self._stored(layer)
            raise BricklabError(
                f"Run '{self.run.run_id}' keeps the firing of only a sample of its tokens, and its exact "
                f"co-activation counts are split by the prompt halves of seed {COACT_SEED} only.",
                f"Use seed {COACT_SEED} (or no stability), or capture with a larger sample_bytes.",
            )
        bits = self.sample(layer)
        rows = prompts[self.sample_rows[0]]
        return tuple(kernels.coactivation_counts(bits[r], self.run.d_ff) for r in (rows, ~rows))

    @functools.cached_property
    def stored_halves(self) -> np.ndarray:
        """bool per prompt: the half A whose counts the capture stored apart (seed COACT_SEED)."""
        return scores.prompt_halves(self.store, self.run.run_id, COACT_SEED)

    def _stored(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The counts the capture stored over half A and half B of the prompts."""
        pair = [self.store.read_array(self.run.run_id, name, int(layer)) for name in COACT_ARRAYS]
        if any(a is None for a in pair):
            raise BricklabError(
                f"Run '{self.run.run_id}' keeps the firing of only a sample of its tokens, and its "
                f"co-activation counts of layer {layer} are missing from the cache.",
                "Delete the run and capture it again.",
            )
        return tuple(kernels.symmetric_from_upper(np.asarray(a, np.int32), self.run.d_ff) for a in pair)
