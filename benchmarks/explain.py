"""What a neuron does, on a run: the vocabulary projection of every neuron (batched) against one
matrix-vector product per neuron; every neuron's description and its held-out score against the
control (each neuron scored with another neuron's tokens); a whole-run token search.

Works on a COPY of the cache (it writes cached results). Prints the figures and, as its last line,
one JSON object.
Run: python benchmarks/explain.py [--db COPY.duckdb] [--run ID] [--token Python] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core import models, settings
from core.bricks import explain, token_search, vocab
from core.store import Store


def per_neuron_s(lm: models.LoadedModel, n: int = 64) -> float:
    """Seconds per neuron when each neuron's column is read out on its own (the naive way)."""
    start = time.perf_counter()
    for i in range(n):
        vocab.neuron_tokens(lm, i * 7 % lm.info.n_neurons, vocab.TOP)
    return (time.perf_counter() - start) / n


def measure(lm: models.LoadedModel, store: Store, run_id: str, token: str) -> dict:
    start = time.perf_counter()
    vocab.projection(lm, store)
    projection_s = time.perf_counter() - start
    naive_s = per_neuron_s(lm) * lm.info.n_neurons
    start = time.perf_counter()
    scores = explain.all_explanations(store, run_id)
    explain_s = time.perf_counter() - start
    run = store.require_run(run_id)
    control = np.concatenate(
        [explain.layer_explanations(store, run_id, layer)[0]["control"] for layer in range(run.n_layers)]
    )
    start = time.perf_counter()
    found = token_search.token_activity(lm, store, run_id, token)
    search_s = time.perf_counter() - start
    top = token_search.rank_neurons(store, run_id, found, limit=20)
    return {
        "neurons": lm.info.n_neurons,
        "projection_s": round(projection_s, 2),
        "projection_naive_s": round(naive_s, 2),
        "projection_speedup": round(naive_s / max(projection_s, 1e-9), 1),
        "explain_all_s": round(explain_s, 2),
        "score_median": float(np.nanmedian(scores)),
        "control_median": float(np.nanmedian(control)),
        "share_good": float(np.mean(scores >= explain.TRUST[0][0])),
        "share_good_control": float(np.mean(control >= explain.TRUST[0][0])),
        "search_token": token,
        "search_s": round(search_s, 2),
        "search_prompts": found["prompts"],
        "search_top_median_lift": float(np.median([r["× run mean"] for r in top])),
        "load_avg": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--db", help="a COPY of the cache (default: a temporary copy of data/bricklab.duckdb)"
    )
    parser.add_argument("--run", help="run id (default: the newest complete run)")
    parser.add_argument("--token", default="Python", help="the token searched over the whole run")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="the tiny random model and a fresh small run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        import _tiny  # beside this file

        lm = _tiny.model()
        with _tiny.opened_run(lm) as (store, run_id):
            result = measure(lm, store, run_id, "the")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = (
                Path(args.db) if args.db else Path(shutil.copy(settings.db_path(), Path(tmp) / "copy.duckdb"))
            )
            store = Store(path)
            run = store.require_run(args.run)
            lm = models.load_model(None if run.model_id == models.DEFAULT_MODEL else run.model_id)
            result = measure(lm, store, run.run_id, args.token)
            store.close()
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
