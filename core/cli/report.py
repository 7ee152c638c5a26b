"""`report`: the paper's analysis of a run as text, or as one JSON object and nothing else.

A run too small for a section (a category with no held-out prompt leaves null values) gets a
note in that section saying which categories lack prompts, and "n/a" in their cells.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from core import analysis, models
from core.bricks import scores
from core.errors import BricklabError
from core.store import Store

NA = "n/a"


def register(sub) -> None:
    p = sub.add_parser("report", help="the paper's analysis of a run: sparsity, scores, ablation matrix")
    p.add_argument("--run", help="run id (default: the largest complete run, most prompts)")
    p.add_argument("--json", action="store_true", help="print only the report as one JSON object")
    p.add_argument(
        "--quick", action="store_true", help="fewer held-out prompts and k values (rougher numbers)"
    )
    p.add_argument(
        "--thorough", action="store_true",
        help="8 held-out prompts per category and every 10%% of the lowest-k curve, with the "
        "--resident-control matrix (about 4x slower)",
    )  # fmt: skip
    p.add_argument(
        "--resident-control", action="store_true",
        help="also the ablation matrix without resident neurons (active for every category): as many "
        "evaluations again as the ablation matrix; shown whenever it is cached",
    )  # fmt: skip
    p.add_argument(
        "--rule",
        choices=scores.RULES,
        default=analysis.ReportConfig.rule,
        help="how each category's top neurons are selected (default: %(default)s): "
        + "; ".join(f"{k}: {v}" for k, v in scores.RULE_NOTES.items()),
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store(args.db)
    try:
        run = store.require_run(args.run) if args.run else _default_run(store)
        if not run.categories:  # checked before the model loads for nothing
            raise BricklabError(
                f"The report compares prompt categories, and run '{run.run_id}' has none.",
                "Capture a prompt set whose prompts have a 'category' (JSONL or CSV, not TXT).",
            )
        config = analysis.ReportConfig(rule=args.rule)
        config = config.quick() if args.quick else config.thorough() if args.thorough else config
        extra = analysis.ON_DEMAND if args.resident_control or args.thorough else ()
        lm = None
        if analysis.missing_sections(store, run.run_id, config, extra):
            default = None if run.model_id == models.DEFAULT_MODEL else run.model_id
            lm = models.load_model(args.model or default, device=args.device)
        bar = tqdm(unit="eval", desc="report", disable=args.quiet)  # on stderr: stdout may be JSON

        def progress(done: int, total: int, message: str) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = analysis.report(store, lm, run.run_id, config, progress, extra=extra)
        finally:
            bar.close()
    finally:
        store.close()
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
    else:
        print_report(result, run.n_prompts)
    return 0


def _default_run(store: Store):
    run = analysis.default_run(store)
    print(
        f"report: run {run.run_id} ({run.n_prompts} prompts, {run.model_id}), the largest complete run; "
        "name another with --run (list them with `python -m core runs`)",
        file=sys.stderr,
    )
    return run


def print_report(r: dict, n_prompts: int) -> None:
    print(f"run {r['run_id']} ({r['model_id']})")
    _print_sparsity(r["sparsity"], n_prompts)
    _print_functionality(r["functionality"])
    _print_ablation(r["ablation_matrix"], n_prompts)
    if r["ablation_matrix_no_resident"] is None:
        print("\nAblation matrix without resident neurons: not computed (add --resident-control)")
    else:
        _print_ablation(r["ablation_matrix_no_resident"], n_prompts)
    o = r["overlap"]
    pct = r["config"]["percent"]
    print(f"\nOverlap of the top-{pct:g}% sets ({o['measure']}; random {o['random_expectation']})")
    _print_matrix(o["categories"], o["categories"], o["matrix"], "{:.3f}")
    _print_recombination(r["recombination"], n_prompts)
    print("\nVerdicts")
    for name, v in analysis.verdicts(r).items():
        print(f"  {name}: {v['text']}")


def _print_sparsity(s: dict, n_prompts: int) -> None:
    sp = s["indicators"]
    print("\nSparsity: share of neurons under 0.2 of the per-token max, per layer")
    for layer, (a, o) in enumerate(
        zip(sp["abs"]["share_below_0.2"], sp["output"]["share_below_0.2"], strict=True)
    ):
        print(f"  layer {layer:>2}  |a| {a:6.1%}   output {o:6.1%}")
    print("Loss when the lowest k% of neurons per token are zeroed (held-out prompts)")
    if all(v is None for v in sp["abs"]["loss"]):
        print(f"  {_too_small(n_prompts, 'no category has a held-out prompt')}")
        return
    for i, k in enumerate(s["ks"]):
        print(f"  k={k:>2}%  |a| {_cell('{:.4f}', sp['abs']['loss'][i])}   "
              f"output {_cell('{:.4f}', sp['output']['loss'][i])}")  # fmt: skip


def _print_functionality(f: dict) -> None:
    print("\nFunctionality scores (AP) per layer, mean over categories: real / shuffled labels")
    print(f"  {'layer':>5}  {'best':>13}  {'top 0.5%':>13}  {'mean':>13}")
    for layer in range(len(f["real"]["best"][0])):
        cells = []
        for stat in ("best", "top_0.5pct", "mean"):
            real, shuffled = (_mean([row[layer] for row in f[k][stat]]) for k in ("real", "shuffled"))
            cells.append(f"{_cell('{:.3f}', real)} / {_cell('{:.3f}', shuffled)}")
        print(f"  {layer:>5}  " + "  ".join(f"{c:>13}" for c in cells))


def _print_ablation(a: dict, n_prompts: int) -> None:
    excluded = f", {a['excluded_resident']} resident neurons excluded" if a["excluded_resident"] else ""
    print(f"\nAblation matrix{excluded}: perplexity increase % (row: whose top-{a['neurons_per_category']} "
          f"neurons are zeroed; column: whose held-out prompts are measured)")  # fmt: skip
    print(f"  {a['split']}")
    _print_matrix(a["categories"] + ["random"], a["categories"], a["increase_pct"] + [a["random"]], "{:+.1f}")
    lacking = [c for c, n in zip(a["categories"], a["eval_prompts_per_category"], strict=True) if not n]
    if lacking:
        print(f"  {_too_small(n_prompts, 'no held-out prompt for ' + ', '.join(lacking))}")
    print(f"  selection rule {a.get('rule', 'ap')}: {scores.RULE_NOTES[a.get('rule', 'ap')]}")
    print(f"  {analysis.SELECTIVITY_NOTE}")
    _print_matrix(["selectivity"], a["categories"], [a["selectivity"]], "{:.1f}")
    dominant = [c for c, d in zip(a["categories"], a["diagonal_dominant"], strict=True) if d]
    print(f"  diagonal dominates for {len(dominant)}/{len(a['categories'])}: {', '.join(dominant) or 'none'}")


def _print_recombination(rc: dict, n_prompts: int) -> None:
    print(f"\nRecombination: keep only the top neurons of {' + '.join(rc['kept'])}; loss per category")
    names, values = ["baseline"], [rc["baseline_loss"]]
    for row in rc["rows"]:
        names += [f"top {row['percent']:g}% each ({row['share_kept']:.1%} kept)", "  random union, same size"]
        values += [row["loss"], row["random_loss"]]
    _print_matrix(names, rc["categories"], values, "{:.3f}")
    lacking = [c for c, v in zip(rc["categories"], rc["baseline_loss"], strict=True) if v is None]
    if lacking:
        print(f"  {_too_small(n_prompts, 'no held-out prompt for ' + ', '.join(lacking))}")


def _too_small(n_prompts: int, what: str) -> str:
    return (
        f"This run ({n_prompts} prompts) is too small for this section: {what}; a category needs at "
        "least 2 prompts to hold one out. Capture more prompts (e.g. `capture --limit 64`)."
    )


def _mean(values: list) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _cell(fmt: str, value) -> str:
    """A number in `fmt`, or n/a for a value the run was too small to measure (JSON null)."""
    return NA if value is None else fmt.format(value)


def _print_matrix(rows: list[str], cols: list[str], values, fmt: str) -> None:
    width = max(8, *(len(c) for c in cols)) + 1
    label = max(len(r) for r in rows) + 2
    print(" " * label + "".join(f"{c[: width - 1]:>{width}}" for c in cols))
    for name, row in zip(rows, values, strict=True):
        print(f"{name:<{label}}" + "".join(f"{_cell(fmt, v):>{width}}" for v in row))
