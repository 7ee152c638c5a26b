"""Cost of applying a brick configuration: greedy generation on the default model, plain vs inside an
empty configuration vs with a few bricks off, repetitions interleaved in one run.

Prints per-setting times and, as its last line, one JSON object with the ratios (fastest repetition
of each setting, as timeit does: the least disturbed by other work on the machine; medians too).
One torch thread by default: on a shared, oversubscribed CPU two threads were 4x slower and noisier;
with one thread, process CPU time (also reported) is the least disturbed by other processes.
Run: python benchmarks/interventions.py [--quick | --smoke] [--threads N]
"""

import argparse
import json
import statistics
import time

import _tiny  # beside this file
import torch

from core import models
from core.configuration import Brick, BrickConfig
from core.live import compare
from core.live.interventions import configured, hook_count

PROMPT = "Write a short story about a robot who learns to paint."


def settings(lm) -> dict:
    info = lm.info
    empty = BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, ())
    layers = dict.fromkeys(x for x in (2, 9, 16, 23, info.n_layers - 1) if x < info.n_layers)
    bricks = tuple(
        Brick(f"b{layer}", {layer: list(range(32 * k, 32 * (k + 1)))}, "off")
        for k, layer in enumerate(layers)
    )
    few_off = BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, bricks)
    return {"plain": None, "empty_config": empty, "config": few_off}


def timed(lm, config, ids, n) -> tuple[float, float, list[int]]:
    """(wall seconds, process CPU seconds, generated ids)."""
    start, cpu = time.perf_counter(), time.process_time()
    if config is None:
        out = compare.generate(lm, ids, n)
    else:
        with configured(lm, config):
            out = compare.generate(lm, ids, n)
    return time.perf_counter() - start, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions instead of 10 (under a minute)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, 1 repetition, 4 tokens")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    reps = 1 if args.smoke else 2 if args.quick else 10
    tokens = 4 if args.smoke else args.tokens
    torch.set_num_threads(args.threads)
    lm = _tiny.model() if args.smoke else models.load_model(None, device="cpu")
    ids = compare.prompt_ids(lm, PROMPT)
    cases = settings(lm)
    outputs = {name: timed(lm, config, ids, tokens)[2] for name, config in cases.items()}  # warm-up
    assert outputs["plain"] == outputs["empty_config"], "an empty configuration changed the generation"
    times, cpu = {name: [] for name in cases}, {name: [] for name in cases}
    names = list(cases)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate who goes first
            seconds, cpu_seconds, out = timed(lm, cases[name], ids, tokens)
            assert out == outputs[name], f"{name} is not deterministic"
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
    assert hook_count(lm.model) == 0
    n_tokens = len(outputs["plain"])
    for name, ts in times.items():
        each = ", ".join(f"{t:.2f}" for t in ts)
        print(
            f"{name:13} min {min(ts):.3f} s  median {statistics.median(ts):.3f} s  "
            f"CPU min {min(cpu[name]):.3f} s  ({n_tokens} tokens, {reps} reps: {each})"
        )
    print(f"config changes the generation: {outputs['config'] != outputs['plain']}")
    plain, empty, config = (min(times[k]) for k in names)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "tokens": n_tokens,
        "reps": reps,
        "threads": args.threads,
        "plain_s": round(plain, 4),
        "empty_config_s": round(empty, 4),
        "config_s": round(config, 4),
        "ratio_empty": round(empty / plain, 3),
        "ratio_config": round(config / plain, 3),
        "ratio_empty_median": round(med["empty_config"] / med["plain"], 3),
        "ratio_config_median": round(med["config"] / med["plain"], 3),
        "cpu_ratio_empty": round(min(cpu["empty_config"]) / min(cpu["plain"]), 3),
        "cpu_ratio_config": round(min(cpu["config"]) / min(cpu["plain"]), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
