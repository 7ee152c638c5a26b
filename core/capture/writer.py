"""Committing a capture's chunks: each chunk's rows in one transaction, in chunk order, one in flight.

On a GPU the transaction runs in a background thread while the device computes the next chunk (the
host is otherwise idle); on the CPU it runs in line, since the forward pass uses every core. Either
way a chunk lands whole or not at all, so a killed capture resumes from its last committed chunk.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from core.capture import experts as expert_routes
from core.capture.reduce import merge_top, merge_top_in_order, split_top, top_rows
from core.store import Store, sample

BACKGROUND: bool | None = None  # None: in a background thread on a GPU only (tests force either)


class ChunkWriter:
    """Writes a run's chunks with its running top examples (`state`, merged over every committed
    chunk; None for a shard, which keeps each chunk's own) and, when given, its co-activation counts."""

    def __init__(self, store: Store, run_id: str, tokenizer, rate: float, state, done: set[int], device: str):
        self.store, self.run_id, self.tokenizer, self.rate, self.state = store, run_id, tokenizer, rate, state
        self.covered = set(done)  # the chunks the run's saved counts will cover
        self.device = torch.device(device)
        if state and self.device.type != "cpu":  # a GPU merges the running top examples where it is
            self.state = [tuple(torch.from_numpy(a).to(self.device) for a in state[0])]
        background = self.device.type != "cpu" if BACKGROUND is None else BACKGROUND
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="chunk-writer") if background else None
        self.pending: Future | None = None
        self.write_seconds = 0.0  # time spent committing, in whichever thread

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            self.wait()
        except Exception:
            if kind is None:  # the capture's own error, if any, is the one to report
                raise
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)

    def submit(self, chunk, lo, encoded, reducer, seconds, routes=None, save=True, arrays=None) -> None:
        """Commit one chunk: its partial reductions are taken from the device here, the rest is written
        after the previous chunk's commit. `save`: the running top examples go with it; `arrays`: the
        run's co-activation counts so far (core.capture.counts), which replace the saved ones."""
        rows, top = split_top(reducer.partials(lo))  # device work stays on the capture's thread
        top_state = None
        if self.state is None:  # a shard keeps each chunk's own top examples
            rows += top_rows(top)
        else:
            top_state = self._merge(top, reducer.config, save)
        job = functools.partial(
            self._write, chunk, lo, encoded, reducer, rows, top_state, seconds, routes, arrays
        )
        self.wait()
        if self.pool is None:
            job()
        else:
            self.pending = self.pool.submit(job)

    def wait(self) -> None:
        """Until the chunk in flight is committed; its error, if it failed."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def _merge(self, top, config, save: bool) -> list | None:
        """Merge a chunk's top examples into the running state; its `top_state` rows when `save`."""
        if self.device.type == "cpu":
            self.state = [merge_top([*self.state, top], config.top_k, config.chunk_prompts)]
            return top_rows(self.state[0]) if save else None
        new = tuple(torch.from_numpy(a).to(self.device) for a in top)
        self.state = [merge_top_in_order(self.state[0] if self.state else None, new, config.top_k)]
        return top_rows(tuple(t.cpu().numpy() for t in self.state[0])) if save else None

    def _write(self, chunk, lo, encoded, reducer, rows, top_state, seconds, routes, arrays) -> None:
        started = time.perf_counter()
        tokens = {"prompt_idx": [], "pos": [], "token_id": [], "token": [], "truncated": []}
        for i, e in enumerate(encoded):
            own = e.ids[e.start : e.end]
            tokens["prompt_idx"] += [lo + i] * len(own)
            tokens["pos"] += list(range(len(own)))
            tokens["token_id"] += own
            tokens["token"] += self.tokenizer.convert_ids_to_tokens(own)
            tokens["truncated"] += [e.truncated] * len(own)
        self.covered.add(chunk)
        n = len(encoded)
        self.store.write_chunk(
            self.run_id,
            chunk,
            lo,
            acts=[reducer.prompt_means[i] for i in range(n)],
            bits=[sampled(reducer.prompt_bits[i], lo + i, self.rate) for i in range(n)],
            tokens=tokens,
            partials=rows + expert_routes.partials(routes),  # MoE: the router's choices
            top_state=top_state,
            n_tokens=reducer.n_tokens,
            seconds=seconds,
            arrays=arrays,
            covered=None if arrays is None else sorted(self.covered),
            acts_file=self.rate < 1.0,  # a run with its counts beside the cache: the means go there too
        )
        self.write_seconds += time.perf_counter() - started


def sampled(bits: list[np.ndarray], prompt_idx: int, rate: float) -> list[np.ndarray]:
    """One prompt's per-layer firing bits, only the rows of its tokens in the run's sample."""
    if rate >= 1.0 or not bits:
        return bits
    kept = sample.in_sample(prompt_idx, np.arange(len(bits[0])), rate)
    return [layer[kept] for layer in bits]
