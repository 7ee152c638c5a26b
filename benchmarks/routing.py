"""Dynamic configuration on the default model: quality, active neurons and generation speed of
routers against the dense model, measured in one run on the held-out half of the default run.

Settings: dense; "dense kernel" (every neuron through the one-token numba kernel that sparse settings
use: the control that separates what skipping neurons saves from what the kernel saves); static
keep-only; category routing; token routing over co-activation bricks (MoEfication: oracle and learned
router) and over single neurons (oracle: exact top-k |a| with a sparse down projection; learned: a
low-rank map proposes neurons, optionally verified; gate: every neuron's gate proposes, as in CATS)
at several budgets. Token routers are timed with the prompt's pass dense (prefill="dense"), while
their loss is measured with every token routed (the pessimistic side). Loss: mean next-token loss
of the held-out prompts (per category and overall) relative to dense. Speed: greedy generation of a
fixed number of new tokens on a few held-out prompts, repetitions interleaved across settings;
fastest repetition per prompt (least disturbed by other work) as wall-time and process-CPU-time
ratios to dense and to the dense kernel, medians too. One torch thread by default.
Last line: one JSON object {"settings": [{"name", "active_share", "loss_ratio", "speedup", ...}]}.
Run: python benchmarks/routing.py [--quick | --smoke] [--db PATH] [--run RUN_ID] [--threads N]
    [--per-category N] [--only "name,name"] [--tokens N] [--reps N]
"""

import argparse
import contextlib
import json
import statistics
import time

import numpy as np
import torch

from core import models
from core.bricks import scores
from core.live import evaluate, sparse
from core.routing import route as routing
from core.routing.route import RouterParams
from core.store import Store

FASTER = 1.05  # a speedup counted as measurable on a shared, noisy CPU


KERNEL = "dense kernel"  # every neuron through the one-token kernel: the control for sparse settings


def settings(budgets: list[float], set_budgets: list[float], fit_prompts: int) -> dict:
    """name -> RouterParams (None: dense, or the dense kernel). Neuron sets also at `set_budgets`,
    where they get near dense."""
    out: dict[str, RouterParams | None] = {"dense": None, KERNEL: None}
    learned = {"fit_prompts": fit_prompts}
    for b in sorted(set(budgets) | set(set_budgets)):
        tag = f"{round(100 * b)}%"
        out[f"static {tag}"] = RouterParams(kind="static", budget=b)
        out[f"category {tag}"] = RouterParams(kind="category", budget=b)
        if b not in budgets:
            continue
        out[f"bricks oracle {tag}"] = RouterParams(kind="token", budget=b, oracle=True)
        out[f"bricks learned {tag}"] = RouterParams(kind="token", budget=b, **learned)
        out[f"neurons oracle {tag}"] = RouterParams(kind="token", budget=b, brick_size=1, oracle=True)
        out[f"neurons learned {tag}"] = RouterParams(kind="token", budget=b, brick_size=1, **learned)
        if b < 0.5:  # proposing 2 x 50% is the oracle
            out[f"neurons learned x2 {tag}"] = RouterParams(
                kind="token", budget=b, brick_size=1, proposed=2, **learned
            )
            out[f"neurons gate x2 {tag}"] = RouterParams(
                kind="token", budget=b, brick_size=1, gate=True, proposed=2
            )
    return out


def held_out(store: Store, run_id: str, per_category: int | None):
    """(texts, category names) of the held-out half, at most `per_category` per category."""
    half = routing.selection_half(store, run_id)
    labels, names = scores.category_labels(store, run_id)
    rows = store.prompts(run_id)
    picked = []
    for c in range(len(names)):
        members = np.flatnonzero(~half & (labels == c))
        picked += list(members[:per_category] if per_category else members)
    picked.sort()
    return [rows[i][3] for i in picked], [names[labels[i]] for i in picked]


def compute_share(params: RouterParams | None) -> float:
    """Share of the FFN's multiply-adds done per generated token (gate+up are 2/3, down 1/3)."""
    if params is None:
        return 1.0
    if params.kind != "token":
        return params.budget
    if params.oracle:
        return 2 / 3 + params.budget / 3
    if params.gate:
        return (1 + min(1.0, params.proposed * params.budget) + params.budget) / 3
    return (2 * min(1.0, params.proposed * params.budget) + params.budget) / 3


@torch.inference_mode()
def generate(lm, ids: list[int], n: int) -> int:
    inputs = torch.tensor([ids])
    out = lm.model.generate(
        inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
        do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
    )  # fmt: skip
    return out.shape[1] - len(ids)


def kernel_fns(lm) -> dict:
    """Every layer as a keep-all set: generated tokens run through the one-token kernel, prompts dense."""
    every = np.ones(lm.info.d_ff, dtype=bool)
    return {layer: sparse.KeepOnly(every) for layer in range(lm.info.n_layers)}


def running(lm, name: str, router, ids, span):
    """The context a setting runs in: dense, the dense kernel, or the router (token routers with
    the prompt's pass dense: only generated tokens are routed)."""
    if name == KERNEL:
        return sparse.sparse(lm.model, kernel_fns(lm))
    if router is None:
        return contextlib.nullcontext()
    prefill = "dense" if router.params.kind == "token" else "routed"
    return routing.routed(lm, router, ids, span, prefill=prefill)


def timed(lm, name: str, router, text: str, n: int) -> tuple[float, float]:
    """(wall, process CPU) seconds to route the prompt and generate n tokens under the setting."""
    ids, span = routing.prompt_span(lm, text)
    start, cpu = time.perf_counter(), time.process_time()
    with running(lm, name, router, ids, span):
        made = generate(lm, ids, n)
    assert made == n
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one budget, few prompts (under 2 minutes)")
    parser.add_argument("--smoke", action="store_true", help="--quick on a fresh run of a tiny random model")
    parser.add_argument("--db", help="the cache (default: BRICKLAB_DB or data/bricklab.duckdb); use a copy")
    parser.add_argument("--run", help="run id of a complete default-model run (default: the newest)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--tokens", type=int, help="new tokens per generation (default 32; quick 16)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default 3; quick 2)")
    parser.add_argument(
        "--per-category", type=int, help="held-out prompts per category for the loss (default all)"
    )
    parser.add_argument(
        "--only", help="comma-separated settings to run (dense and the dense kernel always run)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.smoke:
        return measure(args, Store(args.db) if args.db else Store(), models.load_model(None, device="cpu"))
    import _tiny  # beside this file

    args.quick, args.tokens, args.reps = True, args.tokens or 4, args.reps or 1
    lm = _tiny.model()
    with _tiny.opened_run(lm) as (store, args.run):
        measure(args, store, lm)


def measure(args, store: Store, lm) -> None:
    """Fit the routers on the run args.run, measure loss and speed, and print the report."""
    quick = args.quick
    budgets = [0.35] if quick else [0.2, 0.35, 0.5]
    n_tokens, reps = args.tokens or (16 if quick else 32), args.reps or (2 if quick else 3)
    run = store.require_run(args.run)
    texts, cats = held_out(store, run.run_id, args.per_category or (2 if quick else None))
    gen_texts = held_out(store, run.run_id, 1)[0][:: 7 if quick else 3]  # 1 (quick) or 3 categories
    print(f"run {run.run_id}: {len(texts)} held-out prompts for loss, {len(gen_texts)} for speed, "
          f"{n_tokens} new tokens, {reps} reps, {args.threads} thread(s)", flush=True)  # fmt: skip

    started = time.perf_counter()
    routers = {
        name: None if p is None else routing.fit(lm, store, run.run_id, p)
        for name, p in settings(budgets, [0.9] if quick else [0.65, 0.8, 0.9], 32 if quick else 0).items()
        if not args.only or name in ("dense", KERNEL) or name in args.only.split(",")
    }
    print(f"routers ready in {time.perf_counter() - started:.0f} s (fitted or from the cache)", flush=True)

    losses, shares = {}, {}
    for name, router in routers.items():
        t = time.perf_counter()
        if name == KERNEL:
            with sparse.sparse(lm.model, kernel_fns(lm)):
                losses[name], shares[name] = evaluate.loss_per_prompt(lm, texts), 1.0
        elif router is None:
            losses[name], shares[name] = evaluate.loss_per_prompt(lm, texts), 1.0
        else:
            losses[name], chosen = routing.routed_losses(lm, router, texts)
            per_text = [routing.active_share(router, c) for c in chosen]
            shares[name] = float(np.mean(per_text))
        print(f"  loss {name}: {np.nanmean(losses[name]):.4f} ({time.perf_counter() - t:.0f} s)", flush=True)

    times = {name: [[] for _ in gen_texts] for name in routers}
    names = list(routers)
    for rep in range(reps + 1):  # rep 0 warms up (gathers, caches) and is not counted
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            for i, text in enumerate(gen_texts):
                measured = timed(lm, name, routers[name], text, n_tokens)
                if rep:
                    times[name][i].append(measured)
    assert sparse.patched_count(lm.model) == 0
    report(routers, losses, shares, times, cats, n_tokens)


def report(routers, losses, shares, times, cats, n_tokens) -> None:
    categories = sorted(set(cats), key=cats.index)
    base = losses["dense"]

    def total(name, which, pick):  # summed over prompts of the best (or median) repetition
        return sum(pick([t[which] for t in per_prompt]) for per_prompt in times[name])

    dense_wall, dense_cpu = total("dense", 0, min), total("dense", 1, min)
    kernel_wall, kernel_cpu = total(KERNEL, 0, min), total(KERNEL, 1, min)
    dense_median = total("dense", 0, statistics.median)
    n_gen = len(times["dense"]) * n_tokens
    head = (
        f"{'setting':<24} {'active':>6} {'compute':>7} {'loss':>6} {'speedup':>7} {'median':>6} {'cpu':>6} "
        f"{'vs kern':>7} {'k cpu':>6}  "
    )
    print(head + " ".join(f"{c[:6]:>6}" for c in categories))
    rows = []
    for name, router in routers.items():
        per_cat = {
            c: float(np.nanmean([x for x, k in zip(losses[name], cats, strict=True) if k == c]))
            / float(np.nanmean([x for x, k in zip(base, cats, strict=True) if k == c]))
            for c in categories
        }
        row = {
            "name": name,
            "active_share": round(shares[name], 4),
            "ffn_compute_share": round(compute_share(None if router is None else router.params), 4),
            "loss_ratio": round(float(np.nanmean(losses[name]) / np.nanmean(base)), 4),
            "speedup": round(dense_wall / total(name, 0, min), 3),
            "speedup_median": round(dense_median / total(name, 0, statistics.median), 3),
            "cpu_ratio": round(dense_cpu / total(name, 1, min), 3),
            "speedup_vs_kernel": round(kernel_wall / total(name, 0, min), 3),
            "cpu_ratio_vs_kernel": round(kernel_cpu / total(name, 1, min), 3),
            "sparse": router is not None,
            "loss_ratio_per_category": {c: round(v, 4) for c, v in per_cat.items()},
        }
        rows.append(row)
        cells = [row["active_share"], row["ffn_compute_share"], row["loss_ratio"], row["speedup"]]
        cells += [
            row["speedup_median"],
            row["cpu_ratio"],
            row["speedup_vs_kernel"],
            row["cpu_ratio_vs_kernel"],
        ]
        widths = (6, 7, 6, 7, 6, 6, 7, 6)
        line = " ".join(f"{v:>{w}.3f}" for v, w in zip(cells, widths, strict=True))
        print(f"{name:<24} {line}  " + " ".join(f"{per_cat[c]:>6.3f}" for c in categories))
    good = [r for r in rows if r["loss_ratio"] <= 1.10 and r["sparse"]]
    best = max(good, key=lambda r: r["speedup"], default=None)
    faster = [r["name"] for r in good if min(r["speedup"], r["cpu_ratio"]) >= FASTER]
    by_skipping = [r["name"] for r in good if min(r["speedup_vs_kernel"], r["cpu_ratio_vs_kernel"]) >= FASTER]
    print(f"dense: {n_gen / dense_wall:.1f} tokens/s (fastest repetitions, wall)")
    print(f"within 10% of dense loss: {', '.join(r['name'] for r in good) or 'none'}; fastest of them: "
          f"{best['name'] if best else 'none'}; of them >= {FASTER}x faster (wall and CPU): "
          f"{', '.join(faster) or 'none'}; of them also >= {FASTER}x faster than the dense kernel: "
          f"{', '.join(by_skipping) or 'none'}")  # fmt: skip
    summary = {"dense_tokens_per_s": round(n_gen / dense_wall, 2), "best_within_10pct": best and best["name"]}
    summary |= {"within_10pct_and_faster": faster, "within_10pct_and_faster_than_kernel": by_skipping}
    print(json.dumps({"settings": rows, **summary}))


if __name__ == "__main__":
    main()
