"""Sharded and Ray captures equal the single-process capture of the same prompt set."""

import dataclasses
import types

import numpy as np
import pytest

from core.capture import run as capture
from core.capture import shards
from core.errors import BricklabError
from core.store import Store

CONFIG = capture.CaptureConfig(chunk_prompts=4, batch_size=3)


def capture_shards(lm, prompt_set, config, folder, n: int) -> list:
    """Paths of n shard files of one capture, each captured on its own (none is a complete run)."""
    paths = []
    for i in range(n):
        paths.append(folder / f"shard{i}.duckdb")
        store = Store(paths[-1])
        result = capture.capture(lm, prompt_set, store, config, shard=(i, n))
        assert not store.run(result.run_id).complete  # a shard alone is not a run
        store.close()
    return paths


def snapshot(store: Store, run_id: str) -> dict:
    run = store.require_run(run_id)
    out = {
        "acts": store.prompt_activations(run_id),
        "top": store.cursor()
        .execute(
            "SELECT layer, neuron, rank, prompt_idx, pos, value FROM top_examples WHERE run_id = ? "
            "ORDER BY layer, neuron, rank",
            [run_id],
        )
        .fetchall(),  # fmt: skip
        "tokens": store.cursor()
        .execute(
            "SELECT prompt_idx, pos, token_id FROM tokens WHERE run_id = ? ORDER BY prompt_idx, pos", [run_id]
        )
        .fetchall(),
        "n_tokens": run.n_tokens,
    }
    for layer in range(run.n_layers):
        out[f"bits{layer}"] = store.firing_bits(run_id, layer)
    for name in ("mean_act", "mean_abs", "fire_rate", "hist_abs", "hist_out"):
        out[name] = store.layer_array(run_id, name)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def reference(tiny_lm, small_prompts, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("ref") / "ref.duckdb")
    run_id = capture.capture(tiny_lm, small_prompts, store, CONFIG).run_id
    snap = snapshot(store, run_id)
    store.close()
    return run_id, snap


def test_shards_merge_to_the_unsharded_run(tiny_lm, small_prompts, tmp_path, reference):
    paths = capture_shards(tiny_lm, small_prompts, CONFIG, tmp_path, 3)
    store = Store(tmp_path / "merged.duckdb")
    merged, missing = shards.merge(store, paths[:2])
    assert missing == merged  # one shard is still missing
    merged, missing = shards.merge(store, paths[2:])
    assert merged == [reference[0]] and missing == []
    assert_same(snapshot(store, merged[0]), reference[1])
    shards.merge(store, paths)  # merging again changes nothing
    assert_same(snapshot(store, merged[0]), reference[1])
    store.close()


def test_merge_rejects_a_file_that_is_not_a_shard(tmp_path, store):
    bogus = tmp_path / "bogus.duckdb"
    bogus.write_bytes(b"not a database")
    with pytest.raises(Exception, match="not a bricklab shard"):
        shards.merge(store, [bogus])


def test_ray_capture_equals_single_process(tiny_dir, small_prompts, tmp_path, reference, monkeypatch):
    """On a Ray cluster of this machine the shards are merged from files beside the cache (then
    deleted); sent in pieces through Ray's object store (as from other machines), a run with
    co-activation counts and prompt-mean files merges to the same."""
    ray = pytest.importorskip("ray")
    received = []  # the shards that came as pieces
    real = shards._received
    monkeypatch.setattr(shards, "_received", lambda *a: received.append(a[3]) or real(*a))
    store = Store(tmp_path / "ray.duckdb")
    try:
        run_id = shards.capture_ray(tiny_dir, small_prompts, store, CONFIG, n_shards=2, device="cpu")
        assert run_id == reference[0]
        assert_same(snapshot(store, run_id), reference[1])
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards-")] == []
        partial = capture.CaptureConfig(chunk_prompts=4, batch_size=3, sample_bytes=3000)
        runs, said = {}, {False: [], True: []}
        for ship in (False, True):
            mine = Store(tmp_path / f"ship-{ship}.duckdb")
            run = shards.capture_ray(
                tiny_dir, small_prompts, mine, partial, n_shards=2, device="cpu", ship=ship,
                progress=lambda *a, ship=ship: said[ship].append(a[2]),
            )  # fmt: skip
            runs[ship] = (mine, run)
        assert sorted(received) == [0, 1]  # only the shipped capture's shards, each once
        assert {m.split(":")[0] for m in said[True] if m.endswith("MiB received")} == {"shard 0", "shard 1"}
        assert not [m for m in said[False] if "received" in m]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards-")] == []
        (files, run), (shipped, _) = runs[False], runs[True]
        assert files.array_files(run) and files.chunk_files(run, "prompt_acts")  # the run has both
        for name, layer in files.array_files(run):
            assert np.array_equal(files.read_array(run, name, layer), shipped.read_array(run, name, layer))
        assert np.array_equal(files.prompt_activations(run), shipped.prompt_activations(run))
        for mine, _ in runs.values():
            mine.close()
    finally:
        store.close()
        ray.shutdown()


def test_a_shipped_shard_arrives_file_for_file_in_pieces(tiny_dir, small_prompts, tmp_path, monkeypatch):
    """What a Ray worker on another machine sends (without Ray: the generator read here): the run id,
    then every file of its shard, cut in pieces of at most PIECE bytes, written back byte for byte; the
    worker's folder is gone once all is sent."""
    monkeypatch.setattr(shards, "PIECE", 4096)
    monkeypatch.setattr(shards.tempfile, "gettempdir", lambda: str(tmp_path))
    partial = capture.CaptureConfig(chunk_prompts=4, batch_size=3, sample_bytes=3000)
    prompts = [(p.id, p.category, p.text) for p in small_prompts.prompts]
    args = (tiny_dir, "cpu", small_prompts.name, prompts, dataclasses.asdict(partial), (1, 2))
    pieces = list(shards._shipped_shard(*args, {}, "worker"))
    assert not (tmp_path / "worker").exists()
    files = pieces[1:]
    assert max(len(piece) for _, piece in files) == 4096 and all(len(p) <= 4096 for _, p in files)
    run_id, got = shards._received(types.SimpleNamespace(get=lambda x: x), pieces, tmp_path / "got", 1)
    made_path = str(tmp_path / "made" / "shard-1.duckdb")
    assert shards._capture_shard(*args, tmp_path / "made") == (run_id, made_path)
    made = sorted(p.relative_to(tmp_path / "made") for p in (tmp_path / "made").rglob("*") if p.is_file())
    came = sorted(p.relative_to(tmp_path / "got") for p in (tmp_path / "got").rglob("*") if p.is_file())
    assert came == made and got == tmp_path / "got" / "shard-1.duckdb"
    assert any(p.suffix == ".npy" for p in came)  # its counts and prompt means beside it
    for relative in came:
        if relative.suffix == ".npy":  # the same arrays (the DuckDB files differ in their timings)
            assert (tmp_path / "got" / relative).read_bytes() == (tmp_path / "made" / relative).read_bytes()
    one, two = Store(tmp_path / "one.duckdb"), Store(tmp_path / "two.duckdb")
    try:
        shards.merge(one, [got])
        shards.merge(two, [tmp_path / "made" / "shard-1.duckdb"])
        assert [run.run_id for run in one.runs()] == [run_id]
        for name, layer in one.array_files(run_id):
            assert np.array_equal(one.read_array(run_id, name, layer), two.read_array(run_id, name, layer))
    finally:
        one.close()
        two.close()


def test_a_stopped_shipped_shard_resumes_on_its_machine_and_a_merged_one_is_not_sent(
    tiny_dir, small_prompts, tmp_path, monkeypatch
):
    """A worker on another machine stopped in the middle of its shard (a kill: its folder is left)
    resumes it when the shard comes to that machine again: the chunks captured before arrive as they
    were (the seconds they took). A shard whose chunks the cache holds is not captured: the worker
    sends the run id alone, and the receiving side's stale pieces are cleared."""
    monkeypatch.setattr(shards.tempfile, "gettempdir", lambda: str(tmp_path))
    prompts = [(p.id, p.category, p.text) for p in small_prompts.prompts]
    args = (tiny_dir, "cpu", small_prompts.name, prompts, dataclasses.asdict(CONFIG), (0, 2))
    real = capture.capture

    def stopped(*a, **k):
        def stop(done, total, what):
            if what == "capturing" and done > CONFIG.chunk_prompts:
                raise Stop

        return real(*a, **k, progress=stop)

    monkeypatch.setattr(capture, "capture", stopped)
    with pytest.raises(Stop):
        list(shards._shipped_shard(*args, {}, "worker"))
    left = Store(tmp_path / "worker" / "shard-0.duckdb")
    before = left.cursor().execute("SELECT chunk, seconds FROM chunks ORDER BY chunk").fetchall()
    left.close()
    assert [c for c, _ in before] == [0]  # the first of its chunks (0, 2, 4) was committed
    monkeypatch.setattr(capture, "capture", real)
    get = types.SimpleNamespace(get=lambda x: x)
    run_id, got = shards._received(get, shards._shipped_shard(*args, {}, "worker"), tmp_path / "got", 0)
    arrived = Store(got)
    after = arrived.cursor().execute("SELECT chunk, seconds FROM chunks ORDER BY chunk").fetchall()
    arrived.close()
    assert after[0] == before[0] and [c for c, _ in after] == [0, 2, 4]
    assert not (tmp_path / "worker").exists()
    sent = list(shards._shipped_shard(*args, {run_id: [0, 1, 2, 4]}, "worker"))
    assert sent == [run_id] and not (tmp_path / "worker").exists()
    assert shards._received(get, sent, tmp_path / "got", 0) == (run_id, None)
    assert not (tmp_path / "got").exists()  # what came before was cleared


def failing_merge(monkeypatch, at: int) -> list:
    """Spy on merge_tables: per call, the shard's (chunk, seconds it took to capture); call `at` raises."""
    seen = []
    real = shards.merge_tables

    def spy(store, tables):
        chunks = tables["chunks"]
        seen.append(sorted(zip(chunks["chunk"].to_pylist(), chunks["seconds"].to_pylist(), strict=True)))
        if len(seen) == at:
            raise OSError("the disk went away")
        return real(store, tables)

    monkeypatch.setattr(shards, "merge_tables", spy)
    return seen


def test_a_stopped_ray_capture_keeps_its_shards_and_the_same_command_resumes_them(
    tiny_dir, tiny_lm, small_prompts, tmp_path, reference, monkeypatch
):
    """The merge fails after the first shard is captured: the capture stops with an error naming the
    kept folder, and nothing is merged. The same call again resumes: the
    shard captured before is merged as it was (its chunks took the same seconds: not captured again),
    a run of other weights left in a shard file is deleted, and the run equals the single-process one."""
    ray = pytest.importorskip("ray")
    seen = failing_merge(monkeypatch, 1)
    store = Store(tmp_path / "ray.duckdb")
    try:
        with pytest.raises(BricklabError, match=r"OSError: the disk went away. Run the same command again"):
            shards.capture_ray(tiny_dir, small_prompts, store, CONFIG, n_shards=2, device="cpu")
        folder = shards.shards_folder(store, tiny_dir, small_prompts, CONFIG, 2)
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".shards-")] == [folder]
        assert store.runs() == []
        other = Store(folder / "shard-1.duckdb")  # as if the weights behind tiny_dir had changed
        try:
            capture.capture(tiny_lm, small_prompts.head(5), other, CONFIG, shard=(1, 2))
        finally:
            other.close()
        said = []
        run_id = shards.capture_ray(
            tiny_dir,
            small_prompts,
            store,
            CONFIG,
            n_shards=2,
            device="cpu",
            progress=lambda *a: said.append(a[2]),
        )
        assert run_id == reference[0]
        assert_same(snapshot(store, run_id), reference[1])
        assert said[0] == f"resuming the shards in {folder}" and not folder.exists()
        assert seen[0] in seen[1:]
    finally:
        store.close()
        ray.shutdown()


def test_a_stopped_shipped_ray_capture_captures_only_the_shards_not_merged(
    tiny_dir, small_prompts, tmp_path, reference, monkeypatch
):
    """Shards sent through Ray's object store (as from other machines): the second merge fails, so the
    capture stops with the first shard's chunks in the cache. The same call again captures and merges
    only the other shard, and the run equals the single-process one; no folder is left. Once more, the
    finished run: nothing is captured or merged."""
    ray = pytest.importorskip("ray")
    seen = failing_merge(monkeypatch, 2)
    store = Store(tmp_path / "ray.duckdb")
    try:
        with pytest.raises(BricklabError, match="not captured again"):
            shards.capture_ray(tiny_dir, small_prompts, store, CONFIG, n_shards=2, device="cpu", ship=True)
        assert store.done_chunks(reference[0]) == {c for c, _ in seen[0]}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards-")] == []
        said = []
        run_id = shards.capture_ray(
            tiny_dir, small_prompts, store, CONFIG, n_shards=2, device="cpu", ship=True,
            progress=lambda *a: said.append(a[2]),
        )  # fmt: skip
        assert run_id == reference[0]
        assert_same(snapshot(store, run_id), reference[1])
        chunks = [[c for c, _ in shard] for shard in seen]
        first = 0 if chunks[0][0] == 0 else 1
        assert chunks[2:] == [chunks[1]]  # only the shard not merged before came again
        assert f"shard {first} was in the cache already" in said
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards-")] == []
        said.clear()  # a finished run: neither shard is captured or merged again
        again = shards.capture_ray(
            tiny_dir, small_prompts, store, CONFIG, n_shards=2, device="cpu", ship=True,
            progress=lambda *a: said.append(a[2]),
        )  # fmt: skip
        assert again == run_id and len(seen) == 3
        skipped = [f"shard {i} was in the cache already" for i in (0, 1)]
        assert sorted(m for m in said if "cache" in m) == skipped
    finally:
        store.close()
        ray.shutdown()


class Stop(Exception):
    pass


def test_a_file_of_a_stopped_capture_merges_only_whole(tiny_lm, small_prompts, tmp_path, reference):
    """Without --shard a file holds its chunks' top examples merged into one: it merges into a cache
    without any of its chunks, and is refused, saying what to do, by one that has some of them."""

    def stop(done, total, what):
        if what == "capturing" and done > 2 * CONFIG.chunk_prompts:
            raise Stop

    stopped = Store(tmp_path / "stopped.duckdb")
    with pytest.raises(Stop):
        capture.capture(tiny_lm, small_prompts, stopped, CONFIG, progress=stop)
    assert stopped.done_chunks(reference[0]) == {0, 1}
    stopped.close()
    paths = capture_shards(tiny_lm, small_prompts, CONFIG, tmp_path, 2)
    overlapping = Store(tmp_path / "overlapping.duckdb")
    shards.merge(overlapping, paths[:1])  # chunks 0, 2, 4
    with pytest.raises(BricklabError, match="overlaps chunks already merged"):
        shards.merge(overlapping, [tmp_path / "stopped.duckdb"])
    overlapping.close()
    store = Store(tmp_path / "merged.duckdb")
    shards.merge(store, [tmp_path / "stopped.duckdb"])
    merged, missing = shards.merge(store, paths)  # chunks 0 and 1 are there already
    assert merged == [reference[0]] and missing == []
    assert_same(snapshot(store, merged[0]), reference[1])
    store.close()
    other = Store(tmp_path / "other.duckdb")
    with pytest.raises(BricklabError, match="finished run"):
        shards.merge(other, [tmp_path / "merged.duckdb"])
    other.close()
