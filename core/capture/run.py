"""One pass of a model over a prompt set, reduced on the fly into the DuckDB cache.

Per layer a pre-hook on the down projection sees the FFN activation a (B, T, d_ff) and reduces it
at once: mean |a| per prompt, packed firing bits per token, running top examples per neuron,
histograms for the sparsity curves and neuron sums. Work is committed in chunks of prompts, so a
killed capture resumes from its last chunk and a finished one is a cache hit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from core import models
from core.capture import experts as expert_routes
from core.capture.counts import MAX_TOKENS, CoactCounts, countable
from core.capture.reduce import ChunkReducer, read_top
from core.capture.writer import ChunkWriter
from core.errors import BricklabError
from core.models import LoadedModel
from core.progress import Progress
from core.prompts import PromptSet, as_prompt_set, category_labels, encode, halves, token_limit
from core.store import Store, sample
from core.store.schema import COACT_SEED


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
    # bytes of per-token firing bits a run keeps (core.store.sample): a run whose bits fit keeps every
    # token's; a larger one keeps a hashed sample of its tokens plus co-activation counts (count_tokens)
    sample_bytes: int = 1 << 30
    # how many tokens' co-activations such a run counts: a hashed sample of this many when it has more
    # (0: every token). Counting costs ~9 us a token on an H200 for an 8B shape (fp8 products), so a
    # run's counting is bounded like its sample: ~10 s, against 4.5 min for 10M tokens' forward passes
    count_tokens: int = 1 << 20
    # such a run's counts (and running top examples) are saved with a chunk at most this often, and with
    # its last; a resume captures again the chunks committed after the last save (not in the key). A
    # save of an 8B shape's 26 GB of counts takes ~18 s on an H200 host: 3% of 10 minutes
    checkpoint_seconds: float = 600.0

    def __post_init__(self):
        if not 0 < self.fire_fraction <= 1:
            raise ValueError("fire_fraction must be in (0, 1]")
        if self.fire_indicator not in ("output", "abs"):
            raise ValueError("fire_indicator must be 'output' or 'abs'")
        if min(self.sample_bytes, self.count_tokens, self.checkpoint_seconds) < 0:
            raise ValueError("sample_bytes, count_tokens and checkpoint_seconds must be >= 0")
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
        for speed_only in ("batch_size", "chunk_prompts", "checkpoint_seconds"):
            values.pop(speed_only)
        return values


@dataclass(frozen=True)
class CaptureResult:
    run_id: str
    cache_hit: bool
    resumed: bool
    n_tokens: int  # the run's tokens, including those captured before a resume
    seconds: float  # this call's time
    warnings: tuple[str, ...] = ()
    new_tokens: int = 0  # tokens captured by this call: n_tokens less what a resumed run already had

    @property
    def tokens_per_second(self) -> float:
        """This call's speed: its own tokens over its own time (a resume's earlier chunks took other time)."""
        return self.new_tokens / max(self.seconds, 1e-9)


# Bump when what a run stores changes meaning, so older runs miss the cache (2: one top example per
# prompt; 3: the firing of a byte-budgeted token sample, with exact co-activation counts beside it
# when the sample is partial). A format-2 run is still read: its sample is every token.
FORMAT_VERSION = 3


def run_id_for(fingerprint: str, prompt_hash: str, config: CaptureConfig) -> str:
    key = json.dumps([fingerprint, prompt_hash, config.key(), FORMAT_VERSION], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def capture(
    lm: LoadedModel,
    prompt_set: PromptSet | Iterable[str],
    store: Store,
    config: CaptureConfig = CaptureConfig(),
    progress: Progress | None = None,
    shard: tuple[int, int] | None = None,
) -> CaptureResult:
    """Capture a run, or return at once when the same run is already cached (a cache hit).

    `prompt_set`: a PromptSet, or plain strings (prompts.from_texts makes them one).
    With `shard=(i, n)` only chunks c with c % n == i are captured and the run is left for
    `core.capture.shards.merge` to finish: n processes or machines can share one prompt set.
    """
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard {shard[0]}/{shard[1]}: need 0 <= I < N")
    given, prompt_set = prompt_set, as_prompt_set(prompt_set)
    # A PromptSet's own warnings (texts cut at load) were its caller's to show when it loaded it;
    # repeating them in the result showed each twice. Those of a set made here from strings are news.
    load_warnings = () if prompt_set is given else prompt_set.warnings
    info = lm.info
    run_id = run_id_for(info.fingerprint, prompt_set.hash, config)
    with store.run_lock(run_id):
        existing = store.run(run_id)
        if existing and existing.complete:
            return CaptureResult(run_id, True, False, existing.n_tokens or 0, 0.0)
        started = time.perf_counter()
        limit = token_limit(lm.model, config.max_tokens)
        encoded = [encode(lm.tokenizer, p.text, limit, config.chat_template) for p in prompt_set.prompts]
        warnings = (
            tuple(
                f"Prompt '{p.id}' is longer than {limit} tokens and was truncated."
                for p, e in zip(prompt_set.prompts, encoded, strict=True)
                if e.truncated
            )
            + load_warnings
        )
        n_chunks = math.ceil(len(encoded) / config.chunk_prompts)
        n_own = sum(e.end - e.start for e in encoded)
        rate = sample.sample_rate(config.sample_bytes, n_own, info.n_layers, info.d_ff)
        if rate < 1.0:
            _check_countable(n_own, sample.count_rate(config.count_tokens, n_own, rate))
        if existing is None:
            _create_run(store, run_id, lm, prompt_set, config, n_chunks)
        else:  # files of a chunk or save whose transaction never committed
            store.prune_arrays(run_id)
        counts = None
        if rate < 1.0:  # the sample leaves tokens out: count co-activations over all of them
            counts = _resume_counts(store, run_id, prompt_set, config, info, n_own, rate)
        done = store.done_chunks(run_id)
        mine = [c for c in range(n_chunks) if shard is None or c % shard[1] == shard[0]]
        size = {c: min(config.chunk_prompts, len(encoded) - c * config.chunk_prompts) for c in mine}
        total, reported = sum(size.values()), sum(size[c] for c in mine if c in done)
        if progress:
            progress(reported, total, "resuming" if done else "capturing")
        norms = [models.down_column_norms(lm.model, layer) for layer in range(info.n_layers)]
        budget = token_budget(lm, encoded, config)
        # one running merge of the committed chunks' top examples, replaced with each chunk: per-chunk
        # lists deleted when finalised left their blocks free in the file (a shard keeps its lists)
        state = None if shard is not None else load_top(store, run_id, info.n_layers, info.d_ff)
        writer = ChunkWriter(store, run_id, lm.tokenizer, rate, state, done, info.device)
        todo = [c for c in mine if c not in done]
        saved = time.perf_counter()
        new_tokens = 0
        with writer:
            for chunk in todo:
                lo = chunk * config.chunk_prompts
                hi = min(lo + config.chunk_prompts, len(encoded))
                t0 = time.perf_counter()
                reducer = ChunkReducer(
                    info.n_layers,
                    info.d_ff,
                    config,
                    norms,
                    device=info.device,
                    counts=counts,
                    first_prompt=lo,
                )
                routes = _run_chunk(
                    lm, encoded[lo:hi], lo, reducer, config, progress, reported, total, budget
                )
                # the state goes with each chunk of a run without counts (it is small), else now and then
                save = (
                    counts is None
                    or chunk == todo[-1]
                    or time.perf_counter() - saved >= config.checkpoint_seconds
                )
                arrays = counts.arrays(last=chunk == todo[-1]) if counts is not None and save else None
                saved = time.perf_counter() if save else saved
                writer.submit(
                    chunk, lo, encoded[lo:hi], reducer, time.perf_counter() - t0, routes, save, arrays
                )
                reported += hi - lo
                new_tokens += reducer.n_tokens
        if shard is not None:
            n_tokens, _ = store.chunk_totals(run_id)
            seconds = time.perf_counter() - started
            return CaptureResult(run_id, False, bool(done), n_tokens, seconds, warnings, new_tokens)
        n_tokens = finalise(store, run_id, info.n_layers, config)
        seconds = time.perf_counter() - started
        if progress:
            progress(total, total, "done")
        return CaptureResult(run_id, False, bool(done), n_tokens, seconds, warnings, new_tokens)


def probe(
    lm: LoadedModel, prompt_set: PromptSet, config: CaptureConfig = CaptureConfig(), n: int = 8
) -> float:
    """Seconds per prompt of capturing this set on this machine, measured on its first `n` prompts
    through the capture's own path (nothing is written): an estimate before the first capture."""
    prompt_set = as_prompt_set(prompt_set).head(n)
    limit = token_limit(lm.model, config.max_tokens)
    encoded = [encode(lm.tokenizer, p.text, limit, config.chat_template) for p in prompt_set.prompts]
    if not encoded:
        return 0.0
    info = lm.info
    norms = [models.down_column_norms(lm.model, layer) for layer in range(info.n_layers)]
    started = time.perf_counter()
    reducer = ChunkReducer(info.n_layers, info.d_ff, config, norms, device=info.device)
    _run_chunk(lm, encoded, 0, reducer, config, None, 0, len(encoded), token_budget(lm, encoded, config))
    return (time.perf_counter() - started) / len(encoded)


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


def shared_prefix(encoded) -> int:
    """Tokens every prompt starts with before its own tokens (the chat template's system part): capture
    never reduces them, so their keys and values are computed once per chunk, not once per prompt."""
    if not encoded:
        return 0
    first, n = encoded[0].ids, min(e.start for e in encoded)
    for e in encoded[1:]:
        n = next((i for i in range(n) if e.ids[i] != first[i]), n)
    return n


def prefix_cache(lm, encoded) -> tuple[int, object]:
    """The chunk's shared prefix length and its keys and values (None when there is none), computed
    once; call it before any hook is installed: the prefix is not the prompts' own."""
    shared = shared_prefix(encoded)
    if not shared:
        return 0, None
    ids = torch.tensor([encoded[0].ids[:shared]], device=next(lm.model.parameters()).device)
    return shared, lm.model.base_model(input_ids=ids, use_cache=True).past_key_values


def batch_inputs(lm, encoded, batch: list[int], shared: int, prefix) -> tuple[list, int, dict]:
    """One forward pass of `batch`: each prompt from the shared prefix to its last own token (a causal
    model's later tokens change nothing before them), right-padded. Returns the own tokens' spans in
    the pass, its width and the decoder stack's arguments."""
    device = next(lm.model.parameters()).device
    width = max(encoded[i].end for i in batch) - shared
    ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for row, i in enumerate(batch):
        ids[row, : encoded[i].end - shared] = torch.tensor(encoded[i].ids[shared : encoded[i].end])
        mask[row, : encoded[i].end] = 1
    cache = None
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(batch))
    spans = [(encoded[i].start - shared, encoded[i].end - shared) for i in batch]
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    return spans, width, inputs | {"past_key_values": cache, "use_cache": cache is not None}


@torch.inference_mode()
def _run_chunk(lm, encoded, offset, reducer, config, progress, reported, total, budget=None):
    model = lm.model
    body = model.base_model  # the decoder stack: capture needs no logits
    shared, prefix = prefix_cache(lm, encoded)
    routes = expert_routes.recording(lm, reducer, len(encoded))
    with reducer.hooks(model), routes as counts, reducer.forward_stream():
        previous = None
        done = 0
        for batch in batches([len(e.ids) for e in encoded], config.batch_size, budget):
            spans, width, inputs = batch_inputs(lm, encoded, batch, shared, prefix)
            reducer.set_batch(batch, spans, width)
            body(**inputs)
            taken = reducer.take_batch()
            if previous is not None:
                reducer.file(previous)  # overlaps with this batch's device work on CUDA
            previous = taken
            done += len(batch)
            if progress:
                progress(reported + done, total, "capturing")
        reducer.file(previous)
    return counts


def _check_countable(n_own: int, count_rate: float) -> None:
    """Refuse, before anything is captured, a run whose counted tokens (over all its shards) would
    overflow the int32 co-activation counts: a single process would fail hours in, shards would wrap."""
    if not countable(n_own, count_rate):
        raise BricklabError(
            f"This run would count the co-activations of ~{count_rate * n_own:,.0f} of its {n_own:,} tokens; "
            f"the counts are int32 and hold at most {MAX_TOKENS:,}.",
            "Capture with --count-tokens (CaptureConfig.count_tokens) of at most 2,000,000,000, or "
            "split the prompts into several runs.",
        )


def _resume_counts(
    store: Store, run_id: str, prompt_set, config: CaptureConfig, info, n_own: int, sample_rate: float
) -> CoactCounts:
    """The run's co-activation counts to continue from: those it saved last, with the chunks committed
    after that save dropped, to be captured again (zeros and nothing dropped for a new run)."""
    store.prune_arrays(run_id)  # files of a save whose transaction never committed
    stale = store.done_chunks(run_id) - store.array_chunks(run_id)
    if stale:
        store.drop_chunks(run_id, sorted(stale), config.chunk_prompts)
    half = halves(category_labels(prompt_set), COACT_SEED)
    rate = sample.count_rate(config.count_tokens, n_own, sample_rate)
    counts = CoactCounts(info.n_layers, info.d_ff, half, rate, device=info.device)
    counts.load(store, run_id)
    return counts


def load_top(store: Store, run_id: str, n_layers: int, d_ff: int) -> list:
    """The run's running top examples as one (L, k, d_ff) piece for merge_top; none before a chunk."""
    layers = [read_top(store.top_state(run_id, layer), d_ff) for layer in range(n_layers)]
    if not all(layers):
        return []
    return [tuple(np.stack([layer[0][i] for layer in layers]) for i in range(3))]


def finalise(store: Store, run_id: str, n_layers: int, config: CaptureConfig) -> int:
    """Sum the chunks' partial reductions into the run's final arrays and mark it complete."""
    from core.capture.reduce import merge_partials

    n_tokens, seconds = store.chunk_totals(run_id)
    layer_rows, top = merge_partials(store, run_id, n_layers, config.top_k, n_tokens, config.chunk_prompts)
    store.finish_run(run_id, layer_rows, top, n_tokens, seconds)
    return n_tokens
