"""On-the-fly reductions of FFN activations for capture, and their merge across chunks.

A `ChunkReducer` hooks every layer's down projection for one chunk of prompts and never keeps a
tokens x neurons float matrix beyond the current batch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math

import numpy as np
import torch

from core.live import interventions
from core.store.schema import TOP_ARRAYS  # float32, int32, int32 (k, d_ff) per layer

# CUDA: the fused reductions run on a stream beside the forward pass's, taking what it leaves of the
# device; in line they cost the same within noise (benchmarks/gpu_capture.py --inline compares them)
OVERLAP = True


class ChunkReducer:
    """Reduces one chunk's activations where they are (CPU or GPU); the host gets one copy per batch.

    Top examples are, per neuron, the `top_k` prompts whose strongest own token has the largest |a|
    (one example per prompt, so a neuron's examples show different prompts).
    """

    def __init__(
        self, n_layers: int, d_ff: int, config, norms: list, device="cpu", fused=None, overlap=None,
        counts=None, first_prompt: int = 0,
    ):  # fmt: skip
        """`counts`: a `core.capture.counts.CoactCounts` to add each batch's firing into (runs whose
        firing sample is partial), `first_prompt` the run's index of the chunk's first prompt."""
        self.n_layers, self.d_ff, self.config = n_layers, d_ff, config
        self.counts, self.first_prompt = counts, first_prompt
        self.device = torch.device(device)
        # bf16 on CUDA: Triton kernels (kernels.select_gpu, kernels.reduce_gpu); fused=False keeps torch's ops
        if fused is None:
            fused = self.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self.fused = fused and config.hist_bins <= 128  # the kernel's histograms have 128 slots
        self.norms = [n.to(self.device) for n in norms]  # ||W_down[:, i]||: |a| -> output magnitude
        self.k_fire = max(1, math.ceil(config.fire_fraction * d_ff))
        self.words = (d_ff + 63) // 64
        self.n_tokens = 0
        self.prompt_means: dict[int, list[np.ndarray]] = {}  # chunk-local prompt -> per layer
        self.prompt_bits: dict[int, list[np.ndarray]] = {}
        dev = self.device
        self.sums = torch.zeros((2, n_layers, d_ff), dtype=torch.float64, device=dev)  # sum a, sum |a|
        self.fire_count = torch.zeros((n_layers, d_ff), dtype=torch.int64, device=dev)
        self.hist = torch.zeros((2, n_layers, config.hist_bins), dtype=torch.float32, device=dev)
        # per layer, per batch: (B, d_ff) best |a| of each prompt, (B,) its prompt, (B, d_ff) its position
        self.best: list[list[tuple]] = [[] for _ in range(n_layers)]
        self.pending: list = []
        self.batch_out = self.batch_host = None  # the fused path's device buffers, and their host copies
        if self.fused:  # what the kernels add into atomically: int32 counts, 128-slot histograms
            self.fire32 = torch.zeros((n_layers, d_ff), dtype=torch.int32, device=dev)
            self.hist32 = torch.zeros((n_layers, 2, 128), dtype=torch.int32, device=dev)
            self.norms_bf16 = [n.to(torch.bfloat16) for n in self.norms]
        self.side = None  # with `overlap`, the fused reductions run on a stream beside the forward pass
        if self.device.type == "cuda":
            self.copies = torch.cuda.Stream(dev)  # host copies run beside the next batch's kernels
            if self.fused and (OVERLAP if overlap is None else overlap):
                self.side = torch.cuda.Stream(dev)

    def set_batch(self, batch: list[int], spans: list[tuple[int, int]], width: int) -> None:
        """Tell the hooks which rows of the next forward pass belong to which prompt.

        With `overlap`, the next batch's forward pass starts while the side stream still reduces this
        one's last layers: the index tensors below are made on the forward's stream and read on the
        side stream, so each is recorded there (its memory is not reused before the side stream has
        read it) instead of the forward waiting for the side stream.
        """
        lengths = np.array([end - start for start, end in spans])
        flat = np.concatenate([np.arange(r * width + s, r * width + e) for r, (s, e) in enumerate(spans)])
        owner = np.repeat(np.arange(len(batch)), lengths)
        n, longest, dev = len(flat), int(lengths.max()), self.device
        segment = np.zeros((len(batch), n), dtype=np.float32)  # (B, N): row b averages prompt b
        segment[owner, np.arange(n)] = 1.0 / lengths[owner]
        # (B, longest) rows of the (N + 1, d_ff) own-token matrix; row N is all zeros (padding)
        padded = np.full((len(batch), longest), n, dtype=np.int64)
        for row, (lo, length) in enumerate(zip(np.cumsum(lengths) - lengths, lengths, strict=True)):
            padded[row, :length] = np.arange(lo, lo + length)
        self.batch, self.bounds = batch, np.concatenate([[0], np.cumsum(lengths)])
        self.flat = torch.from_numpy(flat).to(dev, non_blocking=True)
        self.padded = torch.from_numpy(padded.reshape(-1)).to(dev, non_blocking=True)
        self.padded_shape = (len(batch), longest)
        self.batch_prompt = torch.tensor(batch, dtype=torch.int32, device=dev)
        self.n_tokens += n
        self.pending = [None] * self.n_layers
        self.batch_out = self.batch_host = None  # the fused path's (L, B, d) means, (L, N, 2W) bits
        self.segment = torch.from_numpy(segment).to(dev)
        self.ones = torch.ones((1, n), device=dev)
        self.lengths = torch.from_numpy(lengths.astype(np.float32))[None].to(dev)  # (1, B)
        first = np.array([r * width + s for r, (s, _) in enumerate(spans)], dtype=np.int32)
        self.first_row = torch.from_numpy(first).to(dev)  # (B,) row of each prompt's first own token
        self.own_lengths = torch.from_numpy(lengths.astype(np.int32)).to(dev)
        if self.counts is not None:  # the run's prompt and the position of each own-token row
            pos = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            self.count_rows = self.counts.rows(self.first_prompt + np.asarray(batch)[owner], pos)
        if self.side is not None:
            rows = self.count_rows if self.counts is not None else ()
            for t in (self.flat, self.padded, self.batch_prompt, self.segment, self.ones, self.lengths,
                      self.first_row, self.own_lengths, *rows):  # fmt: skip
                t.record_stream(self.side)

    @contextlib.contextmanager
    def forward_stream(self):
        """With `overlap`, run the forward pass on a high-priority stream: the reductions beside it take
        what the forward pass leaves of the device. The current stream waits for it afterwards."""
        if self.side is None:
            yield
            return
        outer = torch.cuda.current_stream(self.device)
        high = torch.cuda.Stream(self.device, priority=-1)
        high.wait_stream(outer)
        try:
            with torch.cuda.stream(high):
                yield
        finally:
            outer.wait_stream(high)
            outer.wait_stream(self.side)

    def hooks(self, model):
        """Observe every layer through the shared dispatcher: other sessions' passes are not seen."""
        return interventions.transforms(
            model, {layer: self._observer(layer) for layer in range(self.n_layers)}
        )

    def _observer(self, layer: int):
        def observe(a: torch.Tensor) -> torch.Tensor:
            self.reduce(layer, a)
            return a

        return observe

    def reduce(self, layer: int, a: torch.Tensor) -> None:
        """All reductions of one layer's activation, in the model's dtype; nothing waits for the device."""
        if self.fused and a.dtype == torch.bfloat16:
            return self._reduce_fused(layer, a)
        x = a.reshape(-1, a.shape[-1]).index_select(0, self.flat)  # (N, d_ff) own tokens
        absx = x.abs()
        out = absx * self.norms[layer].to(x.dtype)
        score = out if self.config.fire_indicator == "output" else absx
        fired = score.topk(self.k_fire, dim=1, sorted=False).indices  # (N, k_fire)
        self.pending[layer] = (self._means(absx), self._bits(fired))
        if self.counts is not None:
            self.counts.add(layer, self.pending[layer][1], self.count_rows)
        self.fire_count[layer].scatter_add_(0, fired.reshape(-1), torch.ones_like(fired).reshape(-1))
        self.sums[0, layer] += (self.ones.to(x.dtype) @ x).squeeze(0).double()
        self.sums[1, layer] += (self.lengths @ self.pending[layer][0].float()).squeeze(0).double()
        self._histograms(layer, absx, out)
        self._top(layer, absx)

    def _reduce_fused(self, layer: int, a: torch.Tensor) -> None:
        """The same reductions in two Triton kernels that each read the activation once (GPU, bf16)."""
        a = a.reshape(-1, a.shape[-1]).contiguous()
        if self.side is None:
            return self._reduce_kernels(layer, a)
        self.side.wait_stream(torch.cuda.current_stream(a.device))
        a.record_stream(self.side)  # the forward pass may free it before the side stream has read it
        with torch.cuda.stream(self.side):
            self._reduce_kernels(layer, a)

    def _reduce_kernels(self, layer: int, a: torch.Tensor) -> None:
        from core.kernels import reduce_gpu, select_gpu

        cfg, dev = self.config, a.device
        if self.batch_out is None:  # one buffer per batch: take_batch needs no stacking copy
            shapes = ((len(self.batch), self.d_ff), (len(self.flat), 2 * self.words))
            dtypes = (torch.float16, torch.int32)
            self.batch_out = tuple(
                torch.empty((self.n_layers, *shape), dtype=dtype, device=dev)
                for shape, dtype in zip(shapes, dtypes, strict=True)
            )
            if dev.type == "cuda":  # each layer's results leave as soon as they exist
                self.batch_host = tuple(
                    torch.empty((self.n_layers, *shape), dtype=dtype, pin_memory=True)
                    for shape, dtype in zip(shapes, dtypes, strict=True)
                )
        means, bits = self.batch_out[0][layer], self.batch_out[1][layer]
        select_gpu.select_pack(
            a, self.flat, self.norms_bf16[layer], self.k_fire, self.fire32[layer], self.hist32[layer],
            cfg.hist_stride, cfg.hist_bins, cfg.fire_indicator == "output", out=bits,
            count_after=self.batch_host is None,
        )  # fmt: skip
        if self.counts is not None:
            self.counts.add(layer, bits, self.count_rows)
        longest = self.padded_shape[1]
        mean, total, best, pos = reduce_gpu.prompt_reduce(a, self.first_row, self.own_lengths, longest)
        means.copy_(mean)
        self.pending[layer] = (means, bits)
        self.sums[0, layer] += total.sum(0, dtype=torch.float64)
        self.sums[1, layer] += (self.lengths @ means.float()).squeeze(0).double()
        self.best[layer].append((best, self.batch_prompt, pos))
        if self.batch_host is None:
            return
        # so the batch's last copy is one layer's, not all of them
        self.copies.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(self.copies):
            self.batch_host[0][layer].copy_(means, non_blocking=True)
            self.batch_host[1][layer].copy_(bits, non_blocking=True)

    def _means(self, absx: torch.Tensor) -> torch.Tensor:
        """(B, d_ff) mean |a| over each prompt's own tokens: one small matmul."""
        return (self.segment.to(absx.dtype) @ absx).half()

    def _bits(self, fired: torch.Tensor) -> torch.Tensor:
        """(N, 2W) int32 words with bit j % 32 of word j // 32 set for each fired neuron j.

        Each bit is set once, so a scatter-add is an OR; two int32 words read as one little-endian
        uint64 give the layout of core.kernels.coact.pack_bits.
        """
        words = torch.zeros((fired.shape[0], self.words * 2), dtype=torch.int32, device=fired.device)
        bit = torch.bitwise_left_shift(torch.ones_like(fired, dtype=torch.int32), (fired % 32).int())
        return words.scatter_add_(1, fired // 32, bit)

    def take_batch(self):
        """Start copying the batch's per-prompt means and bits to the host; `file` finishes it.

        On CUDA the copy is asynchronous, so the host files batch i while the device runs batch i+1.
        """
        if self.batch_out is not None and self.batch_host is not None:  # fused, CUDA: copies under way
            from core.kernels import select_gpu

            with torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext():
                select_gpu.count_bits(self.batch_out[1], self.fire32, self.d_ff)  # every layer at once
            done = torch.cuda.Event()
            done.record(self.copies)
            for t in self.batch_out:
                t.record_stream(self.copies)  # not reused before the copies have read it
            self.pending = []
            return self.batch, self.bounds, self.batch_host, done
        if self.batch_out is not None:
            means, bits = self.batch_out
        else:
            means = torch.stack([m for m, _ in self.pending])  # (L, B, d_ff) float16
            bits = torch.stack([b for _, b in self.pending])  # (L, N, 2W) int32
        if means.is_cuda:
            host = (torch.empty(means.shape, dtype=means.dtype, pin_memory=True),
                    torch.empty(bits.shape, dtype=bits.dtype, pin_memory=True))  # fmt: skip
            stream = getattr(self, "copies", torch.cuda.current_stream())
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # on a side stream the next batch need not wait for it
                host[0].copy_(means, non_blocking=True)
                host[1].copy_(bits, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            means.record_stream(stream)  # their memory is not reused before the copy has read it
            bits.record_stream(stream)
        else:
            host, done = (means, bits), None
        self.pending = []
        return self.batch, self.bounds, host, done

    def file(self, taken) -> None:
        """Wait for a batch's copy and split it into per-prompt, per-layer arrays."""
        batch, bounds, (means, bits), done = taken
        if done is not None:
            done.synchronize()
        means, bits = means.numpy(), bits.numpy().view("<u8")
        for row, i in enumerate(batch):
            lo, hi = bounds[row], bounds[row + 1]
            self.prompt_means[i] = [means[layer, row] for layer in range(self.n_layers)]
            self.prompt_bits[i] = [bits[layer, lo:hi] for layer in range(self.n_layers)]

    def _histograms(self, layer: int, absx: torch.Tensor, out: torch.Tensor) -> None:
        """Distributions of |a| and output magnitude over every `hist_stride`-th token.

        Most values fall in the lowest bins, so each of 64 row groups counts into its own copy of
        the bins: a plain histogram would serialise on the atomics of those few bins.
        """
        step, bins = self.config.hist_stride, self.config.hist_bins
        for slot, values in enumerate((absx[::step].float(), out[::step].float())):
            scale = bins / values.amax(dim=1, keepdim=True).clamp_min(1e-30)
            idx = (values * scale).long().clamp_(max=bins - 1)  # the peak itself goes to the last bin
            idx += bins * (torch.arange(idx.shape[0], device=idx.device) % 64)[:, None]
            counts = torch.zeros(64 * bins, dtype=torch.float32, device=idx.device)
            counts.scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), device=idx.device))
            self.hist[slot, layer] += counts.view(64, bins).sum(0)

    def _top(self, layer: int, absx: torch.Tensor) -> None:
        """Keep each prompt's strongest own token per neuron; `partials` picks the top-k prompts.

        One top-k per chunk instead of a merge per batch: top-k over few rows costs per column.
        """
        rows = torch.cat([absx, absx.new_zeros((1, absx.shape[1]))]).index_select(0, self.padded)
        best, pos = rows.view(*self.padded_shape, -1).max(dim=1)  # (B, d_ff) each
        self.best[layer].append((best.float(), self.batch_prompt, pos.int()))

    def _top_k(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, k, d_ff) value, chunk-local prompt and position of each neuron's top-k prompts."""
        vals = torch.stack([torch.cat([b for b, _, _ in best]) for best in self.best])  # (L, n_prompts, d_ff)
        prompt = torch.cat([p for _, p, _ in self.best[0]])  # (n_prompts,): the same batches every layer
        pos = torch.stack([torch.cat([q for _, _, q in best]) for best in self.best])
        vals, pick = vals.topk(min(self.config.top_k, vals.shape[1]), dim=1)
        return vals, prompt[pick], pos.gather(1, pick)

    def partials(self, prompt_offset: int) -> list[tuple[int, str, np.ndarray]]:
        """The chunk's partial reductions as (layer, name, array) rows for `chunk_arrays`.

        Every kind for every layer at once, copied to the host together (on CUDA into pinned memory,
        then one wait) in their stored dtypes: a copy and a wait per layer and kind would stall the
        device once per array.
        """
        if self.side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
        fire, hist = self.fire_count, self.hist
        if self.fused:
            fire = fire + self.fire32
            hist = hist + self.hist32[:, :, : self.config.hist_bins].transpose(0, 1)
        top_val, top_prompt, top_pos = self._top_k()
        # in their stored dtypes where they are: the host takes views, no copies of its own
        fire, hist, top_prompt = fire.double(), hist.round().long(), (top_prompt + prompt_offset).int()
        device = (self.sums, fire, hist, top_val.float(), top_prompt, top_pos.int())
        if self.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in device]
            for h, t in zip(host, device, strict=True):
                h.copy_(t, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            host = device
        sums, fire, hist, top_val, top_prompt, top_pos = (t.numpy() for t in host)
        rows = []
        for layer in range(self.n_layers):
            rows += [
                (layer, "sum_act", sums[0, layer]),
                (layer, "sum_abs", sums[1, layer]),
                (layer, "fire_count", fire[layer]),
                (layer, "hist_abs", hist[0, layer]),
                (layer, "hist_out", hist[1, layer]),
                (layer, "top_val", top_val[layer]),
                (layer, "top_prompt", top_prompt[layer]),
                (layer, "top_pos", top_pos[layer]),
            ]
        return rows


Top = tuple[np.ndarray, np.ndarray, np.ndarray]  # value, prompt, position: (..., k, d_ff) each


def split_top(rows: list[tuple[int, str, np.ndarray]]) -> tuple[list, Top]:
    """A chunk's partial rows without its top examples, and those as (L, k, d_ff) arrays."""
    top = {name: [a for _, n, a in rows if n == name] for name in TOP_ARRAYS}
    return [r for r in rows if r[1] not in TOP_ARRAYS], tuple(np.stack(top[name]) for name in TOP_ARRAYS)


def top_rows(top: Top) -> list[tuple[int, str, np.ndarray]]:
    """(layer, name, (k, d_ff) array) rows of (L, k, d_ff) top examples, for the store."""
    names = list(zip(TOP_ARRAYS, top, strict=True))
    return [(layer, name, a[layer]) for layer in range(top[0].shape[0]) for name, a in names]


def read_top(parts: dict[str, list[bytes]], d_ff: int) -> list[Top]:
    """Top examples stored as one layer's payloads (name -> list of bytes) as (k, d_ff) arrays."""
    dtypes = (np.float32, np.int32, np.int32)
    columns = [[np.frombuffer(b, t).reshape(-1, d_ff) for b in parts.get(name, [])]
               for name, t in zip(TOP_ARRAYS, dtypes, strict=True)]  # fmt: skip
    return list(zip(*columns, strict=True))


def merge_top(pieces: list[Top], top_k: int, chunk_prompts: int) -> Top:
    """Each neuron's `top_k` strongest prompts among `pieces` (per-chunk lists or merged states).

    The order is total: value descending, then the prompt's chunk ascending, then the order within the
    piece (a chunk's own list is in torch.topk's order). Every entry of one chunk comes from one piece,
    so the merge is associative and independent of the pieces' order, and a chunk-by-chunk merge gives
    exactly the stable sort of all chunks' lists in chunk order that a single merge at the end gave.
    """
    vals, prompt, pos = (np.concatenate([p[i] for p in pieces], axis=-2) for i in range(3))
    order = np.lexsort((prompt // chunk_prompts, -vals), axis=-2)[..., :top_k, :]
    return tuple(np.take_along_axis(a, order, -2) for a in (vals, prompt, pos))


def merge_top_in_order(state: tuple | None, top: tuple, top_k: int) -> tuple:
    """`merge_top` of the running state and a chunk's own list, as torch tensors on their device (a GPU
    sorts them in milliseconds; numpy took 1.8 s on an 8B shape), when every entry of `state` comes
    from chunks before the new one: a stable sort by value then keeps the state first among equal
    values, which is merge_top's order (value descending, then chunk ascending)."""
    if state is None:
        pieces = top
    else:
        pieces = tuple(torch.cat([a, b], dim=-2) for a, b in zip(state, top, strict=True))
    vals, order = pieces[0].sort(dim=-2, descending=True, stable=True)
    order = order[..., :top_k, :]
    return vals[..., :top_k, :], pieces[1].gather(-2, order), pieces[2].gather(-2, order)


PARTIALS_BYTES = 1 << 30  # chunk partials that merge_partials reads at once


def merge_partials(store, run_id: str, n_layers: int, top_k: int, n_tokens: int, chunk_prompts: int):
    """Sum chunk partials per layer in chunk order; merge the running top examples (`top_state`) with
    any per-chunk ones (from shards: merge_top's order makes it the same in any order)."""
    dtypes = {"sum_act": np.float64, "sum_abs": np.float64, "fire_count": np.float64,
              "hist_abs": np.int64, "hist_out": np.int64}  # fmt: skip
    layer_rows, top = [], {"layer": [], "neuron": [], "rank": [], "prompt_idx": [], "pos": [], "value": []}
    denom = max(n_tokens, 1)
    # As many layers' partials a query as PARTIALS_BYTES hold: all of them at once would grow with the
    # number of chunks, and a query a layer reads the whole table once per layer.
    sizes, group = store.chunk_partial_bytes(run_id), {}
    for layer in range(n_layers):
        if layer not in group:
            end, held = layer + 1, sizes.get(layer, 0)
            while end < n_layers and held + sizes.get(end, 0) <= PARTIALS_BYTES:
                held, end = held + sizes.get(end, 0), end + 1
            group = store.chunk_partials(run_id, range(layer, end))
        parts = group.pop(layer)
        arr = {name: [np.frombuffer(b, dtype) for b in parts[name]] for name, dtype in dtypes.items()}
        if routes := parts.get("expert_routes"):  # MoE (core.capture.experts): chunks' prompts, in order
            counts = np.concatenate([np.frombuffer(b, np.int32) for b in routes])
            layer_rows.append((layer, "expert_routes", counts))
        layer_rows += [
            (layer, "mean_act", (sum(arr["sum_act"]) / denom).astype(np.float32)),
            (layer, "mean_abs", (sum(arr["sum_abs"]) / denom).astype(np.float32)),
            (layer, "fire_rate", (sum(arr["fire_count"]) / denom).astype(np.float32)),
            (layer, "hist_abs", sum(arr["hist_abs"]).astype(np.int64)),
            (layer, "hist_out", sum(arr["hist_out"]).astype(np.int64)),
        ]
        d_ff = layer_rows[-3][2].shape[0]
        pieces = read_top(store.top_state(run_id, layer), d_ff) + read_top(parts, d_ff)
        vals, prompt, pos = merge_top(pieces, top_k, chunk_prompts)  # (k, d_ff) each
        k = vals.shape[0]
        top["layer"].append(np.full(k * d_ff, layer, np.int32))
        top["neuron"].append(np.repeat(np.arange(d_ff, dtype=np.int32), k))
        top["rank"].append(np.tile(np.arange(k, dtype=np.int32), d_ff))
        for name, source in (("prompt_idx", prompt), ("pos", pos), ("value", vals)):
            top[name].append(source.T.reshape(-1))
    top = {name: np.concatenate(chunks) for name, chunks in top.items()}
    return layer_rows, top
