"""The app's two interactive paths, through the same core calls the pages make:

- neuron detail: p95 latency of `neurons.neuron_detail` (stats, category scores, top examples with
  their prompts' tokens) for random neurons of a run;
- brick toggle: what the Playground does when a brick is switched: serialise and validate the
  configuration, then `compare.compare` with the cached baseline generation (its tokens and
  log-probabilities): the configured generation, plus one teacher-forced pass over the tokens after
  the first divergence for the per-token KL; against plain generation of the same tokens. Wall and CPU
  time, interleaved; the paired ratio is the median over repeats of toggle / plain.

Run on a COPY of a cache (the app may hold the original):
  cp data/bricklab.duckdb /tmp/bench.duckdb && python benchmarks/app.py --db /tmp/bench.duckdb
The last line is one JSON object with neuron_detail_p95_ms and regen_ratio.
`--smoke` runs both paths on a fresh run of a tiny random model instead, in seconds.
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch

from core import configuration, models
from core.bricks import candidates as bricks
from core.bricks import neurons, scores
from core.live import compare, interventions
from core.store import Store

PROMPT = "Write a short poem about the sea and explain its meter."


def neuron_detail_ms(store: Store, run, queries: int, seed: int) -> list[float]:
    scores.functionality_scores(store, run.run_id)  # computed once per run (cached), not per query
    neurons.neuron_detail(store, run.run_id, 0, 0)  # warm the connection and the plans
    rng = np.random.default_rng(seed)
    out = []
    for layer, neuron in zip(
        rng.integers(0, run.n_layers, queries), rng.integers(0, run.d_ff, queries), strict=True
    ):
        start = time.perf_counter()
        neurons.neuron_detail(store, run.run_id, int(layer), int(neuron))
        out.append(1000 * (time.perf_counter() - start))
    return out


def one_brick_config(store: Store, run, lm) -> configuration.BrickConfig:
    """The run's most enriched functional brick (top 5% of one category), switched off."""
    found = bricks.compute_bricks(store, run.run_id, bricks.BrickParams(method="functional", stability=False))
    best = min(found, key=lambda b: min(b.p_values.values(), default=1.0))
    brick = bricks.brick_to_config(best, run.n_layers, run.d_ff, "off")
    info = lm.info
    return configuration.BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, (brick,))


def regen_seconds(store: Store, run, lm, tokens: int, repeats: int) -> tuple[dict[str, list[float]], int]:
    """Interleaved timings: plain generation; the configured generation alone; and the whole
    brick toggle as the Playground runs it (validate, configured generation, per-token KL)."""
    config = one_brick_config(store, run, lm)
    ids = compare.prompt_ids(lm, PROMPT)
    baseline = compare.generate_scored(lm, ids, tokens)  # the Playground caches this once per prompt
    times = {name: [] for name in ("plain", "configured", "toggle")}
    cpu = {name: [] for name in times}

    def timed(name, fn):
        wall, proc = time.perf_counter(), time.process_time()
        fn()
        times[name].append(time.perf_counter() - wall)
        cpu[name].append(time.process_time() - proc)

    def configured():
        with interventions.configured(lm, config, store, run.run_id):
            compare.generate(lm, compare.prompt_ids(lm, PROMPT), tokens)

    def toggle():
        loaded = configuration.loads(config.to_json(), lm.info)
        compare.compare(lm, PROMPT, loaded, tokens, store, run.run_id, baseline=baseline)

    for _ in range(repeats):
        timed("plain", lambda: compare.generate(lm, compare.prompt_ids(lm, PROMPT), tokens))
        timed("configured", configured)
        timed("toggle", toggle)
    return times, cpu, sum(len(v) for v in config.bricks[0].neurons.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="a copy of a bricklab cache (required unless --smoke)")
    parser.add_argument(
        "--smoke", action="store_true", help="a fresh tiny run, 5 queries, 1 repeat, 4 tokens"
    )
    parser.add_argument("--run", help="run id (default: the newest complete run)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.smoke:
        if not args.db:
            parser.error("--db is required (or --smoke)")
        return measure(args, Store(args.db))
    import _tiny  # beside this file

    args.queries, args.repeats, args.tokens = 5, 1, 4
    lm = _tiny.model()
    with _tiny.opened_run(lm) as (store, args.run):
        measure(args, store, lm)


def measure(args, store: Store, lm=None) -> None:
    """Both paths on the run args.run (default: the newest complete one); prints the JSON line."""
    run = store.require_run(args.run)
    print(f"run {run.run_id}: {run.model_id}, {run.n_layers} x {run.d_ff} neurons, {run.n_prompts} prompts")
    detail = neuron_detail_ms(store, run, args.queries, args.seed)
    p50, p95 = np.percentile(detail, [50, 95])
    spread = f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(detail):.1f} ms"
    print(f"neuron detail, {args.queries} random neurons: {spread}")

    lm = lm or models.load_model(None if run.model_id == models.DEFAULT_MODEL else run.model_id)
    times, cpu, size = regen_seconds(store, run, lm, args.tokens, args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}
    cpu_median = {name: statistics.median(t) for name, t in cpu.items()}
    paired = statistics.median(t / p for t, p in zip(times["toggle"], times["plain"], strict=True))
    for name, what in (
        ("plain", "plain generation"),
        ("configured", "generation with the brick off"),
        ("toggle", "brick toggle in the Playground (validate + generate + per-token KL)"),
    ):
        print(
            f"{what}, {args.tokens} tokens: median {median[name]:.3f} s {[round(t, 3) for t in times[name]]}"
        )
    print(f"({size} neurons off)")
    print(json.dumps({
        "neuron_detail_p50_ms": round(float(p50), 2), "neuron_detail_p95_ms": round(float(p95), 2),
        "regen_ratio": round(median["toggle"] / median["plain"], 3),
        "regen_ratio_paired_median": round(paired, 3),
        "regen_cpu_ratio": round(cpu_median["toggle"] / cpu_median["plain"], 3),
        "generation_only_ratio": round(median["configured"] / median["plain"], 3),
        "plain_generation_s": round(median["plain"], 3), "toggle_regeneration_s": round(median["toggle"], 3),
        "tokens": args.tokens, "run_id": run.run_id, "device": lm.info.device,
        "threads": torch.get_num_threads(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
