"""Sharded capture: slices of a run captured apart (processes, GPUs, Ray workers), merged into one.

A shard is a capture of every N-th chunk of a run into its own DuckDB file with the same tables.
Merging copies the shards' chunk rows into the cache and finalises the run exactly as an
unsharded capture would (chunk partials are merged in chunk order, whoever computed them).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa

from core import settings
from core.capture import run as capture
from core.errors import BricklabError
from core.progress import Progress
from core.prompts import Prompt, PromptSet
from core.store import Store


def export_shard(path: str | Path) -> dict[str, pa.Table]:
    """Every run row and chunk row of a shard file, as Arrow tables (cheap to ship between machines)."""
    return Store.read_shard(path)


def merge_tables(store: Store, tables: dict[str, pa.Table]) -> list[str]:
    """Add a shard's runs and chunks to the cache (chunks already present are skipped)."""
    run_ids = []
    for run in tables["runs"].to_pylist():
        run_id = run["run_id"]
        run_ids.append(run_id)
        existing = store.run(run_id)
        captured_with = json.loads(run["settings"])
        if existing is not None and existing.settings != captured_with:
            raise BricklabError(
                f"Shards of run {run_id} disagree on capture settings.", "Capture all shards alike."
            )
        done = store.done_chunks(run_id)
        new_run = None
        if existing is None:
            row = {k: v for k, v in run.items() if k not in ("created", "finished")}
            row.update(status="incomplete", n_tokens=None, seconds=None)
            prompts = [r for r in tables["prompts"].to_pylist() if r["run_id"] == run_id]
            new_run = (row, [(p["prompt_idx"], p["prompt_id"], p["category"], p["text"]) for p in prompts])
        new_chunks = [c for c in _chunks_of(tables["chunks"], run_id) if c not in done]
        store.add_shard_chunks(run_id, tables, new_chunks, int(captured_with["chunk_prompts"]), new_run)
    return run_ids


def _chunks_of(chunks: pa.Table, run_id: str) -> list[int]:
    return [r["chunk"] for r in chunks.to_pylist() if r["run_id"] == run_id]


def finish(store: Store, run_ids: list[str]) -> list[str]:
    """Finalise every merged run whose chunks are all present; return those still missing chunks."""
    missing = []
    for run_id in dict.fromkeys(run_ids):
        run = store.run(run_id)
        if run.complete:
            continue
        if len(store.done_chunks(run_id)) < run.n_chunks:
            missing.append(run_id)
            continue
        config = capture.CaptureConfig(**run.settings)
        capture.finalise(store, run_id, run.n_layers, config)
    return missing


def merge(store: Store, shard_paths: list[str | Path]) -> tuple[list[str], list[str]]:
    """Merge shard files into the cache: (run ids merged, run ids still missing chunks)."""
    run_ids = []
    for path in shard_paths:
        run_ids += merge_tables(store, export_shard(path))
    return list(dict.fromkeys(run_ids)), finish(store, run_ids)


def _capture_shard(model_ref, device, name, prompts, settings, shard) -> dict[str, pa.Table]:
    """One shard in a fresh process: load the model, capture into a temp file, return its tables."""
    from core import models

    lm = models.load_model(model_ref, device=device)
    prompt_set = PromptSet(name, tuple(Prompt(*p) for p in prompts))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "shard.duckdb")
        capture.capture(lm, prompt_set, store, capture.CaptureConfig(**settings), shard=shard)
        store.close()
        return export_shard(Path(tmp) / "shard.duckdb")


def capture_ray(
    model_ref,
    prompt_set: PromptSet,
    store: Store,
    config: capture.CaptureConfig,
    n_shards: int,
    address: str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Fan the shards out as Ray tasks (one per GPU, or per CPU slot) and merge them into `store`."""
    try:
        import ray
    except ImportError as exc:
        raise BricklabError("Ray is not installed.", "pip install -r requirements-scale.txt") from exc
    from dataclasses import asdict

    if not ray.is_initialized():
        # workers import core/ from this checkout (on a cluster: the same path on every node)
        env = {"env_vars": {"PYTHONPATH": str(settings.ROOT)}}
        ray.init(address=address, runtime_env=env, include_dashboard=False, log_to_driver=False)
    gpus = 1 if (device or "").startswith("cuda") else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_capture_shard)
    prompts = [(p.id, p.category, p.text) for p in prompt_set.prompts]
    futures = [
        task.remote(model_ref, device, prompt_set.name, prompts, asdict(config), (i, n_shards))
        for i in range(n_shards)
    ]
    run_ids, pending = [], list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        run_ids += merge_tables(store, ray.get(ready[0]))
        if progress:
            progress(n_shards - len(pending), n_shards, "shards merged")
    missing = finish(store, run_ids)
    if missing:
        raise BricklabError(
            f"Runs {missing} still miss chunks after the merge.", "Re-run the missing shards."
        )
    return run_ids[0]
