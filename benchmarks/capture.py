"""Capture overhead: a bare forward pass of the decoder stack vs a full capture into a fresh DuckDB file.

Both run the same prompts in the same batches (the bare pass as capture makes it: each chunk's shared
template prefix once, every prompt cut after its last own token); repetitions are interleaved so machine
load hits both alike. Also times the whole templated prompts through the model, the forward pass capture
made before (capture_over_whole_prompts_cpu). Prints every timing, then as its last line one JSON object.
Target on CPU: ratio <= 1.25.
Run: python benchmarks/capture.py [--quick | --smoke] [--prompts N] [--reps R] [--threads T] [--profile]
     python benchmarks/capture.py --device cuda --shape llama3-8b   (random weights, see gpu_capture.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import _tiny  # beside this file
import torch

from core import models, prompts
from core.capture import run as capture
from core.store import Store


def padded_batches(lm, encoded, config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Whole templated prompts right-padded in capture's batches (capture.batches, per chunk): the
    forward pass capture made before it shared the template prefix and cut after the own tokens."""
    pad = lm.tokenizer.pad_token_id or 0
    out = []
    for chunk in chunks(encoded, config):
        for group in capture.batches([len(e.ids) for e in chunk], config.batch_size, None):
            rows = [chunk[i].ids for i in group]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, r in enumerate(rows):
                ids[row, : len(r)], mask[row, : len(r)] = torch.tensor(r), 1
            out.append((ids, mask))
    return out


def chunks(encoded, config) -> list[list]:
    return [encoded[lo : lo + config.chunk_prompts] for lo in range(0, len(encoded), config.chunk_prompts)]


def capture_tokens(encoded, config) -> int:
    """Token positions capture's own forward passes compute: each chunk's prefix once, then its batches."""
    total = 0
    for chunk in chunks(encoded, config):
        shared = capture.shared_prefix(chunk)
        for group in capture.batches([len(e.ids) for e in chunk], config.batch_size, None):
            total += len(group) * (max(chunk[i].end for i in group) - shared)
        total += shared
    return total


class Clock:
    """Wall time and this process's CPU time: on a shared machine the CPU time is the steadier one."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.inference_mode()
def time_bare(lm, encoded, config) -> Clock:
    """Capture's own forward passes (`model.base_model`: each chunk's shared prefix once, then its
    batches up to the last own token), without hooks or reductions: the floor capture is held to."""
    with Clock() as clock:
        for chunk in chunks(encoded, config):
            shared, prefix = capture.prefix_cache(lm, chunk)
            for group in capture.batches([len(e.ids) for e in chunk], config.batch_size, None):
                _, _, inputs = capture.batch_inputs(lm, chunk, group, shared, prefix)
                lm.model.base_model(**inputs)
    return clock


@torch.inference_mode()
def time_whole(lm, batches) -> Clock:
    """The whole templated prompts through the decoder stack: what the forward pass cost before."""
    with Clock() as clock:
        for ids, mask in batches:
            lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    return clock


def time_capture(lm, prompt_set, config, folder: Path) -> Clock:
    """A whole capture (tokenising, hooks, reductions, every cache write, finalising) into a new file;
    `clock.cache` is the finished file's size, its used and free blocks, after the store is closed."""
    path = Path(tempfile.mkdtemp(dir=folder)) / "bench.duckdb"
    store = Store(path)
    try:
        with Clock() as clock:
            result = capture.capture(lm, prompt_set, store, config)
    finally:
        store.close()
    assert not result.cache_hit
    store = Store(path)  # closed, every write is in the file; reopened, the blocks read back
    try:
        used, free, block = store.file_blocks()
    finally:
        store.close()
    size = path.stat().st_size
    clock.cache = {"cache_bytes": size, "cache_used_blocks": used, "cache_free_blocks": free,
                   "cache_block_bytes": block, "cache_bytes_per_token": size / max(result.n_tokens, 1),
                   }  # fmt: skip
    return clock


def run_cpu(
    n_prompts: int, reps: int, batch_size: int, threads: int | None, profile: bool, smoke=False
) -> dict:
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    lm = _tiny.model() if smoke else models.load_model(None, device="cpu")
    prompt_set = prompts.default_prompt_set().head(n_prompts)
    config = capture.CaptureConfig(batch_size=batch_size)
    limit = prompts.token_limit(lm.model, config.max_tokens)
    encoded = [prompts.encode(lm.tokenizer, p.text, limit, config.chat_template) for p in prompt_set.prompts]
    batches = padded_batches(lm, encoded, config)
    bare, full, whole = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        time_bare(lm, encoded[:1], config)  # warm-up: allocator, kernels, lazy imports
        time_capture(lm, prompt_set.head(batch_size or capture.CPU_BATCH), config, folder)
        for rep in range(reps):  # interleaved; the order alternates so neither always runs second
            first_bare = rep % 2 == 0
            if first_bare:
                bare.append(time_bare(lm, encoded, config))
            full.append(time_capture(lm, prompt_set, config, folder))
            if not first_bare:
                bare.append(time_bare(lm, encoded, config))
            whole.append(time_whole(lm, batches))
            b, c = bare[-1], full[-1]
            print(
                f"rep {rep}: whole prompts {whole[-1].wall:.3f} s (cpu {whole[-1].cpu:.3f}), "
                f"bare {b.wall:.3f} s (cpu {b.cpu:.3f}), "
                f"capture {c.wall:.3f} s (cpu {c.cpu:.3f}), "
                f"ratio {c.wall / b.wall:.3f} (cpu {c.cpu / b.cpu:.3f})",
                flush=True,
            )
        cache = full[-1].cache
        mib, per_token = cache["cache_bytes"] / 2**20, cache["cache_bytes_per_token"]
        used, free = cache["cache_used_blocks"], cache["cache_free_blocks"]
        print(f"finished cache {mib:.1f} MiB, {per_token:.0f} B a token; blocks used {used}, free {free}")
        if profile:
            profile_capture(lm, prompt_set, config, folder)
    n_tokens = sum(len(e.ids) for e in encoded)
    bare_s, capture_s = min(c.wall for c in bare), min(c.wall for c in full)
    bare_cpu, capture_cpu = min(c.cpu for c in bare), min(c.cpu for c in full)
    return {
        "device": "cpu", "model": lm.info.model_id, "threads": torch.get_num_threads(),
        "n_prompts": len(prompt_set), "n_tokens": n_tokens,
        "n_prompt_tokens": sum(e.end - e.start for e in encoded),
        "n_padded_tokens": capture_tokens(encoded, config),
        "n_whole_padded_tokens": sum(ids.numel() for ids, _ in batches),
        "batch_size": batch_size, "reps": reps,
        "bare_s": bare_s, "capture_s": capture_s, "ratio": capture_s / bare_s,
        "ratio_median": statistics.median(c.wall for c in full) / statistics.median(c.wall for c in bare),
        "ratio_per_rep": [c.wall / b.wall for b, c in zip(bare, full, strict=True)],
        "cpu_ratio": capture_cpu / bare_cpu, "bare_cpu_s": bare_cpu, "capture_cpu_s": capture_cpu,
        "whole_prompts_s": min(c.wall for c in whole), "whole_prompts_cpu_s": min(c.cpu for c in whole),
        "capture_over_whole_prompts_cpu": capture_cpu / min(c.cpu for c in whole),
        "bare_all": [c.wall for c in bare], "capture_all": [c.wall for c in full],
        "tokens_per_s": n_tokens / capture_s, "bare_tokens_per_s": n_tokens / bare_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_avg_1min": os.getloadavg()[0], "wall_s": time.perf_counter() - started, **cache,
    }  # fmt: skip


def profile_capture(lm, prompt_set, config, folder: Path) -> None:
    """Where capture's time goes beyond the forward pass: torch operators, then Python functions."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_capture(lm, prompt_set, config, folder)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    profiler = cProfile.Profile()
    profiler.runcall(time_capture, lm, prompt_set, config, folder)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="48 prompts, 2 repetitions (under a minute)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 8 prompts, 1 repetition")
    p.add_argument("--prompts", type=int, help="default set prompts (160; cuda: 64 x 512 tokens)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--batch-size", type=int, default=capture.CaptureConfig().batch_size)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--profile", action="store_true", help="also profile one capture")
    p.add_argument("--device", default="cpu", help="cpu (the default model) or cuda (needs --shape)")
    p.add_argument("--shape", help="a random-weight model of this shape instead (benchmarks/gpu_capture.py)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gpu = bool(args.shape) or args.device != "cpu"
    n_prompts, reps = (48, 2) if args.quick else (args.prompts or (64 if gpu else 160), args.reps)
    n_prompts, reps = (8, 1) if args.smoke else (n_prompts, reps)
    if gpu:  # reductions and host copies against bare (the target), torch's ops and in-line, then with writes
        import gpu_capture

        shape = args.shape or "llama3-8b"
        result = gpu_capture.run(
            shape, args.device, n_prompts, 512, 16, reps, False, compare=True, inline=True, write_reps=2
        )
    else:
        result = run_cpu(n_prompts, reps, args.batch_size, args.threads, args.profile, args.smoke)
    print(f"peak RSS {result['peak_rss_gib']:.2f} GiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
