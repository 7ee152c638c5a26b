"""`bricks`, `map` and `config`: a run's candidate bricks as a table or as JSON, the neuron map's
clusters, and a brick configuration file written from chosen bricks and modes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from core import configuration, experts
from core.bricks import candidates, neuron_map, neurons, scores
from core.bricks.configure import config_from_bricks
from core.errors import BricklabError
from core.store import Store


def register(sub) -> None:
    p = sub.add_parser("bricks", help="candidate bricks of a run, with labels and stability")
    _brick_args(p)
    p.add_argument(
        "--method", choices=candidates.METHODS, help="one method (default: every one the run allows)"
    )
    p.add_argument(
        "--json", action="store_true",
        help="print only JSON: every brick with its id, label, layers, size and neurons per layer",
    )  # fmt: skip
    p.set_defaults(func=cmd_bricks)
    p = sub.add_parser("map", help="embed every neuron in 2-D (UMAP) and cluster it (HDBSCAN)")
    p.add_argument("--run", help="run id (default: the newest complete run)")
    p.add_argument("--min-cluster-size", type=int, default=neuron_map.MapParams.min_cluster_size)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_map)
    p = sub.add_parser(
        "config", help="write a brick configuration from chosen bricks (for apply, prune and the app)",
        description="Each --brick takes the --mode and --factor that follow it, e.g. "
        "--brick coact-L01-03 --mode off --brick map-02 --mode scale --factor 0.5",
    )  # fmt: skip
    _brick_args(p)
    p.add_argument(
        "--method", choices=candidates.METHODS, help="the bricks' method (default: from their ids)"
    )
    p.add_argument("--brick", action=_AddBrick, dest="chosen", metavar="ID", help="a brick id (repeatable)")
    p.add_argument("--mode", action=_SetMode, choices=configuration.MODES, help="for the last --brick (off)")
    p.add_argument("--factor", action=_SetFactor, type=float, help="for the last --brick in mode scale")
    p.add_argument(
        "--keep", action=_AddBrick, dest="chosen", metavar="ID", help="keep-only: --brick ID --mode keep"
    )
    p.add_argument("--note", help="a note stored in the configuration")
    p.add_argument("-o", "--out", required=True, help="the configuration JSON file to write")
    p.set_defaults(func=cmd_config, chosen=[])


def _brick_args(p) -> None:
    p.add_argument("--run", help="run id (default: the newest complete run)")
    p.add_argument(
        "--size", type=int, default=candidates.BrickParams.size, help="coact: neurons per brick (32)"
    )
    p.add_argument("--no-stability", action="store_true", help="skip the half-prompt recomputation")


class _AddBrick(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        mode = "keep" if option_string == "--keep" else "off"
        namespace.chosen = [*namespace.chosen, {"id": value, "mode": mode, "factor": None}]


class _SetMode(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        _last(self, namespace)["mode"] = value


class _SetFactor(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        _last(self, namespace)["factor"] = value


def _last(action: argparse.Action, namespace) -> dict:
    """The brick the option belongs to: the last --brick before it."""
    if not namespace.chosen:
        raise argparse.ArgumentError(action, "comes before any --brick; write --brick ID first")
    return namespace.chosen[-1]


def _params(args, method: str) -> candidates.BrickParams:
    return candidates.BrickParams(method=method, size=args.size, stability=not args.no_stability)


# --- bricks ----------------------------------------------------------------------------------


def cmd_bricks(args) -> int:
    store = Store(args.db)
    try:
        run = store.require_run(args.run)
        methods = [args.method] if args.method else _methods(run)
        made, seconds = {}, {}
        for method in methods:
            started = time.perf_counter()
            made[method] = candidates.compute_bricks(store, run.run_id, _params(args, method))
            seconds[method] = time.perf_counter() - started
        if args.json:
            print(json.dumps(_bricks_json(run, made), separators=(",", ":")))
        else:
            _print_bricks(store, run, args, made, seconds)
    finally:
        store.close()
    return 0


def _methods(run) -> list[str]:
    """Every method, less functional for a run without categories (it needs them) and expert for a run
    of a dense model."""
    allowed = [m for m in candidates.METHODS if m != "expert" or run.model_type in experts.MOE_TYPES]
    if run.categories:
        return allowed
    print(
        f"note: run {run.run_id} has no prompt categories: no functional bricks, no labels", file=sys.stderr
    )
    return [m for m in allowed if m != "functional"]


def _bricks_json(run, made: dict) -> dict:
    out = {"run_id": run.run_id, "model_id": run.model_id, "n_layers": run.n_layers, "d_ff": run.d_ff}
    out["categories"] = list(run.categories)
    out["bricks"] = [_brick_json(b, run.d_ff) for found in made.values() for b in found]
    return out


def _brick_json(brick, d_ff: int) -> dict:
    layers, index = np.divmod(brick.neurons.astype(np.int64), d_ff)
    per_layer = {str(layer): index[layers == layer].tolist() for layer in brick.layers}
    return {
        "id": brick.brick_id, "method": brick.method, "label": brick.label, "layers": list(brick.layers),
        "size": brick.size, "stability": brick.stability, "p_values": brick.p_values,
        "top_tokens": [neurons.display_token(t) for t in brick.top_tokens], "neurons": per_layer,
    }  # fmt: skip


def _print_bricks(store: Store, run, args, made: dict, seconds: dict) -> None:
    print(f"run {run.run_id}: {run.n_layers} layers x {run.d_ff} neurons, {run.n_prompts} prompts")
    print(f"{'method':10}  {'bricks':>6}  {'mean size':>9}  {'functional':>10}  {'random':>7}  "
          f"{'stability':>9}  {'seconds':>7}")  # fmt: skip
    for method, found in made.items():
        share, random_share = "-", "-"
        if run.categories:
            params = _params(args, method)
            share = f"{candidates.functional_share(found):.1%}"
            random_share = f"{candidates.random_baseline_share(store, run.run_id, found, params):.1%}"
        stable = [b.stability for b in found if b.stability is not None]
        stability = f"{np.mean(stable):.3f}" if stable else "-"
        size = np.mean([b.size for b in found] or [0])
        print(f"{method:10}  {len(found):>6}  {size:>9.1f}  {share:>10}  {random_share:>7}  "
              f"{stability:>9}  {seconds[method]:>7.1f}")  # fmt: skip
    if not run.categories:
        print("functional, random: labels need prompt categories, and this run has none")
        return
    for method, found in made.items():
        counts = Counter(b.label for b in found if b.label).most_common()
        print(f"labels ({method}): {', '.join(f'{k} {v}' for k, v in counts) or 'none'}")
    print("random: the share for random bricks of the same sizes and layer mix (mean of 10 draws)")
    if "functional" in made:
        print()
        _print_layer_table(scores.layer_table(store, run.run_id, [b.neurons for b in made["functional"]]))


def _print_layer_table(table: dict) -> None:
    real, fake = table["real"], table["shuffled"]
    print("functionality per layer: real (shuffled labels)")
    heads = ("best", "5 per mille", "mean", "set neurons", "set mean")
    print(f"{'layer':>5}" + "".join(f"  {h:>{11 if h == 'set neurons' else 13}}" for h in heads))
    for layer in range(len(real["best"])):
        cells = [
            f"{real[k][layer]:.3f} ({fake[k][layer]:.3f})" for k in ("best", "permille5", "mean", "set_mean")
        ]
        print(f"{layer:>5}  {cells[0]:>13}  {cells[1]:>13}  {cells[2]:>13}  "
              f"{real['set_neurons'][layer]:>11}  {cells[3]:>13}")  # fmt: skip


# --- map -------------------------------------------------------------------------------------


def cmd_map(args) -> int:
    store = Store(args.db)
    try:
        run = store.require_run(args.run)
        params = neuron_map.MapParams(min_cluster_size=args.min_cluster_size, seed=args.seed)
        started = time.perf_counter()
        result = neuron_map.compute_map(store, run.run_id, params)
        seconds = time.perf_counter() - started
        top = (
            scores.top_neurons(scores.functionality_scores(store, run.run_id), 1.0) if run.categories else []
        )
    finally:
        store.close()
    noise = float(np.mean(result.labels < 0))
    print(f"run {run.run_id}: {len(result.labels):,} neurons, {result.n_clusters} clusters, "
          f"{noise:.1%} noise ({seconds:.1f} s)")  # fmt: skip
    heading = "best category (share of its top-1%)" if top else "best category: the run has no categories"
    print(f"{'cluster':>7}  {'neurons':>7}  {'layers':>9}  {heading}")
    for c, ids in enumerate(result.clusters()):
        layers = ids // run.d_ff
        shares = [np.isin(t, ids).mean() for t in top]
        best = int(np.argmax(shares)) if shares else -1
        tag = f"{run.categories[best]} ({shares[best]:.0%})" if best >= 0 else "-"
        print(f"{c:>7}  {len(ids):>7}  {layers.min():>4}-{layers.max():<4}  {tag}")
    return 0


# --- config ----------------------------------------------------------------------------------


def cmd_config(args) -> int:
    if not args.chosen:
        raise BricklabError("No bricks chosen.", "Name some with --brick ID --mode MODE (or --keep ID).")
    for pick in args.chosen:
        if (pick["factor"] is None) == (pick["mode"] == "scale"):
            need = "needs --factor" if pick["factor"] is None else "takes no --factor"
            raise BricklabError(
                f"--brick {pick['id']} --mode {pick['mode']} {need}.",
                "Give --factor F (e.g. 0.5) after a brick in mode scale, and only there.",
            )
    store = Store(args.db)
    try:
        run = store.require_run(args.run)
        found = _find(store, run, args)
    finally:
        store.close()
    chosen = [(found[pick["id"]], pick["mode"], pick["factor"] or 1.0) for pick in args.chosen]
    config = config_from_bricks(run, chosen, note=args.note)
    bricks = config.bricks
    Path(args.out).write_text(config.to_json())
    modes = Counter(b.mode for b in bricks)
    n_neurons = sum(len(v) for b in bricks for v in b.neurons.values())
    print(f"wrote {args.out}: {len(bricks)} bricks ({', '.join(f'{m} {n}' for m, n in modes.items())}), "
          f"{n_neurons:,} neurons, for {run.model_id} (run {run.run_id})")  # fmt: skip
    print(f"use it: `python -m core apply {args.out} --prompt TEXT`, `python -m core prune {args.out} DIR`")
    return 0


def _find(store: Store, run, args) -> dict:
    """The chosen bricks by id, from the (cached) bricks of each method they name."""
    ids = [pick["id"] for pick in args.chosen]
    if len(set(ids)) < len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise BricklabError(f"Brick {', '.join(twice)} is chosen twice.", "Give each brick one --mode.")
    methods = {args.method or i.split("-", 1)[0] for i in ids}
    if unknown := [i for i in ids if not args.method and i.split("-", 1)[0] not in candidates.METHODS]:
        raise BricklabError(
            f"Cannot tell the method of brick {', '.join(unknown)} from its id.",
            f"Give --method ({', '.join(candidates.METHODS)}) or ids as `bricks --json` prints them.",
        )
    found = {}
    for method in sorted(methods):
        found |= {b.brick_id: b for b in candidates.compute_bricks(store, run.run_id, _params(args, method))}
    if missing := [i for i in ids if i not in found]:
        raise BricklabError(
            f"Run {run.run_id} has no brick {', '.join(missing)} (method {'/'.join(sorted(methods))}, "
            f"size {args.size}).",
            f"List its bricks with `python -m core bricks --run {run.run_id} --json`.",
        )
    return found
