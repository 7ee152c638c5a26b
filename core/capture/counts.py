"""Exact co-activation counts accumulated during capture (issue #16), for runs whose firing sample
does not hold every token: bricks partition these counts instead of counting the sample's bits.

Per layer, two int32 (d_ff, d_ff) symmetric matrices, stored as their upper triangles: over the
tokens of half A of the prompts and of half B (`prompts.halves` of COACT_SEED, 0: the default brick
seed), so stability needs no other pass and the run's counts are their sum. They grow with the model's
width, never with its tokens; they are summed where the capture runs (GPU or CPU, core.kernels.
coact_gpu: exact int8 or fp8 products into int32) over every token or a hashed sample of them
(CaptureConfig.count_tokens), and saved every `checkpoint_seconds` (600) and with the last chunk,
so a killed capture resumes from them.

The counted tokens' words are held where they are, up to HOLD_BYTES, and counted together (`flush`):
one product per layer and half over as many tokens as possible. Each product adds a (d_ff, d_ff)
result into the counts, memory traffic that products over few tokens pay again and again: counted
batch by batch they cost 0.45 s a chunk on an H200 (8B shape, benchmarks/gpu_capture.py --diagnose).
A save flushes first; on a GPU the products run on a stream of their own, beside the forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

from core.kernels import coact_gpu
from core.store import sample
from core.store.arrays import Lazy
from core.store.schema import COACT_ARRAYS as NAMES

MAX_TOKENS = 2**31 - 1  # int32 counts
ROWS = 256  # rows of a count matrix taken to or from its stored triangle at a time
HOLD_BYTES = 1 << 31  # counted words held before they are counted: a chunk of 64 x 512 tokens of an 8B
# shape holds 1.9 GB of them when every token is counted


def countable(n_tokens: int, rate: float, limit: int | None = None) -> bool:
    """Whether a run of n_tokens whose co-activations are counted over a hashed sample of `rate` fits
    int32 counts (`limit`, MAX_TOKENS unless given): every token when rate is 1, else the sample's
    expected size with six standard deviations to spare (a binomial count; its shards sum to it)."""
    limit = MAX_TOKENS if limit is None else limit
    if rate >= 1.0:
        return n_tokens <= limit
    expected = rate * n_tokens
    return expected + 6 * math.sqrt(expected * (1 - rate)) <= limit


class CoactCounts:
    """The run's counts so far, per layer and half, on the capture's device."""

    def __init__(self, n_layers: int, d_ff: int, half: np.ndarray, rate: float = 1.0, device="cpu"):
        """`half`: bool per prompt, True in half A; `rate`: the share of tokens counted (a hashed sample
        of (prompt, position), core.store.sample; 1: every token)."""
        self.n_layers, self.d_ff, self.half, self.rate = n_layers, d_ff, np.asarray(half, bool), rate
        self.device = torch.device(device)
        self.out = [[coact_gpu.counts_buffer(d_ff, self.device) for _ in range(n_layers)] for _ in NAMES]
        # the words not yet counted, per half and layer; at most HOLD_BYTES or 1/16 of the GPU's memory
        self.held = [[[] for _ in range(n_layers)] for _ in NAMES]
        self.held_bytes, self.hold = 0, HOLD_BYTES
        self.stream = None
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            self.hold = min(HOLD_BYTES, torch.cuda.get_device_properties(self.device).total_memory // 16)
        self.n_tokens = 0
        # the upper triangle with its diagonal of ROWS rows from a diagonal entry on: a stored triangle
        # is taken and put back ROWS rows at a time (`_blocks`)
        self.mask = torch.ones((ROWS, d_ff), dtype=torch.bool, device=self.device).triu()

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
        """Take one layer's batch to count: bits (N, 2W) int32 words (as the reducer packs them). Its
        counted rows are held until `flush` (or until `hold` bytes are held)."""
        words = bits.view(torch.int64)
        for held, picked in zip(self.held, rows, strict=True):
            if len(picked):
                held[layer].append(words.index_select(0, picked))
                self.held_bytes += held[layer][-1].nbytes
        if self.held_bytes >= self.hold:
            self.flush()

    def flush(self) -> None:
        """Count the held words: one product per layer and half. On a GPU it runs on the counts' own
        stream, after the work queued so far on the caller's."""
        if not self.held_bytes:
            return
        with self._on_stream():
            for out, held in zip(self.out, self.held, strict=True):
                for layer, parts in enumerate(held):
                    if parts:
                        if self.stream is not None:  # made on another stream: not reused while read here
                            for part in parts:
                                part.record_stream(self.stream)
                        coact_gpu.add_counts(torch.cat(parts) if len(parts) > 1 else parts[0], out[layer])
                        parts.clear()
        self.held_bytes = 0

    @contextlib.contextmanager
    def _on_stream(self):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def _settled(self) -> None:
        """Every count taken so far is in `out`, and the caller's stream waits for it."""
        self.flush()
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def arrays(self, last: bool = False) -> list[tuple[int, str, np.ndarray | Lazy]]:
        """(layer, name, int32 (d_ff (d_ff + 1) / 2,)) rows for the store's `arrays`: each matrix's upper
        triangle with its diagonal, row by row (core.kernels.coact.symmetric_from_upper reads it).

        `last`: nothing is counted after (the run's final save), so each triangle stays where it is
        until the store writes it (`Lazy`, made in the writing thread): host memory holds a few at
        a time, where a copy of all of them is 26 GB for an 8B shape. Otherwise each is copied now,
        since the capture goes on counting while the store writes."""
        self._settled()
        if last and self.stream is not None:  # the writing threads read `out` on streams of their own
            self.stream.synchronize()
        staging = None  # on a GPU each triangle leaves through a pinned buffer: pageable copies took 18 s
        if self.device.type == "cuda" and not last:  # for an 8B shape's 64 triangles
            staging = self._staging()
        rows = []
        for name, out in zip(NAMES, self.out, strict=True):
            for layer in range(self.n_layers):
                take = functools.partial(self._upper_of, out[layer])
                if last:
                    rows.append((layer, name, Lazy(take)))
                elif staging is None:
                    rows.append((layer, name, take()))
                else:
                    rows.append((layer, name, take(staging).copy()))
        return rows

    def _staging(self) -> torch.Tensor:
        """Room for one triangle on the host: pinned when it comes from a GPU."""
        n = self.d_ff * (self.d_ff + 1) // 2
        return torch.empty(n, dtype=torch.int32, pin_memory=self.device.type == "cuda")

    def _upper_of(self, matrix: torch.Tensor, staging: torch.Tensor | None = None) -> np.ndarray:
        """One count matrix's stored part on the host, in `staging` (room of its own when none is
        given), taken ROWS rows at a time."""
        staging = self._staging() if staging is None else staging
        for (r0, r1, lo, hi), mask in self._blocks():
            staging[lo:hi].copy_(matrix[r0:r1, r0 : self.d_ff][mask])
        return staging.numpy()

    def load(self, store, run_id: str) -> None:
        """Continue from the counts the run committed (a resume); zeros when it committed none."""
        self._settled()
        for name, out in zip(NAMES, self.out, strict=True):
            for layer in range(self.n_layers):
                saved = store.read_array(run_id, name, layer)
                if saved is not None:  # the upper triangle is what add_counts accumulates
                    out[layer].zero_()
                    for (r0, r1, lo, hi), mask in self._blocks():
                        part = torch.from_numpy(np.array(saved[lo:hi])).to(self.device)
                        out[layer][r0:r1, r0 : self.d_ff][mask] = part

    def _blocks(self):
        """(first row, end row, where their part of the stored triangle starts and ends) and their mask
        in the matrix's columns from the first row on, for each ROWS rows: a block's gather indexes
        ROWS x d_ff at most (16 B an element: 59 MB on an 8B shape, 1.6 GB for a whole triangle)."""
        d = self.d_ff
        start = lambda r: r * d - r * (r - 1) // 2  # noqa: E731 (where row r's part starts)
        for r0 in range(0, d, ROWS):
            r1 = min(r0 + ROWS, d)
            yield (r0, r1, start(r0), start(r1)), self.mask[: r1 - r0, : d - r0]
