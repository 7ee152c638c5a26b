"""One pass of a model over a prompt set, reduced on the fly into the DuckDB cache.

Per layer a pre-hook on the down projection sees the FFN activation a (B, T, d_ff) and reduces it
at once: mean |a| per prompt, packed firing bits per token, running top examples per neuron,
histograms for the sparsity curves and neuron sums. Work is committed in chunks of prompts, so a
killed capture resumes from its last chunk and a finished one is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from core import models
from core.capture.reduce import ChunkReducer
from core.models import LoadedModel
from core.prompts import PromptSet
from core.store import Store

Progress = Callable[[int, int, str], None]  # (prompts done, prompts total, message)


@dataclass(frozen=True)
class CaptureConfig:
    fire_fraction: float = 0.10  # share of a layer's neurons that "fire" at each token
    fire_indicator: Literal["output", "abs"] = "output"  # rank by |a|*||W_down[:, i]|| or by |a|
    top_k: int = 20  # top activating (prompt, position) examples kept per neuron
    max_tokens: int = 256  # per prompt, chat template included; longer prompts are truncated
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    hist_bins: int = 100  # bins over [0, 1] for the normalised-activation histograms
    hist_stride: int = 8  # histograms sample every n-th token: a distribution needs no more
    batch_size: int = 0  # prompts per forward pass; 0: fit free GPU memory, 8 on CPU (speed only, not keyed)
    chunk_prompts: int = 64  # prompts per committed chunk (resume granularity; not in the key)

    def __post_init__(self):
        if not 0 < self.fire_fraction <= 1:
            raise ValueError("fire_fraction must be in (0, 1]")
        if self.fire_indicator not in ("output", "abs"):
            raise ValueError("fire_indicator must be 'output' or 'abs'")
        if (
            min(
                self.top_k,
                self.max_tokens,
                self.hist_bins,
                self.hist_stride,
                self.batch_size + 1,  # 0 is "fit the memory"
                self.chunk_prompts,
            )
            < 1
        ):
            raise ValueError("the sizes and counts in CaptureConfig must be >= 1 (batch_size >= 0)")

    def key(self) -> dict:
        values = asdict(self)
        for speed_only in ("batch_size", "chunk_prompts"):
            values.pop(speed_only)
        return values


@dataclass(frozen=True)
class CaptureResult:
    run_id: str
    cache_hit: bool
    resumed: bool
    n_tokens: int
    seconds: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # token ids fed to the model (template included)
    start: int  # the prompt's own tokens are ids[start:end]
    end: int
    truncated: bool


# Bump when what a run stores changes meaning (2: one top example per prompt), so older runs miss the cache.
FORMAT_VERSION = 2


def run_id_for(fingerprint: str, prompt_hash: str, config: CaptureConfig) -> str:
    key = json.dumps([fingerprint, prompt_hash, config.key(), FORMAT_VERSION], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def encode(tokenizer, text: str, config: CaptureConfig, limit: int) -> Encoded:
    """Token ids for one prompt and the span of the prompt's own tokens inside them."""
    rendered, span = text, (0, len(text))
    if config.chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        begin = rendered.rfind(text)
        span = (begin, begin + len(text)) if begin >= 0 else (0, len(rendered))
    add_special = not (config.chat_template and getattr(tokenizer, "chat_template", None))
    enc = tokenizer(rendered, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > span[0] and a < span[1] and b > a]
    start, end = (inside[0], inside[-1] + 1) if inside else (0, len(ids))
    truncated = len(ids) > limit
    if truncated:
        ids = ids[:limit]
        start, end = min(start, limit - 1), min(end, limit)
    return Encoded(ids, start, max(end, start + 1), truncated)


def capture(
    lm: LoadedModel,
    prompt_set: PromptSet,
    store: Store,
    config: CaptureConfig = CaptureConfig(),
    progress: Progress | None = None,
    shard: tuple[int, int] | None = None,
) -> CaptureResult:
    """Capture a run, or return at once when the same run is already cached (a cache hit).

    With `shard=(i, n)` only chunks c with c % n == i are captured and the run is left for
    `core.capture.shards.merge` to finish: n processes or machines can share one prompt set.
    """
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard {shard[0]}/{shard[1]}: need 0 <= I < N")
    info = lm.info
    run_id = run_id_for(info.fingerprint, prompt_set.hash, config)
    with store.run_lock(run_id):
        existing = store.run(run_id)
        if existing and existing.complete:
            return CaptureResult(run_id, True, False, existing.n_tokens or 0, 0.0)
        started = time.perf_counter()
        limit = min(config.max_tokens, getattr(lm.model.config, "max_position_embeddings", 10**9))
        encoded = [encode(lm.tokenizer, p.text, config, limit) for p in prompt_set.prompts]
        warnings = (
            tuple(
                f"Prompt '{p.id}' is longer than {limit} tokens and was truncated."
                for p, e in zip(prompt_set.prompts, encoded, strict=True)
                if e.truncated
            )
            + prompt_set.warnings
        )
        n_chunks = math.ceil(len(encoded) / config.chunk_prompts)
        if existing is None:
            _create_run(store, run_id, lm, prompt_set, config, n_chunks)
        done = store.done_chunks(run_id)
        mine = [c for c in range(n_chunks) if shard is None or c % shard[1] == shard[0]]
        size = {c: min(config.chunk_prompts, len(encoded) - c * config.chunk_prompts) for c in mine}
        total, reported = sum(size.values()), sum(size[c] for c in mine if c in done)
        if progress:
            progress(reported, total, "resuming" if done else "capturing")
        norms = [models.down_column_norms(lm.model, layer) for layer in range(info.n_layers)]
        budget = token_budget(lm, encoded, config)
        for chunk in mine:
            if chunk in done:
                continue
            lo = chunk * config.chunk_prompts
            hi = min(lo + config.chunk_prompts, len(encoded))
            t0 = time.perf_counter()
            reducer = ChunkReducer(info.n_layers, info.d_ff, config, norms, device=lm.info.device)
            _run_chunk(lm, encoded[lo:hi], lo, reducer, config, progress, reported, total, budget)
            _write_chunk(
                store, run_id, chunk, lo, encoded[lo:hi], lm.tokenizer, reducer, time.perf_counter() - t0
            )
            reported += hi - lo
        if shard is not None:
            sql = "SELECT coalesce(sum(n_tokens), 0) FROM chunks WHERE run_id = ?"
            n_tokens = store.cursor().execute(sql, [run_id]).fetchone()[0]
            return CaptureResult(
                run_id, False, bool(done), int(n_tokens), time.perf_counter() - started, warnings
            )
        n_tokens = finalise(store, run_id, info.n_layers, config)
        seconds = time.perf_counter() - started
        if progress:
            progress(total, total, "done")
        return CaptureResult(run_id, False, bool(done), n_tokens, seconds, warnings)


def _create_run(store, run_id, lm, prompt_set, config, n_chunks) -> None:
    info = lm.info
    row = {
        "run_id": run_id,
        "model_id": info.model_id,
        "model_type": info.model_type,
        "fingerprint": info.fingerprint,
        "prompt_set": prompt_set.name,
        "prompt_hash": prompt_set.hash,
        "settings": json.dumps(asdict(config), sort_keys=True),
        "n_layers": info.n_layers,
        "d_ff": info.d_ff,
        "n_prompts": len(prompt_set),
        "n_chunks": n_chunks,
        "categories": json.dumps(prompt_set.categories),
        "status": "incomplete",
    }
    prompts = [(i, p.id, p.category, p.text) for i, p in enumerate(prompt_set.prompts)]
    with store.write() as cur:
        store.create_run(cur, row, prompts)


CPU_BATCH = 8  # prompts per forward pass on the CPU when batch_size is 0


def token_budget(lm, encoded, config: CaptureConfig) -> int | None:
    """Tokens per forward pass that fit in free GPU memory (batch_size 0 on CUDA); else None.

    One forward pass of the longest prompt alone measures the pass's peak per prompt; capture adds its
    firing words per token (two batches in flight) and per chunk each prompt's strongest tokens. 60%
    of what is free (to the driver and in torch's cache) leaves room for fragmentation.
    """
    device = next(lm.model.parameters()).device
    if config.batch_size or device.type != "cuda" or not encoded:
        return None
    longest, info = max(len(e.ids) for e in encoded), lm.info
    torch.cuda.synchronize(device)
    free = torch.cuda.mem_get_info(device)[0]
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        ids = torch.ones((1, longest), dtype=torch.long, device=device)
        lm.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    per_prompt = torch.cuda.max_memory_allocated(device) - base
    per_prompt += 2 * longest * info.n_layers * 2 * ((info.d_ff + 63) // 64) * 4
    per_chunk = config.chunk_prompts * info.n_layers * info.d_ff * 8 * 2  # best |a| and position, stacked
    prompts = int(0.6 * (free - per_chunk) // per_prompt)
    return max(1, min(prompts, config.chunk_prompts)) * longest


def batches(lengths: list[int], batch_size: int, budget: int | None) -> list[list[int]]:
    """Prompt indices in order of length, grouped for one forward pass each: `batch_size` prompts
    (CPU_BATCH when 0), or with a token `budget` as many as keep prompts x the widest within it."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if budget is None:
        size = batch_size or CPU_BATCH
        return [order[b : b + size] for b in range(0, len(order), size)]
    groups: list[list[int]] = [[]]
    for i in order:  # ascending: the newest prompt is the widest
        if groups[-1] and (len(groups[-1]) + 1) * lengths[i] > budget:
            groups.append([])
        groups[-1].append(i)
    return groups if groups[0] else []


@torch.inference_mode()
def _run_chunk(lm, encoded, offset, reducer, config, progress, reported, total, budget=None) -> None:
    model, device = lm.model, next(lm.model.parameters()).device
    body = model.base_model  # the decoder stack: capture needs no logits
    pad = lm.tokenizer.pad_token_id or 0
    with reducer.hooks(model), reducer.forward_stream():
        previous = None
        done = 0
        for batch in batches([len(e.ids) for e in encoded], config.batch_size, budget):
            width = max(len(encoded[i].ids) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(encoded[i].ids)] = torch.tensor(encoded[i].ids)
                mask[row, : len(encoded[i].ids)] = 1
            reducer.set_batch(batch, [(encoded[i].start, encoded[i].end) for i in batch], width)
            body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            taken = reducer.take_batch()
            if previous is not None:
                reducer.file(previous)  # overlaps with this batch's device work on CUDA
            previous = taken
            done += len(batch)
            if progress:
                progress(reported + done, total, "capturing")
        reducer.file(previous)


def blobs(arrays: list[np.ndarray]) -> pa.Array:
    """A BLOB column from numpy arrays with one copy (a list of bytes objects would take two)."""
    sizes = np.array([a.nbytes for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if offsets[-1] >= 2**31:
        data = [a.tobytes() for a in arrays]
        return pa.array(data, pa.large_binary())
    flat = np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays]) if arrays else np.zeros(0, np.uint8)
    return pa.Array.from_buffers(
        pa.binary(), len(arrays), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(flat)]
    )


def _write_chunk(store, run_id, chunk, lo, encoded, tokenizer, reducer, seconds) -> None:
    """Everything a chunk produced, in one transaction: it lands whole or not at all."""
    n, L = len(encoded), reducer.n_layers
    prompt_idx = np.repeat(np.arange(lo, lo + n, dtype=np.int32), L)
    layer_idx = np.tile(np.arange(L, dtype=np.int32), n)
    means = blobs([reducer.prompt_means[i][layer] for i in range(n) for layer in range(L)])
    bits = blobs([reducer.prompt_bits[i][layer] for i in range(n) for layer in range(L)])
    tok_prompt, tok_pos, tok_id, tok_text, tok_trunc = [], [], [], [], []
    for i, e in enumerate(encoded):
        own = e.ids[e.start : e.end]
        tok_prompt += [lo + i] * len(own)
        tok_pos += list(range(len(own)))
        tok_id += own
        tok_text += tokenizer.convert_ids_to_tokens(own)
        tok_trunc += [e.truncated] * len(own)
    with store.write() as cur:
        base = {"run_id": [run_id] * len(means), "prompt_idx": prompt_idx, "layer": layer_idx}
        store.insert(cur, "prompt_acts", {**base, "mean_abs": means})
        store.insert(cur, "firing", {**base, "bits": bits})
        store.insert(
            cur,
            "tokens",
            {
                "run_id": [run_id] * len(tok_id),
                "prompt_idx": pa.array(tok_prompt, pa.int32()),
                "pos": pa.array(tok_pos, pa.int32()),
                "token_id": pa.array(tok_id, pa.int32()),
                "token": pa.array([str(t) for t in tok_text], pa.string()),
                "truncated": pa.array(tok_trunc, pa.bool_()),
            },
        )
        rows = reducer.partials(lo)
        store.insert(
            cur,
            "chunk_arrays",
            {
                "run_id": [run_id] * len(rows),
                "chunk": pa.array([chunk] * len(rows), pa.int32()),
                "layer": pa.array([r[0] for r in rows], pa.int32()),
                "name": [r[1] for r in rows],
                "data": blobs([r[2] for r in rows]),
            },
        )
        cur.execute("INSERT INTO chunks VALUES (?, ?, ?, ?)", [run_id, chunk, reducer.n_tokens, seconds])


def finalise(store: Store, run_id: str, n_layers: int, config: CaptureConfig) -> int:
    """Sum the chunks' partial reductions into the run's final arrays and mark it complete."""
    from core.capture.reduce import merge_partials

    cur = store.cursor()
    n_tokens, seconds = cur.execute(
        "SELECT sum(n_tokens), sum(seconds) FROM chunks WHERE run_id = ?", [run_id]
    ).fetchone()
    layer_rows, top_rows = merge_partials(store, run_id, n_layers, config.top_k, int(n_tokens))
    with store.write() as cur:
        cur.execute("DELETE FROM layer_arrays WHERE run_id = ?", [run_id])
        cur.execute("DELETE FROM top_examples WHERE run_id = ?", [run_id])
        store.insert(
            cur,
            "layer_arrays",
            {
                "run_id": [run_id] * len(layer_rows),
                "layer": pa.array([r[0] for r in layer_rows], pa.int32()),
                "name": [r[1] for r in layer_rows],
                "data": blobs([r[2] for r in layer_rows]),
            },
        )
        n_top = len(top_rows["layer"])  # ~1M rows on the default model: no Python list of ids
        store.insert(cur, "top_examples", {"run_id": pa.repeat(pa.scalar(run_id), n_top), **top_rows})
        cur.execute("DELETE FROM chunk_arrays WHERE run_id = ?", [run_id])
        cur.execute(
            "UPDATE runs SET status = 'complete', n_tokens = ?, seconds = ?, finished = current_timestamp "
            "WHERE run_id = ?",
            [int(n_tokens), float(seconds), run_id],
        )
    return int(n_tokens)
