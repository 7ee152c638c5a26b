"""The Paper analysis: its wall time cold (empty results cache) with batched evaluations and the
tokens its evaluations ran (analysis_counts: core.live.evaluate.loss_per_prompt's counts); with
--resident-control, then the on-demand ablation matrix without resident neurons alone (what the
analysis computed before it was on demand: both, less one shared baseline evaluation); one
evaluation (the held-out prompts, nothing masked) batched vs one prompt at a time with the losses
compared, and with --rules the ablation matrix and selectivity of each selection rule. With --compare,
the cold analysis again as before masks shared their forward passes (one loss_per_prompt call per mask:
the baseline, in the same run) and the ratio.
Last line: one JSON object. One torch thread per core given by --threads (default 2).
Run: python benchmarks/analysis.py [--db FILE] [--run ID] [--reps N] [--full-baseline] [--compare]
     [--resident-control] [--rules ap,contrastive,no_resident,per_layer,validated] [--skip-timing] [--smoke]
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from core import analysis, models, settings
from core.bricks import scores
from core.live import evaluate
from core.store import Store


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def one_evaluation(lm, a: analysis.Analysis, reps: int) -> dict:
    """Fastest of `reps` interleaved repetitions of one evaluation, batched and one prompt at a time."""
    texts = [t for group in a.eval_texts for t in group]
    limit = a.config.max_tokens
    times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    losses = {}
    for _ in range(reps):
        for name, size in (("batched", a.config.batch_size), ("one_at_a_time", 1)):
            seconds, losses[name] = timed(
                lambda s=size: evaluate.loss_per_prompt(lm, texts, s, max_tokens=limit)
            )
            times[name].append(seconds)
    best = {k: min(v) for k, v in times.items()}
    return {
        "eval_prompts": len(texts),
        "eval_batched_s": round(best["batched"], 3),
        "eval_one_at_a_time_s": round(best["one_at_a_time"], 3),
        "eval_ratio": round(best["one_at_a_time"] / best["batched"], 2),
        "max_abs_loss_diff": float(np.nanmax(np.abs(losses["batched"] - losses["one_at_a_time"]))),
    }


def one_call_per_mask(lm, texts, masks, *args, **kwargs) -> np.ndarray:
    """core.live.evaluate.losses_under as it ran before masks shared passes: a call per mask."""
    kwargs.pop("on_pass", None)
    return np.array([LOSSES_UNDER(lm, texts, [m], *args, **kwargs)[0] for m in masks]).reshape(len(masks), -1)


LOSSES_UNDER = evaluate.losses_under


def apart(store: Store, lm, run_id: str, config: analysis.ReportConfig, shared_s: float) -> dict:
    """The cold analysis again with a loss_per_prompt call per mask (the baseline), and the ratio."""
    store.clear_results()
    counts: dict = {}
    evaluate.losses_under = one_call_per_mask
    try:
        seconds = timed(lambda: analysis.report(store, lm, run_id, config, counts=counts))[0]
    finally:
        evaluate.losses_under = LOSSES_UNDER
    out = {"analysis_cold_apart_s": round(seconds, 1), "analysis_apart_counts": counts,
           "analysis_apart_ratio": round(seconds / shared_s, 2)}  # fmt: skip
    print(
        f"Paper analysis cold, a call per mask (before): {out['analysis_cold_apart_s']} s; "
        f"{counts.get('tokens', 0)} tokens ({counts.get('padded_tokens', 0)} padded), "
        f"{counts.get('passes', 0)} passes; before / now = {out['analysis_apart_ratio']}x"
    )
    return out


def resident_control(store: Store, lm, run_id: str, config: analysis.ReportConfig) -> dict:
    """The on-demand section alone, after the report: its wall and CPU time and its counts."""
    counts: dict = {}
    started = time.process_time()
    seconds = timed(
        lambda: analysis.report(store, lm, run_id, config, counts=counts, extra=analysis.ON_DEMAND)
    )[0]
    out = {
        "resident_control_s": round(seconds, 1),
        "resident_control_cpu_s": round(time.process_time() - started, 1),
        "resident_control_counts": counts,
    }
    print(
        f"then the matrix without resident neurons: {out['resident_control_s']} s "
        f"(process CPU {out['resident_control_cpu_s']} s); {counts.get('evaluations', 0)} evaluations, "
        f"{counts.get('tokens', 0)} tokens"
    )
    return out


def rule_matrices(store: Store, lm, run_id: str, rules: list[str], config: analysis.ReportConfig) -> dict:
    """Per rule: the ablation matrix on the held-out half (7 rows + random), its selectivity and
    diagonal; the unmasked and repeated evaluations are shared between rules."""
    out, shared = {}, None
    for rule in rules:
        a = analysis.Analysis(store, lm, run_id, replace(config, rule=rule), None)
        if shared:
            a._known = shared
        shared = a._known
        seconds, m = timed(lambda a=a: a.ablation(exclude_resident=False))
        out[rule] = {k: m[k] for k in ("increase_pct", "random", "selectivity", "diagonal_dominant")}
        out[rule]["seconds"] = round(seconds, 1)
        if "validated_neurons" in m:
            out[rule]["validated_neurons"] = m["validated_neurons"]
        print(f"\nrule {rule} ({scores.RULE_NOTES[rule]}), {seconds:.0f} s")
        print_matrix(m)
    return out


def print_matrix(m: dict) -> None:
    names = m["categories"]
    print(" " * 12 + "".join(f"{c[:10]:>11}" for c in names))
    for name, row in zip([*names, "random"], [*m["increase_pct"], m["random"]], strict=True):
        print(f"{name[:11]:<12}" + "".join(f"{v:>+11.1f}" for v in row))
    print(
        f"{'selectivity':<12}"
        + "".join(f"{'n/a' if v is None else f'{v:.1f}':>11}" for v in m["selectivity"])
    )
    print(f"{'diagonal':<12}" + "".join(f"{str(d):>11}" for d in m["diagonal_dominant"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=str(settings.db_path()), help="cache to copy (never opened itself)")
    parser.add_argument("--run", help="run id (default: the largest complete run)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the single evaluation")
    parser.add_argument(
        "--full-baseline", action="store_true", help="also time the whole analysis one prompt at a time"
    )
    parser.add_argument(
        "--compare", action="store_true", help="also the analysis with a call per mask (before), same run"
    )
    parser.add_argument(
        "--rules", default="", help="comma-separated selection rules to measure (see core report --rule)"
    )
    parser.add_argument(
        "--resident-control", action="store_true", help="also the on-demand matrix without resident neurons"
    )
    parser.add_argument("--skip-timing", action="store_true", help="only the rules")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="a fresh tiny run and model, quick settings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = analysis.ReportConfig()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            import _tiny  # beside this file

            lm = _tiny.model()
            copy, args.run = _tiny.run(lm, tmp)
            config, args.reps = config.quick(), 1
            args.rules = args.rules or ",".join(scores.RULES)
            args.resident_control = args.compare = True
        else:
            copy = Path(tmp) / "bench.duckdb"
            shutil.copy(args.db, copy)
        store = Store(copy)
        try:
            store.clear_results()  # cold: nothing of the analysis is cached
            run = store.require_run(args.run) if args.run else analysis.default_run(store)
            if not args.smoke:
                lm = models.load_model(
                    None if run.model_id == models.DEFAULT_MODEL else run.model_id, device="cpu"
                )
            out = {"run": run.run_id, "prompts": run.n_prompts, "threads": args.threads}
            if not args.skip_timing:
                counts: dict = {}
                started = time.process_time()
                out["analysis_cold_s"] = round(
                    timed(lambda: analysis.report(store, lm, run.run_id, config, counts=counts))[0], 1
                )
                out["analysis_cold_cpu_s"] = round(time.process_time() - started, 1)
                out["analysis_counts"] = counts
                out["load_avg"] = [round(x, 2) for x in os.getloadavg()]
                print(
                    f"Paper analysis cold, batched: {out['analysis_cold_s']} s "
                    f"(process CPU {out['analysis_cold_cpu_s']} s, load {out['load_avg'][0]}); "
                    f"{counts.get('evaluations', 0)} evaluations, {counts.get('tokens', 0)} tokens "
                    f"({counts.get('padded_tokens', 0)} padded), {counts.get('targets', 0)} predicted"
                )
                if args.resident_control:
                    out |= resident_control(store, lm, run.run_id, config)
                if args.compare:
                    out |= apart(store, lm, run.run_id, config, out["analysis_cold_s"])
                if args.full_baseline:
                    store.clear_results()
                    one = replace(config, batch_size=1)
                    out["analysis_cold_one_at_a_time_s"] = round(
                        timed(lambda: analysis.report(store, lm, run.run_id, one))[0], 1
                    )
                    out["analysis_ratio"] = round(
                        out["analysis_cold_one_at_a_time_s"] / out["analysis_cold_s"], 2
                    )
                    print(
                        f"Paper analysis cold, one prompt at a time: {out['analysis_cold_one_at_a_time_s']} s"
                    )
                a = analysis.Analysis(store, lm, run.run_id, config, None)
                out |= one_evaluation(lm, a, args.reps)
                print(f"one evaluation of {out['eval_prompts']} prompts: batched {out['eval_batched_s']} s, "
                      f"one at a time {out['eval_one_at_a_time_s']} s, ratio {out['eval_ratio']}x, "
                      f"largest loss difference {out['max_abs_loss_diff']:.2e}")  # fmt: skip
            rules = [r for r in args.rules.split(",") if r]
            if rules:
                out["rules"] = rule_matrices(store, lm, run.run_id, rules, config)
        finally:
            store.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
