"""GPU capture benchmark: bare forward vs full capture on a random model of a real LLM's shape.

Used by `benchmarks/capture.py --device cuda --shape NAME`; run alone for the same thing.
Speed does not depend on weight values, so random weights of Llama-3-8B's shape stand in for it.
`--smoke` runs the same path on the CPU with a tiny shape, in seconds (no figure, only a working script).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core import models
from core.capture import reduce
from core.capture import run as capture
from core.capture.reduce import ChunkReducer
from core.capture.writer import ChunkWriter
from core.prompts import Encoded
from core.store import sample

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
}  # fmt: skip


class _Ids:
    """Stands in for a tokenizer when the cache records token strings of random ids; a text of ids
    written in decimal, one space apart, encodes to those ids (`whole_run`)."""

    pad_token_id = 0
    chat_template = None

    @staticmethod
    def convert_ids_to_tokens(ids):
        return [str(i) for i in ids]

    def __call__(self, text: str, add_special_tokens=True, return_offsets_mapping=False):
        words = text.split(" ")
        lengths = np.array([len(w) for w in words])
        ends = np.cumsum(lengths + 1) - 1  # each word's end; one space between words
        return {"input_ids": [int(w) for w in words], "offset_mapping": np.c_[ends - lengths, ends].tolist()}


def random_model(shape: str, device: str) -> models.LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
        try:
            model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(default)
    info = models.describe(model, f"random-{shape}")
    return models.LoadedModel(model, _Ids(), info)


def encoded_batches(n_prompts: int, seq: int, vocab: int) -> list[Encoded]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (n_prompts, seq), generator=g)
    return [Encoded(row.tolist(), 0, seq, False) for row in ids]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_bare(lm, encoded, batch_size: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for b in range(0, len(encoded), batch_size):
        ids = torch.tensor([e.ids for e in encoded[b : b + batch_size]], device=device)
        lm.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    sync(device)
    return time.perf_counter() - t0


def time_capture(lm, encoded, batch_size: int, device: str, write: bool, fused=None, overlap=None) -> float:
    """Hooks, reductions and host copies; with `write`, also the chunk's cache transaction. Batch size
    0 lets capture fit the batch to free GPU memory (AUTO records the tokens a pass it chose)."""
    from core.store import Store

    config = capture.CaptureConfig(batch_size=batch_size, chunk_prompts=len(encoded), max_tokens=10**6)
    budget = capture.token_budget(lm, encoded, config)
    if budget:
        AUTO.append(budget)
    norms = [models.down_column_norms(lm.model, layer) for layer in range(lm.info.n_layers)]
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.duckdb") if write else None
        if store:
            capture._create_run(store, "bench", lm, _FakeSet(len(encoded)), config, 1)
        sync(device)
        t0 = time.perf_counter()
        reducer = ChunkReducer(
            lm.info.n_layers, lm.info.d_ff, config, norms, device=device, fused=fused, overlap=overlap
        )
        capture._run_chunk(lm, encoded, 0, reducer, config, None, 0, len(encoded), budget)
        forward = time.perf_counter() - t0  # the last batch's copy waited for: the device is idle
        if store:  # every token's bits (format 2's writes), in line
            with ChunkWriter(store, "bench", lm.tokenizer, 1.0, [], set(), "cpu") as writer:
                writer.submit(0, 0, encoded, reducer, 0.0)
        else:
            reducer.partials(0)
        sync(device)
        elapsed = time.perf_counter() - t0
        SPLITS.append({"fused": reducer.fused, "overlap": reducer.side is not None, "chunk_s": forward,
                       "after_s": elapsed - forward})  # fmt: skip
        if store:
            store.close()
    return elapsed


def time_run(
    lm, encoded, batch_size: int, device: str, n_chunks: int, run_tokens: int, count_rate: float,
    count=True, write=True,
) -> dict:  # fmt: skip
    """`n_chunks` chunks of a format-3 run through capture's own writer, as the middle of a run of
    `run_tokens` tokens: the firing bits of that run's token sample (CaptureConfig.sample_bytes), its
    co-activation counts accumulated on the device (`count_rate` of the tokens), every chunk's rows
    committed in the background writer. Returns seconds per chunk (the writes of the last chunk waited
    for), the cache file's bytes and, apart, the seconds to take the counts off the device and to
    save one layer of them as the final save does (`arrays`). `count`/`write` False leave the counts /
    the writes out, to see what each costs (--diagnose)."""
    from core.capture.counts import CoactCounts
    from core.store import Store

    config = capture.CaptureConfig(batch_size=batch_size, chunk_prompts=len(encoded), max_tokens=10**6)
    info, n = lm.info, len(encoded)
    rate = sample.sample_rate(config.sample_bytes, run_tokens, info.n_layers, info.d_ff)
    norms = [models.down_column_norms(lm.model, layer) for layer in range(info.n_layers)]
    half = np.arange(n_chunks * n) % 2 == 0
    counts = CoactCounts(info.n_layers, info.d_ff, half, count_rate, device=device) if count else None
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.duckdb")
        if THRESHOLD:  # DuckDB's WAL size before it checkpoints (default 16MB): --checkpoint-threshold
            store.cursor().execute(f"SET checkpoint_threshold = '{THRESHOLD}'")
        capture._create_run(store, "bench", lm, _FakeSet(n_chunks * n), config, n_chunks)
        sync(device)
        t0 = time.perf_counter()
        marks = []  # when each chunk's commit was handed over: the steady state shows after the first
        with ChunkWriter(store, "bench", lm.tokenizer, rate, [], set(), device) as writer:
            for chunk in range(n_chunks):
                reducer = ChunkReducer(
                    info.n_layers,
                    info.d_ff,
                    config,
                    norms,
                    device=device,
                    counts=counts,
                    first_prompt=chunk * n,
                )
                capture._run_chunk(lm, encoded, chunk * n, reducer, config, None, 0, n)
                if write:
                    writer.submit(chunk, chunk * n, encoded, reducer, 0.0, None, save=False)
                else:
                    reducer.partials(chunk * n)
                marks.append(time.perf_counter() - t0)
            if counts is not None:  # the words still held are counted inside the timed run
                counts.flush()
        sync(device)
        elapsed = time.perf_counter() - t0
        steps = np.diff([0.0, *marks[:-1], elapsed]).tolist()
        if counts is None:
            store.close()
            return {
                "chunk_s": elapsed / n_chunks,
                "write_s": writer.write_seconds / n_chunks,
                "each_s": steps,
            }
        t1 = time.perf_counter()
        arrays = counts.arrays()  # what a save takes off the device: every layer's two triangles
        to_host = time.perf_counter() - t1
        t1 = time.perf_counter()
        some = arrays[:SAVED_ARRAYS]  # the save itself, timed for a few arrays (the disk may not hold all)
        with store.write() as cur:
            store._save_arrays(cur, "bench", some, list(range(n_chunks)))
        save_one = (time.perf_counter() - t1) / len(some)
        folder = store.arrays_folder("bench")  # each chunk's prompt means, beside the file
        acts_bytes = sum((folder / f).stat().st_size for _, f in store.chunk_files("bench", "prompt_acts"))
        store.close()
        db_bytes = (Path(tmp) / "bench.duckdb").stat().st_size
    return {"chunk_s": elapsed / n_chunks, "chunks": n_chunks, "run_tokens": run_tokens, "sample_rate": rate,
            "count_rate": count_rate, "db_bytes": db_bytes, "acts_bytes": acts_bytes,
            "counts_to_host_s": to_host,
            "counts_one_array_save_s": save_one, "counts_arrays_saved": len(some),
            "counts_array_bytes": int(arrays[0][2].nbytes),
            "counts_arrays": len(arrays), "write_s": writer.write_seconds / n_chunks,
            "each_s": steps}  # fmt: skip


def partials_breakdown(lm, encoded, batch_size: int, device: str) -> dict:
    """Seconds of each step of ChunkReducer.partials after one capture (a diagnosis, not a result)."""
    config = capture.CaptureConfig(batch_size=batch_size, chunk_prompts=len(encoded), max_tokens=10**6)
    norms = [models.down_column_norms(lm.model, layer) for layer in range(lm.info.n_layers)]
    reducer = ChunkReducer(lm.info.n_layers, lm.info.d_ff, config, norms, device=device)
    capture._run_chunk(lm, encoded, 0, reducer, config, None, 0, len(encoded))
    sync(device)
    steps, t0 = {}, time.perf_counter()
    top = reducer._top_k()
    sync(device)
    steps["top_k_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in top]
    steps["pin_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    for h, t in zip(host, top, strict=True):
        h.copy_(t, non_blocking=True)
    sync(device)
    steps["copy_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    reducer.partials(0)
    steps["whole_partials_s"] = time.perf_counter() - t0
    return steps


THRESHOLD = ""  # --checkpoint-threshold
SAVED_ARRAYS = (
    8  # arrays of the final save timed (written as it writes them: core.store.arrays.WRITERS at once)
)
SPLITS: list[dict] = []
AUTO: list[int] = []  # each capture's time to its last batch's copy, and partials (or the write) after


SELECT_TRIES = [  # the paired kernel: the cut-off's first search window (2^near keys; 0: none), histograms
    dict(near=0),
    dict(near=6),
    dict(near=7),
    dict(near=7, hist_join=True),
    dict(near=7, hist_reuse=True),
    dict(near=7, hist_join=True, hist_reuse=True),
]
PROMPT_TRIES = [(1024, 4), (512, 4), (256, 4), (512, 2), (2048, 8)]


def device_ms(fn, reps: int = 20) -> float:
    """Mean device milliseconds of fn() over reps back-to-back calls, after one warm-up call."""
    fn()
    if not torch.cuda.is_available():  # Triton's interpreter: a smoke test, not a timing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def kernel_sweep(prompts: int, seq: int, d: int, dev: str = "cuda") -> dict:
    """Each selection and prompt kernel configuration on one random layer-batch: ms, registers, and
    whether its output equals the one-lane kernel's (or the default prompt kernel's) bit for bit.
    The fastest equal ones become the kernels' defaults for the rest of this run."""
    from core.kernels import reduce_gpu
    from core.kernels import select_gpu as sg

    n = prompts * seq
    g = torch.Generator(device=dev).manual_seed(0)
    a = (torch.randn(n, d, device=dev, generator=g) * torch.randn(n, d, device=dev, generator=g)).bfloat16()
    norm = (torch.rand(d, device=dev, generator=g) + 0.5).bfloat16()
    rows = torch.arange(n, dtype=torch.int32, device=dev)
    k = -(-d // 10)

    def select(**kw):
        counts = torch.zeros(d, dtype=torch.int32, device=dev)
        hist = torch.zeros((2, sg.HIST_SLOTS), dtype=torch.int32, device=dev)
        return lambda: sg.select_pack(a, rows, norm, k, counts, hist, 8, 100, True, **kw), counts, hist

    def outputs(**kw):
        fn, counts, hist = select(**kw)
        return fn(), counts, hist

    want = outputs(pairs=False)
    out = {"one_lane": {"ms": device_ms(select(pairs=False)[0])}, "select": []}
    for kw in ({"pairs": True, **tune} for tune in SELECT_TRIES):
        try:  # one configuration that does not compile must not end the run
            got = outputs(**kw)
            same = all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
            out["select"].append({**kw, "ms": device_ms(select(**kw)[0]), "identical": same})
        except Exception as e:  # noqa: BLE001
            out["select"].append({**kw, "error": repr(e)[:300], "identical": False})
    bits = want[0]
    out["count_bits_ms"] = device_ms(
        lambda: sg.count_bits(bits, torch.zeros(d, dtype=torch.int32, device=dev), d)
    )
    many = bits[None].expand(32, *bits.shape).contiguous()  # a batch's 32 layers in one launch
    out["count_bits_32_layers_at_once_ms"] = device_ms(
        lambda: sg.count_bits(many, torch.zeros((32, d), dtype=torch.int32, device=dev), d)
    )
    good = [c for c in out["select"] if c["identical"]]
    if good:
        best = min(good, key=lambda c: c["ms"])
        sg.PAIRS.update({key: best[key] for key in sg.PAIRS if key in best and key != "near"})  # see below
    # the window stays select_gpu's: random rows favour small windows that real models miss more often
    out["window"] = window_cost(a, norm, k, rows, dev)
    # what the histograms cost: the chosen kernel with no row sampled but the first (not a result)
    counts = torch.zeros(d, dtype=torch.int32, device=dev)
    hist = torch.zeros((2, sg.HIST_SLOTS), dtype=torch.int32, device=dev)
    out["no_histograms_ms"] = device_ms(
        lambda: sg.select_pack(a, rows, norm, k, counts, hist, 1 << 30, 100, True)
    )
    first = torch.arange(prompts, dtype=torch.int32, device=dev) * seq
    lengths = torch.full((prompts,), seq, dtype=torch.int32, device=dev)
    base = reduce_gpu.prompt_reduce(a, first, lengths, seq, block=1024, warps=4)
    out["prompt"] = []
    for block, warps in PROMPT_TRIES:
        try:
            got = reduce_gpu.prompt_reduce(a, first, lengths, seq, block=block, warps=warps)
            same = all(torch.equal(x, y) for x, y in zip(got, base, strict=True))
            ms = device_ms(
                lambda b=block, w=warps: reduce_gpu.prompt_reduce(a, first, lengths, seq, block=b, warps=w)
            )
            out["prompt"].append({"block": block, "warps": warps, "ms": ms, "identical": same})
        except Exception as e:  # noqa: BLE001
            out["prompt"].append({"block": block, "warps": warps, "error": repr(e)[:300], "identical": False})
    best = min((c for c in out["prompt"] if c["identical"]), key=lambda c: c["ms"])
    reduce_gpu.PROMPT.update(block=best["block"], warps=best["warps"])
    out["chosen"] = {"select": dict(sg.PAIRS), "prompt": dict(reduce_gpu.PROMPT)}
    if dev == "cuda":  # what one batch's firing words cost on the host side: pinning, and the copy
        words = torch.zeros((32, n, 2 * ((d + 63) // 64)), dtype=torch.int32, device=dev)
        t0 = time.perf_counter()
        host = torch.empty(words.shape, dtype=words.dtype, pin_memory=True)
        pin = time.perf_counter() - t0
        copy_ms = device_ms(lambda: host.copy_(words, non_blocking=True), reps=3)
        out["host_copy"] = {"gib": words.numel() * 4 / 2**30, "pin_ms": pin * 1e3, "copy_ms": copy_ms}
    try:
        out["registers"] = compiled_registers(sg)
    except Exception as e:  # noqa: BLE001
        out["registers"] = repr(e)[:300]
    return out


def prompt_sweep(prompts: int, seq: int, d: int, dev: str = "cuda") -> dict:
    """The prompt kernel's tiles (rows a step x neurons a program, warps) on one random layer-batch:
    device ms, and the largest difference of its means and sums from the default tile's, over their
    largest value (other tiles sum in another order); the best position and value must be equal."""
    from core.kernels import reduce_gpu

    g = torch.Generator(device=dev).manual_seed(0)
    a = (torch.randn(prompts * seq, d, device=dev, generator=g) * 2).bfloat16()
    first = torch.arange(prompts, dtype=torch.int32, device=dev) * seq
    lengths = torch.full((prompts,), seq, dtype=torch.int32, device=dev)
    base = reduce_gpu.prompt_reduce(a, first, lengths, seq)
    out = {"default": dict(reduce_gpu.PROMPT), "tiles": []}
    for rows in (8, 16, 32, 64):
        for block, warps in ((256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8)):
            kw = {"rows": rows, "block": block, "warps": warps}
            try:
                got = reduce_gpu.prompt_reduce(a, first, lengths, seq, **kw)
                pairs = zip(got[:2], base[:2], strict=True)
                diff = max(float((x - y).abs().max() / y.abs().max()) for x, y in pairs)
                same_best = all(torch.equal(x, y) for x, y in zip(got[2:], base[2:], strict=True))
                ms = device_ms(lambda kw=kw: reduce_gpu.prompt_reduce(a, first, lengths, seq, **kw))
                out["tiles"].append({**kw, "ms": ms, "rel_diff": diff, "same_best": same_best})
            except Exception as e:  # noqa: BLE001
                out["tiles"].append({**kw, "error": repr(e)[:200]})
            print(out["tiles"][-1], flush=True)
    return out


def window_cost(a, norm, k: int, rows, dev: str) -> dict:
    """The chosen kernel's window guess: its hit rate and ms on the sweep's rows, and on rows whose
    spread of log-magnitudes differs row to row (each |a| raised to its own power in [0.5, 2]), where
    the guess misses often. benchmarks/select_window.py gives the hit rate on a real model."""
    from select_window import window_hits  # beside this file

    from core.kernels import select_gpu as sg

    power = torch.empty((a.shape[0], 1), device=dev).uniform_(0.5, 2.0, generator=None)
    mixed = (a.float().sign() * a.float().abs().pow(power)).bfloat16()
    near, per_program = sg.PAIRS["near"], sg.PAIRS["per_program"]
    out = {"near": near, "per_program": per_program}
    for name, x in (("sweep_rows", a), ("mixed_spread_rows", mixed)):
        keys = ((x.abs() * norm).view(torch.int16).int() & 0x7FFF).int()
        cut = keys.topk(k, dim=1).values[:, -1].cpu().numpy()
        mean = (keys.sum(dim=1) // keys.shape[1]).cpu().numpy()
        calls = {n: _select_call(sg, x, rows, norm, k, n) for n in (0, near)}
        same = torch.equal(calls[0](), calls[near]())
        ms = {f"near_{n}_ms": device_ms(call) for n, call in calls.items()}
        hits = window_hits(cut, mean, near, per_program) if near else np.zeros(0)
        out[name] = {"hit_rate": float(hits.mean()) if near else None, **ms, "identical": same}
    return out


def _select_call(sg, x, rows, norm, k: int, near: int):
    counts = torch.zeros(x.shape[1], dtype=torch.int32, device=x.device)
    hist = torch.zeros((2, sg.HIST_SLOTS), dtype=torch.int32, device=x.device)
    return lambda: sg.select_pack(x, rows, norm, k, counts, hist, 8, 100, True, pairs=True, near=near)


def compiled_registers(sg) -> list:
    """Registers and spills of every compiled selection kernel (Triton's cache; best effort)."""
    found = []
    for fn in (sg._select_pack_kernel, sg._select_pairs_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in cache[0].values():
                consts = {
                    str(k): v for k, v in getattr(kernel, "constants", {}).items() if isinstance(v, int)
                }
                found.append({"kernel": fn.__name__, "warps": kernel.metadata.num_warps, "constants": consts,
                              "registers": kernel.n_regs, "spills": kernel.n_spills})  # fmt: skip
    return found


def profile_times(lm, encoded, batch_size: int, device: str) -> dict:
    """Device ms per operator (self time) of one bare pass and one capture over the same prompts: the
    reduction kernels' ms per call, and which operators the capture adds most time to."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    totals = []
    for step in (time_bare, time_capture):
        kwargs = {"write": False} if step is time_capture else {}
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(lm, encoded, batch_size, device, **kwargs)
        ops = {}
        for e in prof.key_averages():
            total = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if total > 0:
                ops[e.key[:80]] = (e.count, total / 1e3)
        totals.append(ops)
    bare, cap = totals
    delta = {name: cap[name][1] - bare.get(name, (0, 0.0))[1] for name in cap}
    top = sorted(delta, key=lambda name: -delta[name])[:15]
    return {
        "n_prompts": len(encoded),
        "device_ms_bare": sum(v[1] for v in bare.values()),
        "device_ms_capture": sum(v[1] for v in cap.values()),
        "added": [{"name": name, "calls": cap[name][0], "added_ms": delta[name],
                   "ms_per_call": cap[name][1] / max(cap[name][0], 1)} for name in top],
    }  # fmt: skip


class _FakeSet:
    def __init__(self, n):
        from core.prompts import Prompt

        self.prompts = tuple(Prompt(f"p{i}", None, "") for i in range(n))
        self.name, self.hash, self.categories, self.warnings = "random", "random", [], ()

    def __len__(self):
        return len(self.prompts)


def host_speed(device: str, mib: int = 1024) -> dict:
    """GB/s of the host parts a capture's writes pay, to tell one lease's host from another's (the
    default-writes ratio tracked them: 1.226-1.335 on three H200 leases, 2026-12-04): a copy into fresh
    pages (page faults included) and into warm ones, a write of the cache's temporary folder with its
    fsync, and on CUDA a device-to-host copy into pinned and into pageable memory."""
    n = mib << 20
    src = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)

    def rate(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return round(n / (time.perf_counter() - t0) / 1e9, 2)

    warm = np.empty_like(src)
    out = {"mib": mib, "memcpy_fresh_gb_s": rate(lambda: np.copyto(np.empty_like(src), src))}
    np.copyto(warm, src)
    out["memcpy_warm_gb_s"] = rate(lambda: np.copyto(warm, src))
    with tempfile.TemporaryDirectory() as tmp:

        def write() -> None:
            with open(Path(tmp) / "probe", "wb") as f:
                f.write(memoryview(src))
                f.flush()
                os.fsync(f.fileno())

        out["write_fsync_gb_s"] = rate(write)
    if device == "cuda":
        gpu = torch.from_numpy(src).to(device)
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        for name, host in (("d2h_pinned_gb_s", pinned), ("d2h_pageable_gb_s", torch.from_numpy(warm))):
            host.copy_(gpu)  # once untimed: the first copy sets up the path
            out[name] = rate(lambda host=host: (host.copy_(gpu), torch.cuda.synchronize()))
    return out


def run(
    shape: str,
    device: str,
    n_prompts: int,
    seq: int,
    batch_size: int,
    reps: int,
    write: bool,
    compare=False,
    kernels=False,
    inline=False,
    write_reps=0,
    auto_reps=0,
    run_chunks=10,
    run_tokens=10_000_000,
    count_rates=None,
) -> dict:
    """Bare vs capture; with `compare`, also capture through torch's ops instead of the fused kernels; with
    `kernels`, first time the kernels' configurations (kernel_sweep) and after, profile one capture."""
    host = host_speed(device, 1024 if device == "cuda" else 64)  # before the model takes the memory
    sweep = kernel_sweep(batch_size, seq, SHAPES[shape]["intermediate_size"]) if kernels else None
    torch.cuda.empty_cache() if kernels else None  # the sweep's layer-batch is not the capture's memory
    lm = random_model(shape, device)
    encoded = encoded_batches(n_prompts, seq, SHAPES[shape]["vocab_size"])
    # warm-up at the timed size (kernels, allocator, pinned host buffers of every batch in flight): at
    # one batch's size the first timed capture took 2.0 s against 1.0 (2026-12-04c), a lost repetition
    time_bare(lm, encoded, batch_size, device)
    time_capture(lm, encoded, batch_size, device, write=False)
    if compare:
        time_capture(lm, encoded[:batch_size], batch_size, device, write=False, fused=False)
    if inline:
        time_capture(lm, encoded, batch_size, device, write=False, overlap=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bare, full, plain, inline_runs = [], [], [], []
    for rep in range(reps):  # interleaved, so drift hits both alike; the bare pass first, then last
        if rep % 2 == 0:
            bare.append(time_bare(lm, encoded, batch_size, device))
        full.append(time_capture(lm, encoded, batch_size, device, write))
        if compare:
            plain.append(time_capture(lm, encoded, batch_size, device, write, fused=False))
        if inline:
            inline_runs.append(time_capture(lm, encoded, batch_size, device, write, overlap=False))
        if rep % 2 == 1:
            bare.append(time_bare(lm, encoded, batch_size, device))
    n_tokens = n_prompts * seq
    best_bare, best_cap = min(bare), min(full)
    # the same capture against the bare passes timed beside it, rep by rep: the GPU's clock drifts a few
    # per cent between phases (bare 0.916-0.923 s beside the reductions, 0.889 s after the cache-write
    # runs, 2026-12-04c), which the minimum over every phase's bare passes counts against the capture
    paired = [c / b for b, c in zip(bare, full, strict=True)]
    median = statistics.median(paired)
    interleaved = {"bare_s": best_bare, "ratio": best_cap / best_bare, "ratio_median": median}
    splits = [x for x in SPLITS if x["fused"] and x["overlap"] == reduce.OVERLAP][-reps:]
    # format 3: a run's chunks with their cache writes, per count rate, interleaved with the bare pass;
    # by default every token counted, a quarter, and the share a run of run_tokens counts by default
    defaults, shape_of = capture.CaptureConfig(), SHAPES[shape]
    kept = sample.sample_rate(
        defaults.sample_bytes, run_tokens, shape_of["num_hidden_layers"], shape_of["intermediate_size"]
    )
    default_rate = sample.count_rate(defaults.count_tokens, run_tokens, kept)
    count_rates = count_rates or (1.0, 0.25, default_rate)
    runs = {rate: [] for rate in count_rates} if write_reps else {}
    for _ in range(write_reps):
        bare.append(time_bare(lm, encoded, batch_size, device))
        for rate in count_rates:
            runs[rate].append(time_run(lm, encoded, batch_size, device, run_chunks, run_tokens, rate))
    best_bare = min(bare)
    auto = [time_capture(lm, encoded, 0, device, False) for _ in range(auto_reps)]
    extra = {}
    if kernels:
        extra = {
            "kernels": sweep,
            "profile": profile_times(lm, encoded[: n_prompts // 2], batch_size, device),
            "partials_steps": partials_breakdown(lm, encoded, batch_size, device),
        }
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "host": host,
        "shape": shape, "n_prompts": n_prompts, "seq": seq, "batch_size": batch_size, "reps": reps,
        "cache_writes": write, "bare_s": best_bare, "capture_s": best_cap, "ratio": best_cap / best_bare,
        "interleaved": interleaved, "bare_all": bare, "capture_all": full,
        "tokens_per_s": n_tokens / best_cap, "bare_tokens_per_s": n_tokens / best_bare,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "fused": device == "cuda",
        "splits_fused": splits,
        **({"torch_ops_capture_s": min(plain), "torch_ops_ratio": min(plain) / best_bare,
            "torch_ops_all": plain} if compare else {}),
        "reductions_beside_forward": reduce.OVERLAP,
        **({"inline_capture_s": min(inline_runs), "inline_ratio": min(inline_runs) / best_bare,
            "inline_all": inline_runs,
            "splits_inline": [x for x in SPLITS if x["fused"] and not x["overlap"]][-reps:],
            } if inline else {}),
        **({"batch_fit_to_memory": {"tokens_a_pass": AUTO[-1], "prompts_a_pass": AUTO[-1] // seq,
            "capture_s": min(auto), "ratio_to_bare_at_batch_size": min(auto) / best_bare, "all": auto,
            }} if auto_reps else {}),  # fmt: skip
        **({"with_cache_writes": {str(rate): with_writes(found, best_bare, n_tokens)
                                  for rate, found in runs.items()},
            "default_count_rate": default_rate} if write_reps else {}),
        **extra,
    }  # fmt: skip


def with_writes(found: list[dict], bare_s: float, chunk_tokens: int) -> dict:
    """A count rate's format-3 runs: the best chunk time against the bare pass, and what it implies for
    the whole run of `run_tokens` tokens: with its final save of the counts, and with the saves every
    CaptureConfig.checkpoint_seconds too (each as long as the final one; the next chunk waits for it)."""
    best = min(found, key=lambda r: r["chunk_s"])
    chunks = best["run_tokens"] / chunk_tokens
    save = best["counts_to_host_s"] + best["counts_one_array_save_s"] * best["counts_arrays"]
    saves = 1 + int(chunks * best["chunk_s"] // capture.CaptureConfig().checkpoint_seconds)
    counts_bytes = best["counts_array_bytes"] * best["counts_arrays"]
    db_per_token = (best["db_bytes"] + best["acts_bytes"]) / (best["chunks"] * chunk_tokens)  # the
    # file and the chunks' prompt means beside it
    return {
        "capture_s": best["chunk_s"], "ratio": best["chunk_s"] / bare_s, "all": [r["chunk_s"] for r in found],
        "final_save_s": save, "ratio_with_final_save": (chunks * best["chunk_s"] + save) / (chunks * bare_s),
        "saves": saves, "ratio_whole_run": (chunks * best["chunk_s"] + saves * save) / (chunks * bare_s),
        "cache_bytes_per_token": db_per_token + counts_bytes / best["run_tokens"],
        "cache_bytes_10m_tokens": db_per_token * 10_000_000 + counts_bytes, "counts_bytes": counts_bytes,
        "db_and_acts_bytes_per_token": db_per_token, **{k: best[k] for k in best if k != "chunk_s"},
    }  # fmt: skip


def whole_run(shape: str, device: str, n_tokens: int, seq: int, batch_size: int) -> dict:
    """One whole capture through `capture.capture`, as a user runs it: prompts of `seq` random ids,
    `n_tokens` in all, into a new cache (every chunk, the counts, their save and the finalise step),
    against the bare forward pass of its chunks (one chunk timed, three times; the pass is the same
    for every chunk). Its token sample and count budget are the defaults' shares of a 10M-token run,
    so a shorter run costs per chunk what such a run costs; its final save is the same size."""
    from core.prompts import from_texts
    from core.store import Store

    lm = random_model(shape, device)
    defaults, share = capture.CaptureConfig(), n_tokens / 10_000_000
    config = capture.CaptureConfig(
        batch_size=batch_size, max_tokens=seq, chat_template=False,
        sample_bytes=int(defaults.sample_bytes * share), count_tokens=int(defaults.count_tokens * share),
    )  # fmt: skip
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, SHAPES[shape]["vocab_size"], (n_tokens // seq, seq), generator=g).tolist()
    prompt_set = from_texts([" ".join(map(str, row)) for row in ids], name="random ids")
    chunk = encoded_batches(config.chunk_prompts, seq, SHAPES[shape]["vocab_size"])
    time_bare(lm, chunk[:batch_size], batch_size, device)  # warm-up
    bare = min(time_bare(lm, chunk, batch_size, device) for _ in range(3))
    print(f"bare pass of a chunk {bare:.3f} s; capturing {len(ids)} prompts", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "whole.duckdb")
        time_capture(lm, chunk[:batch_size], batch_size, device, write=False)  # warm-up: kernels
        sync(device)
        t0 = time.perf_counter()
        shown = set()

        def progress(done: int, total: int, stage: str) -> None:  # where the time went, even if cut off
            mark = (stage, done // config.chunk_prompts)  # a line a chunk
            if mark not in shown:
                shown.add(mark)
                print(
                    f"{time.perf_counter() - t0:7.1f} s: {stage} {done}/{total} prompts",
                    file=sys.stderr,
                    flush=True,
                )

        result = capture.capture(lm, prompt_set, store, config, progress=progress)
        sync(device)
        seconds = time.perf_counter() - t0
        folder = store.arrays_folder(result.run_id)  # counts and each chunk's prompt means
        counts_bytes = sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0
        store.close()
        db_bytes = (Path(tmp) / "whole.duckdb").stat().st_size
    n_chunks = -(-len(ids) // config.chunk_prompts)
    return {
        "whole_run_tokens": result.n_tokens, "chunks": n_chunks, "capture_s": seconds,
        "bare_chunk_s": bare, "bare_s": bare * n_chunks, "ratio": seconds / (bare * n_chunks),
        "sample_bytes": config.sample_bytes, "count_tokens": config.count_tokens,
        "db_bytes": db_bytes, "arrays_bytes": counts_bytes,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # the whole process
    }  # fmt: skip


def diagnose(shape: str, device: str, n_prompts: int, seq: int, batch_size: int, n_chunks: int) -> None:
    """Seconds per chunk of a format-3 run with and without its counts and its writes, and bare."""
    lm = random_model(shape, device)
    encoded = encoded_batches(n_prompts, seq, SHAPES[shape]["vocab_size"])
    time_run(lm, encoded[:batch_size], batch_size, device, 1, 10**7, 1.0, False, False)  # warm-up
    out = {"bare": min(time_bare(lm, encoded, batch_size, device) for _ in range(2))}
    for count, write, rate in ((False, False, 1.0), (False, True, 1.0), (True, False, 1.0), (True, True, 1.0),
                               (True, True, 0.25)):  # fmt: skip
        found = time_run(lm, encoded, batch_size, device, n_chunks, 10**7, rate, count, write)
        name = f"count={count} write={write}" + (f" count_rate={rate}" if count else "")
        out[name] = found["chunk_s"]
        out[f"{name} committing"] = found["write_s"]
        out[f"{name} each"] = found["each_s"]
        print(f"{name}: {found['chunk_s']:.3f} s a chunk, {found['write_s']:.3f} s of it committing; "
              "one by one " + " ".join(f"{t:.3f}" for t in found["each_s"]), flush=True)  # fmt: skip
        if count:
            print(
                f"  counts off the device {found['counts_to_host_s']:.2f} s, an array's save "
                f"{found['counts_one_array_save_s']:.3f} s (of {found['counts_arrays_saved']})",
                flush=True,
            )
    print(json.dumps(out))


def profile(shape: str, device: str, n_prompts: int, seq: int, batch_size: int) -> None:
    """Device time per operator of one reductions-only capture (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    lm = random_model(shape, device)
    encoded = encoded_batches(n_prompts, seq, SHAPES[shape]["vocab_size"])
    time_capture(lm, encoded[:batch_size], batch_size, device, write=False)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_capture(lm, encoded, batch_size, device, write=False)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="skip the cache transaction")
    p.add_argument("--profile", action="store_true", help="print device time per operator instead")
    p.add_argument("--compare", action="store_true", help="also time capture through torch's ops (unfused)")
    p.add_argument("--kernels", action="store_true", help="first time kernel configurations; profile after")
    p.add_argument("--inline", action="store_true", help="also time the reductions on the forward's stream")
    p.add_argument("--write-reps", type=int, default=0, help="then time this many captures with cache writes")
    p.add_argument("--auto-reps", type=int, default=0, help="then this many fit to free GPU memory")
    p.add_argument(
        "--whole-run", type=int, metavar="TOKENS", help="time one whole capture of this many tokens"
    )
    p.add_argument("--prompt-kernel", action="store_true", help="time the prompt kernel's tiles only")
    p.add_argument("--int8", action="store_true", help="count co-activations with int8 products, not fp8")
    p.add_argument("--diagnose", action="store_true", help="a format-3 run's chunk without counts, writes")
    p.add_argument("--checkpoint-threshold", default="", help="DuckDB's checkpoint_threshold, e.g. 1GB")
    p.add_argument("--run-chunks", type=int, default=10, help="chunks of each format-3 run (--write-reps)")
    p.add_argument("--run-tokens", type=int, default=10_000_000, help="the run they are the middle of")
    p.add_argument(
        "--count-rates", default="", help="shares of tokens counted, one format-3 run each, comma-separated "
        "(default: 1, 0.25 and the default count_tokens' share of --run-tokens)",
    )  # fmt: skip
    p.add_argument(
        "--smoke", action="store_true", help="the tiny shape on the CPU: 4 x 16 tokens, 1 repetition"
    )
    args = p.parse_args()
    if args.int8:  # the products the counts took before fp8 (a comparison)
        from core.kernels import coact_gpu

        coact_gpu.fp8_exact = lambda device: False
    if args.smoke:
        args.shape, args.device, args.prompts, args.seq, args.batch_size, args.reps = (
            "tiny",
            "cpu",
            4,
            16,
            2,
            1,
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.prompt_kernel:
        return print(
            json.dumps(prompt_sweep(args.batch_size, args.seq, SHAPES[args.shape]["intermediate_size"]))
        )
    if args.profile:
        return profile(args.shape, args.device, args.prompts, args.seq, args.batch_size)
    global THRESHOLD
    THRESHOLD = args.checkpoint_threshold
    if args.whole_run:
        return print(
            json.dumps(whole_run(args.shape, args.device, args.whole_run, args.seq, args.batch_size))
        )
    if args.diagnose:
        return diagnose(args.shape, args.device, args.prompts, args.seq, args.batch_size, args.run_chunks)
    result = run(
        args.shape, args.device, args.prompts, args.seq, args.batch_size, args.reps, not args.no_write,
        args.compare, args.kernels, args.inline, args.write_reps, args.auto_reps, args.run_chunks,
        args.run_tokens, tuple(float(r) for r in args.count_rates.split(",") if r) or None,
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
