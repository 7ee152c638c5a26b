"""Format 3 (issue #16): a run keeps the firing bits of a byte-budgeted token sample; when the sample
leaves tokens out, exact co-activation counts are kept beside the cache instead, and every reader of
firing gets from them what it got from every token's bits."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from core.bricks import candidates, coherence, distinctive, scores
from core.bricks.candidates import BrickParams
from core.bricks.firing import RunFiring
from core.capture import counts, shards
from core.capture import run as capture
from core.errors import BricklabError
from core.kernels import coact as kernels
from core.store import Store, sample
from tests.capture.test_shards import capture_shards

PARTIAL = 3000  # bytes: about a quarter of the tiny run's 21 prompts (2 layers x 2 words x 8 B a token)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_lm, small_prompts):
    """(store, run) of the same capture twice: every token's bits, and a partial sample."""
    folder = tmp_path_factory.mktemp("sample")
    out = []
    for name, budget in (("every", 1 << 30), ("partial", PARTIAL)):
        store = Store(folder / f"{name}.duckdb")
        config = capture.CaptureConfig(chunk_prompts=8, sample_bytes=budget)
        result = capture.capture(tiny_lm, small_prompts, store, config)
        out.append((store, store.require_run(result.run_id)))
    yield out
    for store, _ in out:
        store.close()


def test_the_sample_is_a_fixed_hash_of_the_tokens_place():
    prompt, pos = np.repeat(np.arange(400), 50), np.tile(np.arange(50), 400)
    for rate in (0.05, 0.25, 0.5):
        kept = sample.in_sample(prompt, pos, rate)
        assert abs(kept.mean() - rate) < 0.01
        assert np.array_equal(kept[::7], sample.in_sample(prompt[::7], pos[::7], rate))  # any subset agrees
    smaller, larger = sample.in_sample(prompt, pos, 0.2), sample.in_sample(prompt, pos, 0.4)
    assert not (smaller & ~larger).any()  # a larger budget keeps a superset
    assert sample.in_sample(prompt, pos, 1.0).all()
    assert sample.sample_rate(None, 10**9, 32, 14336) == 1.0  # format 2: every token's bits
    assert sample.sample_rate(1 << 30, 11341, 30, 1536) == 1.0  # the default run keeps every token
    assert sample.sample_rate(1 << 30, 10**7, 32, 14336) == pytest.approx((1 << 30) / (10**7 * 32 * 224 * 8))
    assert sample.count_rate(1 << 20, 10**7) == pytest.approx(0.1048576)  # the default budget, 10M tokens
    assert sample.count_rate(1 << 20, 10**6) == sample.count_rate(0, 10**9) == 1.0
    assert sample.count_rate(10, 1000, sample_rate=0.25) == 0.25  # never fewer than the sample's tokens


def test_a_partial_sample_keeps_exact_counts_and_the_sampled_bits(two_runs):
    (every, run_e), (part, run_p) = two_runs
    full, partial = RunFiring(every, run_e), RunFiring(part, run_p)
    assert full.complete and not partial.complete and run_e.n_tokens == run_p.n_tokens
    rate = part.sample_rate(run_p.run_id)
    assert 0.1 < rate < 0.5 and run_p.settings["sample_bytes"] == PARTIAL
    prompt, pos = partial.sample_rows
    assert np.array_equal(sample.in_sample(prompt, pos, rate), np.ones(len(prompt), bool))
    assert 0 < len(prompt) < run_p.n_tokens and partial.n_tokens() == run_p.n_tokens
    half = scores.prompt_halves(every, run_e.run_id, 0)
    assert np.array_equal(partial.stored_halves, half)
    for layer in range(run_e.n_layers):
        bits = every.firing_bits(run_e.run_id, layer)
        assert np.array_equal(partial.sample(layer), bits[partial.sample_index])
        assert np.array_equal(partial.counts(layer), kernels.coactivation_counts_numpy(bits, run_e.d_ff))
        for mine, want in zip(partial.split_counts(layer, half), full.split_counts(layer, half), strict=True):
            assert np.array_equal(mine, want) and want.trace() > 0
    with pytest.raises(BricklabError, match="seed 0"):
        partial.split_counts(0, scores.prompt_halves(part, run_p.run_id, 5))
    # the bits left out are not in the file: its firing rows hold the sample only
    assert sum(len(part.firing_bits(run_p.run_id, layer)) for layer in range(2)) == 2 * len(prompt)
    files = sorted(p.name for p in part.arrays_folder(run_p.run_id).iterdir())
    counts, acts = part.array_files(run_p.run_id), part.chunk_files(run_p.run_id, "prompt_acts")
    assert files == sorted([*counts.values(), *(f for _, f in acts)]) and len(counts) == 4
    # its prompt means went to a file a chunk beside the cache, not to DuckDB rows: the same means
    assert [first for first, _ in acts] == list(range(0, run_p.n_prompts, run_p.settings["chunk_prompts"]))
    rows = "SELECT count(*) FROM prompt_acts WHERE run_id = ?"
    assert part.cursor().execute(rows, [run_p.run_id]).fetchone()[0] == 0
    assert np.array_equal(part.prompt_activations(run_p.run_id), every.prompt_activations(run_e.run_id))
    assert np.array_equal(part.prompt_activations(run_p.run_id, 1), every.prompt_activations(run_e.run_id, 1))
    assert not every.arrays_folder(run_e.run_id).exists() and not every.array_files(run_e.run_id)


@pytest.mark.parametrize("graph", ["jaccard", "pmi"])
def test_coactivation_bricks_from_stored_counts_equal_those_from_every_tokens_bits(two_runs, graph):
    (every, run_e), (part, run_p) = two_runs
    params = BrickParams(method="coact", size=12, graph=graph, stability=True, seed=0)
    want = candidates.compute_bricks(every, run_e.run_id, params)
    got = candidates.compute_bricks(part, run_p.run_id, params)
    assert [b.brick_id for b in got] == [b.brick_id for b in want] and len(want) > 10
    for mine, theirs in zip(got, want, strict=True):
        assert np.array_equal(mine.neurons, theirs.neurons) and mine.stability == theirs.stability
    with pytest.raises(BricklabError, match="seed 0"):  # other halves need every token's bits
        candidates.compute_bricks(part, run_p.run_id, BrickParams(method="coact", size=12, seed=3))
    assert candidates.compute_bricks(part, run_p.run_id, BrickParams(method="coact", size=12, seed=3,
                                                                   stability=False))  # fmt: skip


def test_readers_of_single_tokens_use_the_sample_within_a_stated_tolerance(two_runs):
    """Coherence (cross-layer too) and distinctive tokens read the sample's tokens: on a quarter of the
    tiny run's 328 tokens, coherence scores stay within 0.15 (absolute; 0.10 seen) of every token's, and every
    distinctive type of the partial run is a type of the run."""
    (every, run_e), (part, run_p) = two_runs
    rng = np.random.default_rng(0)
    bricks = [
        {layer: rng.choice(run_e.d_ff, 12, replace=False).tolist() for layer in (0, 1)} for _ in range(4)
    ]
    bricks += [{0: list(range(24))}]
    full, partial = coherence.Firing.of_run(every, run_e.run_id), coherence.Firing.of_run(part, run_p.run_id)
    assert partial.n_tokens < full.n_tokens
    for brick in bricks:
        want, got = coherence.coherence(full, brick).score, coherence.coherence(partial, brick).score
        assert np.isfinite(got) and abs(got - want) < 0.15, (brick, got, want)
    tokens = distinctive.run_tokens(part, run_p)
    assert len(tokens.sample) < run_p.n_tokens and tokens.counts.sum() == len(tokens.sample)


def test_shards_of_a_partial_sample_merge_to_the_unsharded_counts(two_runs, tiny_lm, small_prompts, tmp_path):
    """Merged from their files, the shards' counts and prompt means are the unsharded run's (Ray's
    workers on other machines send those files: test_shards)."""
    (_, _), (part, run_p) = two_runs
    config = capture.CaptureConfig(chunk_prompts=8, sample_bytes=PARTIAL)
    paths = capture_shards(tiny_lm, small_prompts, config, tmp_path, 2)
    merged = Store(tmp_path / "merged.duckdb")
    try:
        run_ids, missing = shards.merge(merged, paths[::-1])
        assert run_ids == [run_p.run_id] and not missing
        for key in part.array_files(run_p.run_id):
            assert np.array_equal(merged.read_array(run_p.run_id, *key), part.read_array(run_p.run_id, *key))
        n_chunks = len(part.chunk_files(run_p.run_id, "prompt_acts"))  # and each chunk's prompt means
        assert len(list(merged.arrays_folder(run_p.run_id).iterdir())) == 4 + n_chunks > 4
        got = merged.prompt_activations(run_p.run_id)
        assert np.array_equal(got, part.prompt_activations(run_p.run_id))
    finally:
        merged.close()
    whole = Store(tmp_path / "whole.duckdb")  # one shard of one: every chunk, counts over all of them
    capture.capture(tiny_lm, small_prompts, whole, config, shard=(0, 1))
    whole.close()
    again = Store(tmp_path / "again.duckdb")
    try:
        shards.merge(again, paths[:1])
        with pytest.raises(BricklabError, match="overlaps chunks already merged"):
            shards.merge(again, [tmp_path / "whole.duckdb"])
    finally:
        again.close()


def test_a_shard_missing_an_array_file_is_refused_and_nothing_of_it_merged(tiny_lm, small_prompts, tmp_path):
    config = capture.CaptureConfig(chunk_prompts=8, sample_bytes=PARTIAL)
    paths = capture_shards(tiny_lm, small_prompts, config, tmp_path, 2)
    lost = next(paths[1].with_name(paths[1].name + ".arrays").glob("*/coact_b-L001-*.npy"))
    lost.unlink()
    merged = Store(tmp_path / "merged.duckdb")
    try:
        with pytest.raises(BricklabError, match=r"The shard's array file .*coact_b-L001.* is missing"):
            shards.merge(merged, paths[1:])
        assert merged.runs() == []
    finally:
        merged.close()


def test_a_run_of_format_2_reads_as_a_complete_sample(store):
    """Format 2 kept every token's bits and has no sample_bytes: never read as a partial sample."""
    settings = {k: v for k, v in json.loads(json.dumps(capture.CaptureConfig().__dict__)).items()}
    settings.pop("sample_bytes")
    row = {"run_id": "old", "settings": json.dumps(settings), "n_layers": 32, "d_ff": 14336, "n_prompts": 0,
           "categories": "[]", "status": "complete", "n_tokens": 10**8}  # fmt: skip
    with store.write() as cur:
        store.create_run(cur, row, [])
    assert store.sample_rate("old") == 1.0 and store.sample_complete("old")


def test_the_share_of_counted_tokens_of_each_format_3_settings(store):
    """Runs store their count budget (count_tokens, the share follows from their tokens); the first
    format-3 runs stored the share itself (count_rate), and are read as they were counted."""
    settings = json.loads(json.dumps(capture.CaptureConfig().__dict__))
    first = {k: v for k, v in settings.items() if k != "count_tokens"} | {"count_rate": 0.25}
    for run_id, kept in (("now", settings), ("first", first)):
        row = {"run_id": run_id, "settings": json.dumps(kept), "n_layers": 32, "d_ff": 14336, "n_prompts": 0,
               "categories": "[]", "status": "complete", "n_tokens": 10**7}  # fmt: skip
        with store.write() as cur:
            store.create_run(cur, row, [])
    assert store.count_rate("now") == pytest.approx(0.1048576) and store.count_rate("first") == 0.25


def test_counts_over_a_hashed_share_of_the_tokens(two_runs, tiny_lm, small_prompts, tmp_path):
    """count_tokens below the run's tokens: the counts sum over exactly the tokens the hash picks (a
    quarter here, and the sample's bits a fourteenth), and bricks partition them with that many tokens.
    A budget below the sample's tokens counts the sample's tokens: its bits would give those counts."""
    (every, run_e), _ = two_runs
    store = Store(tmp_path / "quarter.duckdb")
    try:
        config = capture.CaptureConfig(
            chunk_prompts=8, sample_bytes=PARTIAL // 4, count_tokens=run_e.n_tokens // 4
        )
        run = store.require_run(capture.capture(tiny_lm, small_prompts, store, config).run_id)
        small = capture.capture(
            tiny_lm, small_prompts, store, dataclasses.replace(config, count_tokens=1)
        ).run_id
        assert store.count_rate(small) == store.sample_rate(small) < 0.1
        firing, places = RunFiring(store, run), every.token_places(run_e.run_id)
        kept = sample.in_sample(*places, store.sample_rate(small))  # what the small budget counted
        want = kernels.coactivation_counts_numpy(every.firing_bits(run_e.run_id, 0)[kept], run.d_ff)
        assert np.array_equal(RunFiring(store, store.require_run(small)).counts(0), want)
        rate = store.count_rate(run.run_id)
        assert rate == pytest.approx(0.25, abs=0.01) and store.sample_rate(run.run_id) < 0.1
        counted = sample.in_sample(*places, rate)
        assert np.array_equal(firing.counted, counted) and firing.n_tokens() == counted.sum() < run.n_tokens
        half = firing.stored_halves
        assert firing.n_tokens(half) == (half[places[0]] & counted).sum()
        for layer in range(run.n_layers):
            bits = every.firing_bits(run_e.run_id, layer)
            want = kernels.coactivation_counts_numpy(bits[counted], run.d_ff)
            assert np.array_equal(firing.counts(layer), want) and want.trace() > 0
    finally:
        store.close()


def test_chunks_written_in_the_background_equal_chunks_written_in_line(
    two_runs, monkeypatch, tiny_lm, small_prompts, tmp_path
):
    """On a GPU the chunk transactions run in a thread beside the next chunk's forward pass (forced on
    here): the run is the same, counts and all."""
    from core.capture import writer
    from tests.capture.test_run import run_tables

    (_, _), (part, run_p) = two_runs
    monkeypatch.setattr(writer, "BACKGROUND", True)
    store = Store(tmp_path / "background.duckdb")
    try:
        config = capture.CaptureConfig(chunk_prompts=8, sample_bytes=PARTIAL, checkpoint_seconds=0.0)
        result = capture.capture(tiny_lm, small_prompts, store, config)
        assert result.run_id == run_p.run_id  # checkpoint_seconds is not in the key
        assert run_tables(store, result.run_id) == run_tables(part, run_p.run_id)
    finally:
        store.close()


@pytest.mark.parametrize("hold", [None, 1], ids=["a-chunk-at-a-time", "each-batch"])
def test_counts_of_batches_equal_counts_of_chunks(
    two_runs, tiny_lm, small_prompts, tmp_path, monkeypatch, hold
):
    """The counted words of the batches are held and counted together (here at the run's one save): a
    product per layer and half. Counted whenever any are held instead (HOLD_BYTES 1: one per batch),
    the counts equal those of batches of a whole chunk (the fixture's)."""
    from core.capture import counts as coact_counts
    from tests.capture.test_run import run_tables

    _, (part, run_p) = two_runs
    if hold is not None:
        monkeypatch.setattr(coact_counts, "HOLD_BYTES", hold)
    products = []
    real = coact_counts.coact_gpu.add_counts
    monkeypatch.setattr(coact_counts.coact_gpu, "add_counts", lambda *a: products.append(1) or real(*a))
    store = Store(tmp_path / "batches.duckdb")
    try:  # batches of 3 prompts: 3 a chunk of 8
        config = capture.CaptureConfig(chunk_prompts=8, sample_bytes=PARTIAL, batch_size=3)
        result = capture.capture(tiny_lm, small_prompts, store, config)
        assert result.run_id == run_p.run_id  # batch_size is not in the key
        once = run_p.n_layers * 2  # held until the run's one save: a product per layer and half
        assert len(products) == once if hold is None else len(products) > -(-run_p.n_prompts // 8) * once
        # other batches sum the floats in another order; the counts are integers
        mine, want = run_tables(store, result.run_id), run_tables(part, run_p.run_id)
        assert mine["arrays"] == want["arrays"] and len(want["arrays"]) == 2 * run_p.n_layers
        assert mine["bits"] == want["bits"]
    finally:
        store.close()


def test_the_last_save_takes_each_triangle_off_the_counts_as_it_is_written(tmp_path):
    """A run's last save hands the store triangles that leave the counts only when written (host memory
    holds a few at a time); they are the triangles an earlier save copies at once, and the store
    writes and reads them back as such."""
    from core.capture.counts import CoactCounts
    from core.store.arrays import Lazy

    rng = np.random.default_rng(0)
    n_layers, d_ff = 3, 70
    counts = CoactCounts(n_layers, d_ff, np.array([True, False]))
    for layer in range(n_layers):
        bits = torch.from_numpy(rng.integers(0, 2**31, (40, 2 * 2), dtype=np.int32))  # 2 words of 64 bits
        counts.add(layer, bits, (torch.arange(0, 25), torch.arange(25, 40)))
    copied, lazy = counts.arrays(), counts.arrays(last=True)
    assert all(isinstance(a, Lazy) for _, _, a in lazy)
    assert not any(isinstance(a, Lazy) for _, _, a in copied)
    assert [(layer, name) for layer, name, _ in lazy] == [(layer, name) for layer, name, _ in copied]
    for (_, _, want), (_, _, mine) in zip(copied, lazy, strict=True):
        assert want.dtype == np.int32 and want.shape == (d_ff * (d_ff + 1) // 2,) and want.any()
        assert np.array_equal(np.asarray(mine), want)
    store = Store(tmp_path / "t.duckdb")
    try:
        with store.write() as cur:
            store._save_arrays(cur, "r", lazy, [0])
        for layer, name, want in copied:
            assert np.array_equal(store.read_array("r", name, layer), want)
    finally:
        store.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counts_on_the_gpu_equal_the_counts_of_the_bits_it_fires():
    """The fused GPU path (Triton selection, bf16) adds each batch's bits into the counts on the device:
    they equal the numpy counts of the very bits the chunk hands to the store."""
    import importlib.util

    from transformers import LlamaConfig, LlamaForCausalLM

    from core import models
    from core.capture.counts import CoactCounts
    from core.capture.reduce import ChunkReducer
    from core.prompts import Encoded

    torch.manual_seed(0)
    shape = dict(hidden_size=128, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**shape)).to("cuda", torch.bfloat16).eval()
    info = models.describe(model, "random")
    lm = models.LoadedModel(model, type("Ids", (), {"pad_token_id": 0})(), info)
    rng = np.random.default_rng(0)
    encoded = [Encoded(rng.integers(10, 1000, n).tolist(), 0, n, False) for n in rng.integers(20, 90, 12)]
    config = capture.CaptureConfig(batch_size=5, chunk_prompts=12)
    half = np.arange(12) % 3 == 0
    counts = CoactCounts(info.n_layers, info.d_ff, half, 1.0, device="cuda")
    norms = [models.down_column_norms(model, layer) for layer in range(info.n_layers)]
    reducer = ChunkReducer(info.n_layers, info.d_ff, config, norms, device="cuda", counts=counts)
    capture._run_chunk(lm, encoded, 0, reducer, config, None, 0, 12)
    assert reducer.fused == (importlib.util.find_spec("triton") is not None)
    saved = {(layer, name): a for layer, name, a in counts.arrays()}
    last = {(layer, name): np.asarray(a) for layer, name, a in counts.arrays(last=True)}  # as the last save
    assert last.keys() == saved.keys() and all(np.array_equal(last[k], saved[k]) for k in saved)
    for layer in range(info.n_layers):
        bits = [
            np.concatenate([reducer.prompt_bits[i][layer] for i in range(12) if half[i] == side])
            for side in (True, False)
        ]
        for name, mine in zip(("coact_a", "coact_b"), bits, strict=True):
            want = kernels.coactivation_counts_numpy(mine, info.d_ff)
            assert np.array_equal(kernels.symmetric_from_upper(saved[layer, name], info.d_ff), want)
            assert want.trace() > 0


@pytest.mark.slow
def test_bricks_from_a_count_sample_match_every_tokens_as_closely_as_half_the_prompts_do(
    default_lm, tmp_path
):
    """A run with more tokens than count_tokens counts a hashed sample of them. On the real default model,
    bricks from the counts of half its tokens match every token's bricks about as closely as bricks from
    half its prompts do (mean best-match Jaccard over three layers; 0.26 against 0.25 seen, chance
    0.05): a count sample costs what a smaller run costs, no more."""
    from core import prompts

    store = Store(tmp_path / "default.duckdb")
    try:
        run = store.require_run(capture.capture(default_lm, prompts.default_prompt_set(), store).run_id)
        places, params = store.token_places(run.run_id), BrickParams()
        in_a = scores.prompt_halves(store, run.run_id, 0)[places[0]]
        kept = sample.in_sample(*places, 0.5)
        rng = np.random.default_rng(0)
        found = {"sample": [], "half": [], "chance": []}

        def bricks(bits, rows):
            counts = kernels.coactivation_counts(bits[rows], run.d_ff)
            return candidates.partition(counts, int(rows.sum()), params)

        for layer in (3, 15, 27):
            bits = store.firing_bits(run.run_id, layer)
            every = bricks(bits, np.ones(len(bits), bool))
            chance = np.array_split(rng.permutation(run.d_ff).astype(np.int32), len(every))
            for name, got in (
                ("sample", bricks(bits, kept)),
                ("half", bricks(bits, in_a)),
                ("chance", chance),
            ):
                found[name].append(candidates.best_match_jaccard(got, every).mean())
        mean = {name: float(np.mean(v)) for name, v in found.items()}
        assert mean["sample"] >= 0.8 * mean["half"] and mean["half"] > 3 * mean["chance"], mean
    finally:
        store.close()


@pytest.mark.parametrize("budget", [1, 1 << 30], ids=["a-layer-a-query", "every-layer-in-one"])
def test_the_finalise_step_reads_the_chunk_partials_in_groups_of_layers(
    two_runs, tiny_lm, small_prompts, tmp_path, monkeypatch, budget
):
    """merge_partials reads as many layers' chunk partials a query as PARTIALS_BYTES allow (each query
    reads the whole table): one layer a query or all at once, the run is the same."""
    from core.capture import reduce
    from tests.capture.test_run import run_tables

    (every, run_e), _ = two_runs
    monkeypatch.setattr(reduce, "PARTIALS_BYTES", budget)
    queries = []
    real = Store.chunk_partials
    monkeypatch.setattr(Store, "chunk_partials", lambda self, *a: queries.append(a[1]) or real(self, *a))
    store = Store(tmp_path / "groups.duckdb")
    try:
        config = capture.CaptureConfig(chunk_prompts=8, sample_bytes=1 << 30)
        result = capture.capture(tiny_lm, small_prompts, store, config)
        assert queries == ([range(0, 1), range(1, 2)] if budget == 1 else [range(0, 2)])
        assert run_tables(store, result.run_id) == run_tables(every, run_e.run_id)
    finally:
        store.close()


def test_a_run_that_would_overflow_its_int32_counts_is_refused_before_anything_is_written(
    tiny_lm, small_prompts, store, monkeypatch
):
    """Counts are int32: a run counting more tokens than they hold is refused at the start, whole or
    as a shard (whose sums over shards would wrap silently), not hours in. Here the limit is lowered to
    just under the tiny run's own tokens."""
    config = capture.CaptureConfig(chunk_prompts=8, sample_bytes=PARTIAL, count_tokens=0)  # every token
    whole = Store(store.path.with_name("whole.duckdb"))
    try:
        n_own = capture.capture(tiny_lm, small_prompts, whole).n_tokens
    finally:
        whole.close()
    monkeypatch.setattr(counts, "MAX_TOKENS", n_own - 1)
    for shard in (None, (1, 2)):
        with pytest.raises(BricklabError, match=f"co-activations of ~{n_own:,} of its {n_own:,} tokens"):
            capture.capture(tiny_lm, small_prompts, store, config, shard=shard)
    assert store.runs() == []
    capture.capture(tiny_lm, small_prompts, store, dataclasses.replace(config, count_tokens=n_own // 4))
    assert [r.status for r in store.runs()] == ["complete"]


def test_countable_allows_the_whole_run_or_a_sample_six_deviations_under_the_limit():
    assert counts.countable(100, 1.0, limit=100) and not counts.countable(101, 1.0, limit=100)
    # a sample of 10% of 10**6 tokens: 100,000 expected, sd 300
    assert counts.countable(10**6, 0.1, limit=101_800) and not counts.countable(10**6, 0.1, limit=101_799)
    assert counts.countable(2**40, 2e9 / 2**40)  # --count-tokens 2,000,000,000 fits (the error's hint)
