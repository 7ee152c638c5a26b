"""Wall time of the brick pipeline (each method) and of the neuron map on a copy of a run, from
an empty results cache; also the functional share of co-activation bricks against a random
partition of the same sizes. Last line: one JSON object.
Run: python benchmarks/bricks.py [--db FILE] [--run ID] [--no-stability] [--skip-map] [--smoke]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from core import settings
from core.bricks import candidates as bricks
from core.bricks import neuron_map, scores
from core.store import Store


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def warm_up_umap() -> float:
    """Seconds to import umap and hdbscan and compile their numba code on a toy input."""
    import numpy as np

    start = time.perf_counter()
    import hdbscan
    import umap

    toy = np.random.default_rng(0).random((5000, 8), dtype=np.float32)  # > 4096: NN-descent path
    coords = umap.UMAP(n_epochs=5, init="pca", random_state=0, n_jobs=1).fit_transform(toy)
    hdbscan.HDBSCAN(min_cluster_size=10).fit(coords)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=str(settings.db_path()), help="cache to copy (never opened itself)")
    parser.add_argument("--run", help="run id (default: the newest complete run)")
    parser.add_argument("--no-stability", action="store_true", help="skip the half-prompt recomputations")
    parser.add_argument("--skip-map", action="store_true", help="leave out the map and the map bricks")
    parser.add_argument("--smoke", action="store_true", help="a fresh tiny run; no stability, no map")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            import _tiny  # beside this file

            copy, args.run = _tiny.run(_tiny.model(), tmp)
            args.no_stability = args.skip_map = True
        else:
            copy = Path(tmp) / "bench.duckdb"
            shutil.copy(args.db, copy)
        store = Store(copy)
        store.clear_results()  # measure from scratch, not cache hits
        run = store.require_run(args.run)
        out = {"run": run.run_id, "neurons": run.n_layers * run.d_ff, "prompts": run.n_prompts}
        out["n_tokens"] = run.n_tokens
        print(f"run {run.run_id}: {run.n_layers} x {run.d_ff} neurons, {run.n_prompts} prompts")
        out["functionality_s"], _ = timed(lambda: scores.functionality_scores(store, run.run_id))
        print(f"functionality scores (AP, all categories): {out['functionality_s']:.1f} s")
        methods = ["coact", "functional"] + ([] if args.skip_map else ["map"])
        total = out["functionality_s"]
        if not args.skip_map:  # the map alone; the map bricks then add the stability map (seed + 1)
            out["umap_first_call_s"] = round(warm_up_umap(), 2)
            print(f"umap + hdbscan import and numba compilation (once): {out['umap_first_call_s']} s")
            seconds, result = timed(lambda: neuron_map.compute_map(store, run.run_id))
            out |= {"map_s": round(seconds, 2), "map_clusters": result.n_clusters}
            total += seconds
            print(f"neuron map (UMAP + HDBSCAN): {seconds:.1f} s, {result.n_clusters} clusters")
        for method in methods:
            params = bricks.BrickParams(method=method, stability=not args.no_stability)
            seconds, found = timed(lambda p=params: bricks.compute_bricks(store, run.run_id, p))
            hit, _ = timed(lambda p=params: bricks.compute_bricks(store, run.run_id, p))
            share = bricks.functional_share(found)
            baseline = bricks.random_baseline_share(store, run.run_id, found, params)
            total += seconds
            key = f"bricks_{method}"
            out |= {f"{key}_s": round(seconds, 2), f"{key}_cache_hit_s": round(hit, 4)}
            out |= {f"{key}_count": len(found), f"{key}_functional_share": round(share, 4)}
            out |= {f"{key}_random_share": round(baseline, 4)}
            print(f"{method:10} {len(found):5} bricks in {seconds:6.1f} s (cache hit {hit * 1000:.1f} ms); "
                  f"functional {share:.1%} vs random partition {baseline:.1%}")  # fmt: skip
        out["pipeline_s"] = round(total, 2)
        out["functionality_s"] = round(out["functionality_s"], 2)
        print(f"whole pipeline (scores + {', '.join(methods)}): {total:.1f} s")
        store.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
