"""Sharded capture: slices of a run captured apart (processes, GPUs, Ray workers), merged into one.

A shard is a capture of every N-th chunk of a run into its own DuckDB file with the same tables.
Merging copies the shards' chunk rows into the cache and finalises the run exactly as an
unsharded capture would (chunk partials are summed in chunk order, whoever computed them; the
chunks' top examples are merged into the run's running top examples as they arrive, in an order
that makes the result the same whatever the order of the shards).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import settings
from core.capture import run as capture
from core.capture.reduce import merge_top, read_top
from core.errors import BricklabError
from core.progress import Progress
from core.prompts import Prompt, PromptSet
from core.store import Store
from core.store.arrays import Lazy, shard_rows
from core.store.schema import TOP_ARRAYS


def merge_tables(store: Store, tables: dict[str, pa.Table]) -> list[str]:
    """Add a shard's runs and chunks to the cache (chunks already present are skipped); `tables`:
    `Store.read_shard` of its file."""
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
        shard_chunks = _chunks_of(tables["chunks"], run_id)
        new_chunks = [c for c in shard_chunks if c not in done]
        top = _merged_top(store, run, tables, shard_chunks, new_chunks)
        counts = _merged_counts(store, run_id, tables, shard_chunks, new_chunks)
        chunk_prompts = int(captured_with["chunk_prompts"])
        store.add_shard_chunks(run_id, tables, new_chunks, chunk_prompts, new_run, top, counts)
    return run_ids


def _merged_top(store, run, tables, shard_chunks, new_chunks) -> list | None:
    """The run's top examples with those of the shard's new chunks merged in, as `top_state` rows.

    A shard holds each chunk's own top examples (`chunk_arrays`, from every bricklab version); a file
    of a capture without --shard holds their running merge (`top_state`) as well, which cannot be
    split by chunk, so it merges only when every chunk of it is new.
    """
    run_id, settings_ = run["run_id"], json.loads(run["settings"])
    if not new_chunks:
        return None
    if run["status"] == "complete":
        raise BricklabError(
            f"The file holds the finished run {run_id}, not a shard of it.",
            "Give shard files written by capture --shard.",
        )
    per_chunk = _rows_of(tables["chunk_arrays"], run_id)
    per_chunk = per_chunk.filter(pc.is_in(per_chunk["chunk"], pa.array(new_chunks, per_chunk["chunk"].type)))
    tops = [per_chunk.filter(pc.is_in(per_chunk["name"], pa.array(TOP_ARRAYS)))]
    state = _rows_of(tables.get("top_state"), run_id)
    if state is not None and state.num_rows:
        if sorted(new_chunks) != sorted(shard_chunks):
            raise BricklabError(
                f"Run {run_id}: the file overlaps chunks already merged, and its top examples are merged "
                "over all its chunks, so they cannot be taken for its new chunks alone.",
                "Capture the missing chunks with capture --shard, or merge the file into a fresh cache.",
            )
        tops.append(state)
    elif set(new_chunks) - set(tops[0]["chunk"].to_pylist()):
        what = f"Run {run_id}: some of the shard's chunks hold no top examples."
        raise BricklabError(what, "Capture the shard again.")
    rows = []
    for layer in range(run["n_layers"]):
        pieces = read_top(store.top_state(run_id, layer), run["d_ff"])
        for table in tops:
            pieces += read_top(_payloads(table.filter(pc.equal(table["layer"], layer))), run["d_ff"])
        merged = merge_top(pieces, int(settings_["top_k"]), int(settings_["chunk_prompts"]))
        rows += [(layer, name, a) for name, a in zip(TOP_ARRAYS, merged, strict=True)]
    return rows


def _merged_counts(store, run_id, tables, shard_chunks, new_chunks) -> tuple[list, list[int]] | None:
    """The run's co-activation counts (a partial token sample, core.capture.counts) with the shard's
    added, and the chunks they then sum over; None when the shard has none. A file's counts are summed
    over all its chunks, so they add only when every chunk of it is new."""
    rows = _rows_of(tables.get("arrays"), run_id)
    if rows is None or not rows.num_rows or not new_chunks:
        return None
    if sorted(new_chunks) != sorted(shard_chunks):
        raise BricklabError(
            f"Run {run_id}: the file overlaps chunks already merged, and its co-activation counts are "
            "summed over all its chunks, so they cannot be taken for its new chunks alone.",
            "Capture the missing chunks with capture --shard, or merge the file into a fresh cache.",
        )
    if {c for chunks in rows["chunks"].to_pylist() for c in chunks} != set(shard_chunks):
        raise BricklabError(
            f"Run {run_id}: the shard's co-activation counts do not cover all its chunks (it was stopped).",
            "Run the shard's capture again to finish it, then merge it.",
        )
    merged = []  # each sum made as it is written: a few of them held at a time (26 GB in all for 8B)
    for row, theirs in shard_rows(rows):
        total = functools.partial(_added, store, run_id, row["name"], row["layer"], theirs)
        merged.append((row["layer"], row["name"], Lazy(total)))
    return merged, sorted(store.array_chunks(run_id) | set(shard_chunks))


def _added(store, run_id: str, name: str, layer: int, theirs) -> np.ndarray:
    """The run's array `name` of `layer` (none yet: zeros) plus a shard's (`theirs()`)."""
    mine = store.read_array(run_id, name, layer)
    return theirs() if mine is None else mine + theirs()


def _rows_of(table: pa.Table | None, run_id: str) -> pa.Table | None:
    if table is None:
        return None
    return table.filter(pc.equal(table["run_id"], run_id))


def _payloads(table: pa.Table) -> dict[str, list[bytes]]:
    """name -> payloads, in chunk order where the table has chunks."""
    if "chunk" in table.column_names:
        table = table.sort_by("chunk")
    out: dict[str, list[bytes]] = {}
    for name, data in zip(table["name"].to_pylist(), table["data"].to_pylist(), strict=True):
        out.setdefault(name, []).append(data)
    return out


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


def merge(
    store: Store, shard_paths: list[str | Path], progress: Progress | None = None
) -> tuple[list[str], list[str]]:
    """Merge shard files on this machine into the cache: (run ids merged, run ids still missing
    chunks). Their arrays are read from their files as they are merged, never all at once. `progress`
    hears of each shard merged, then of the runs' finalising."""
    run_ids = []
    for i, path in enumerate(shard_paths):
        run_ids += merge_tables(store, Store.read_shard(path))
        if progress:
            progress(i + 1, len(shard_paths), "shards merged")
    if progress:
        progress(len(shard_paths), len(shard_paths), "finalising")
    return list(dict.fromkeys(run_ids)), finish(store, run_ids)


PIECE = 64 << 20  # bytes of a shipped shard's file in one Ray object
AHEAD = 2  # pieces a shipped shard's worker may have yielded that the merging process has not taken


def _capture_shard(model_ref, device, name, prompts, settings, shard, folder, merged=None):
    """One shard in a fresh process: load the model and capture into `folder`/shard-I.duckdb; (the run
    id, the file's path), or (the run id, None) when `merged` (run id -> chunks the cache holds) says
    the cache has every chunk of the shard already: nothing is captured again. A file left there by a
    stopped capture of the same run is resumed; runs of other weights in it are deleted first."""
    from core import models

    lm = models.load_model(model_ref, device=device)
    prompt_set = PromptSet(name, tuple(Prompt(*p) for p in prompts))
    config = capture.CaptureConfig(**settings)
    mine = capture.run_id_for(lm.info.fingerprint, prompt_set.hash, config)
    chunks = range(shard[0], math.ceil(len(prompts) / config.chunk_prompts), shard[1])
    if mine in (merged or {}) and set(chunks) <= set(merged[mine]):
        return mine, None
    path = Path(folder) / f"shard-{shard[0]}.duckdb"
    store = Store(path)
    try:
        for other in {run.run_id for run in store.runs()} - {mine}:
            store.delete_run(other)  # the weights behind model_ref changed since the file was left
        capture.capture(lm, prompt_set, store, config, shard=shard)
    finally:
        store.close()
    return mine, str(path)


def _shipped_shard(model_ref, device, name, prompts, settings, shard, merged, keep):
    """A Ray generator task for a machine that does not share the merging process's disk: yields the run
    id, then, unless the cache has the shard's chunks already (`merged`, as `_capture_shard`), each of
    the shard's files (the DuckDB file and the arrays beside it) in pieces of at most PIECE bytes, as
    (path in the folder, uint8 array): each piece one object that the merging process owns, writes into
    a folder of its own (`_received`) and lets go. The shard is captured into the folder `keep` of the
    machine's temporary folder, deleted once every piece is sent: a capture stopped before resumes
    there when the shard runs on the same machine again."""
    folder = Path(tempfile.gettempdir()) / keep
    folder.mkdir(exist_ok=True)
    run_id, path = _capture_shard(model_ref, device, name, prompts, settings, shard, folder, merged)
    yield run_id
    if path is not None:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            with open(file, "rb") as f:
                while True:
                    piece = f.read(PIECE)  # as an array: read where it lies in the object store
                    yield file.relative_to(folder).as_posix(), np.frombuffer(piece, np.uint8)
                    if len(piece) < PIECE:
                        break
    shutil.rmtree(folder, ignore_errors=True)


def _received(ray, pieces, folder: Path, shard: int, heard=None) -> tuple[str, Path | None]:
    """Write a shipped shard's pieces (a `_shipped_shard` generator) into `folder`, emptied first (the
    pieces of a stopped capture), one piece in memory at a time; (the run id, the shard file's path, or
    None when the worker sent no files). `heard(bytes so far)` after each piece."""
    pieces = iter(pieces)
    run_id = ray.get(next(pieces))
    shutil.rmtree(folder, ignore_errors=True)
    total = 0
    for ref in pieces:
        file, piece = ray.get(ref)
        target = folder / file
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab") as out:  # a file's pieces come in order
            out.write(piece)
        total += len(piece)
        del ref, piece
        if heard:
            heard(total)
    path = folder / f"shard-{shard}.duckdb"
    return run_id, path if path.exists() else None


def _heard(progress: Progress | None, done: int, total: int, shard: int):
    """A `_received` callback that reports through `progress` how much of a shard has come."""
    if progress is None:
        return None
    return lambda n: progress(done, total, f"shard {shard}: {n >> 20:,} MiB received")


def shards_folder(
    store: Store, model_ref, prompt_set: PromptSet, config: capture.CaptureConfig, n: int
) -> Path:
    """Where a Ray capture of this machine keeps its n shards: a hidden folder beside the cache, named
    by what makes the shards (the cache, model, prompts, every setting), so the same command resumes
    the shards a stopped one left. Absolute: Ray's workers run in folders of their own."""
    key = [str(Path(store.path).resolve()), str(model_ref), prompt_set.hash, asdict(config), n]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(store.path).resolve().parent / f".shards-{digest}"


def capture_ray(
    model_ref,
    prompt_set: PromptSet,
    store: Store,
    config: capture.CaptureConfig,
    n_shards: int,
    address: str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    ship: bool | None = None,
) -> str:
    """Fan the shards out as Ray tasks (one per GPU, or per CPU slot) and merge them into `store`, each
    from its files as `merge` does (its arrays read as they are summed, a few at a time).

    Shards are merged as they finish, so a stopped capture (an error, an interrupt, a kill) leaves the
    cache holding the chunks of those merged; the same command captures only the others. A Ray
    cluster of this machine alone captures each shard into a folder beside the cache (`shards_folder`),
    deleted once the run is merged and kept when the capture stops, so that the same command resumes
    each unmerged shard where it stopped. A cluster with other machines (or `ship`) sends each shard's
    files in pieces through Ray's object store into that folder (one shard's files on this disk at a
    time, one piece in memory); a shard stopped there resumes only if it runs on the same machine
    again (`_shipped_shard`)."""
    try:
        import ray
    except ImportError as exc:
        raise BricklabError("Ray is not installed.", "pip install -r requirements-scale.txt") from exc

    if not ray.is_initialized():
        # workers import core/ from this checkout (on a cluster: the same path on every node)
        env = {"env_vars": {"PYTHONPATH": str(settings.ROOT)}}
        ray.init(address=address, runtime_env=env, include_dashboard=False, log_to_driver=False)
    if ship is None:
        ship = not _this_machine_only(ray)
    folder = shards_folder(store, model_ref, prompt_set, config, n_shards)
    if progress and folder.exists() and not ship:
        progress(0, n_shards, f"resuming the shards in {folder}")
    folder.mkdir(exist_ok=True)
    gpus = 1 if (device or "").startswith("cuda") else 0
    # shipped: a worker yields at most AHEAD pieces more than this process has taken (Ray's private
    # backpressure option of generator tasks), so a shard's files do not pile up in the object store
    extra = {"_generator_backpressure_num_objects": AHEAD} if ship else {}
    task = ray.remote(num_cpus=1, num_gpus=gpus, **extra)(_shipped_shard if ship else _capture_shard)
    prompts = [(p.id, p.category, p.text) for p in prompt_set.prompts]
    common = (model_ref, device, prompt_set.name, prompts, asdict(config))
    merged = {run.run_id: sorted(store.done_chunks(run.run_id)) for run in store.runs()}
    shard_of = {}  # each task (a generator of pieces when shipped) -> its shard
    for i in range(n_shards):
        where = (merged, f"bricklab{folder.name}-{i}") if ship else (str(folder), merged)
        shard_of[task.remote(*common, (i, n_shards), *where)] = i
    pending, run_ids = list(shard_of), []
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i, done = shard_of[ready[0]], n_shards - len(pending) - 1
            if ship:
                heard = _heard(progress, done, n_shards, i)
                run_id, path = _received(ray, ready[0], folder / f"{i}", i, heard)
            else:
                run_id, path = ray.get(ready[0])
            run_ids.append(run_id)
            if path is not None:
                merge_tables(store, Store.read_shard(path))
            if ship:
                shutil.rmtree(folder / f"{i}", ignore_errors=True)
            if progress:
                what = "shards merged" if path is not None else f"shard {i} was in the cache already"
                progress(n_shards - len(pending), n_shards, what)
        missing = finish(store, run_ids)
        if missing:
            raise BricklabError(
                f"Runs {missing} still miss chunks after the merge.", "Re-run the missing shards."
            )
    except BaseException as exc:
        for future in pending:  # nothing may go on writing the shards once this returns
            ray.cancel(future, force=True)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=60)
        if ship:  # pieces received of shards not merged: nothing there resumes
            shutil.rmtree(folder, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        what = exc.message if isinstance(exc, BricklabError) else f"{type(exc).__name__}: {exc}"
        kept = (
            "the shards merged into the cache are not captured again"
            if ship
            else f"from the shards kept in {folder} (delete that folder to start over)"
        )
        what = f"The Ray capture stopped: {what.rstrip('.')}."
        raise BricklabError(what, f"Run the same command again to resume it {kept}.") from exc
    shutil.rmtree(folder, ignore_errors=True)
    return run_ids[0]


def _this_machine_only(ray) -> bool:
    """Whether the Ray cluster is this machine alone: its workers then write where this process reads."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    return len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id()
