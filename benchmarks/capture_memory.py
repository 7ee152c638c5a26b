"""Capture memory: peak RSS of capturing N prompts vs 4N prompts (the same prompts repeated, so the
same lengths) with the real default model, each in a fresh subprocess, against a model-only baseline.

The guarantee: 4x the prompts must not need 4x the memory (capture reduces on the fly per chunk).
Prints every figure, then as its last line one JSON object.
Run: python benchmarks/capture_memory.py [--quick | --smoke] [--prompts N] [--chunk C] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def repeated_set(n: int, times: int):
    """The first n default prompts, repeated `times` times under new ids: same lengths, new hash."""
    from core import prompts

    base = prompts.default_prompt_set().head(n)
    rows = [prompts.Prompt(f"{p.id}-r{r}", p.category, p.text) for r in range(times) for p in base.prompts]
    return prompts.PromptSet(f"default[:{n}]x{times}", tuple(rows))


def child(n: int, times: int, chunk: int, threads: int | None, smoke: bool) -> None:
    """In a fresh process: load the default (or tiny) model, capture n x times prompts (0: load only)."""
    import _tiny  # beside this file
    import torch

    from core import models
    from core.capture import run as capture
    from core.store import Store

    if threads:
        torch.set_num_threads(threads)
    lm = _tiny.model() if smoke else models.load_model(None, device="cpu")
    loaded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started, n_tokens = time.perf_counter(), 0
    if n:
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "memory.duckdb")
            config = capture.CaptureConfig(chunk_prompts=chunk)
            n_tokens = capture.capture(lm, repeated_set(n, times), store, config).n_tokens
            store.close()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    print(json.dumps({"after_load_mib": loaded_kib / 1024, "peak_mib": peak_kib / 1024,
                      "n_tokens": n_tokens, "seconds": time.perf_counter() - started}))  # fmt: skip


def measure(n: int, times: int, chunk: int, threads: int | None, smoke: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), str(times), "--chunk", str(chunk)]
    cmd += (["--threads", str(threads)] if threads else []) + (["--smoke"] if smoke else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"child {n}x{times} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{n * times:>5} prompts: peak RSS {result['peak_mib']:8.1f} MiB "
          f"(after loading {result['after_load_mib']:.1f}), {result['n_tokens']:,} tokens, "
          f"{result['seconds']:.0f} s")  # fmt: skip
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 vs 64 prompts, chunks of 8 (a few minutes)")
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 2 vs 8 prompts, chunks of 2")
    p.add_argument("--prompts", type=int, default=64, help="N: prompts of the default set (default 64)")
    p.add_argument("--chunk", type=int, default=16, help="prompts per committed chunk (default 16)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, args.chunk, args.threads, args.smoke)
        return
    n, chunk = (2, 2) if args.smoke else (16, 8) if args.quick else (args.prompts, args.chunk)
    base, one, four = (
        measure(n_, times, chunk, args.threads, args.smoke) for n_, times in ((0, 1), (n, 1), (n, 4))
    )
    growth_one = one["peak_mib"] - base["peak_mib"]
    growth_four = four["peak_mib"] - base["peak_mib"]
    summary = {
        "benchmark": "capture_memory",
        "model": "tiny-random" if args.smoke else "SmolLM2-135M-Instruct (default)",
        "prompts": [n, 4 * n],
        "chunk_prompts": chunk,
        "tokens": [one["n_tokens"], four["n_tokens"]],
        "peak_rss_mib": {"model_only": base["peak_mib"], "n": one["peak_mib"], "4n": four["peak_mib"]},
        "ratio_4n_over_n": four["peak_mib"] / one["peak_mib"],
        "capture_growth_mib": [growth_one, growth_four],
        "growth_ratio_4n_over_n": growth_four / growth_one if growth_one > 0 else None,
        "bounded": four["peak_mib"] < 4 * one["peak_mib"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
