"""Capture on the tiny model against a slow recomputation; cache hits; resume after SIGKILL; truncation.

Concurrent captures and hooks after a failing progress callback are in test_reliability.py.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core import models, prompts
from core.capture import run as capture
from core.errors import BricklabError
from core.kernels import coact as kernels
from core.live import interventions
from core.store import Store

ROOT = Path(__file__).resolve().parents[2]
SMALL = capture.CaptureConfig(chunk_prompts=8)  # the config of the `small_run` fixture


@pytest.fixture(scope="module")
def slow_reference(tiny_lm, small_prompts):
    """Per prompt and layer, the FFN activations of the prompt's own tokens: float32 (T_own, d_ff).

    Computed one prompt at a time, without padding, with a plain hook that only copies.
    """
    model, info = tiny_lm.model, tiny_lm.info
    limit = prompts.token_limit(model, SMALL.max_tokens)
    out = []
    for p in small_prompts.prompts:
        enc = prompts.encode(tiny_lm.tokenizer, p.text, limit, SMALL.chat_template)
        seen = {}
        handles = [
            models.down_proj(model, layer).register_forward_pre_hook(
                lambda m, args, layer=layer, seen=seen: seen.__setitem__(
                    layer, args[0][0].detach().float().clone()
                )
            )
            for layer in range(info.n_layers)
        ]
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([enc.ids]))
        finally:
            for h in handles:
                h.remove()
        out.append([seen[layer][enc.start : enc.end].numpy() for layer in range(info.n_layers)])
    return out


def test_prompt_activations_match_a_slow_recomputation(small_store, slow_reference, tiny_lm, small_prompts):
    s, run = small_store
    acts = s.prompt_activations(run.run_id)
    d_ff = tiny_lm.info.d_ff
    assert acts.dtype == np.float16 and acts.shape == (len(small_prompts), tiny_lm.info.n_layers * d_ff)
    expected = np.stack([np.concatenate([np.abs(a).mean(0) for a in layers]) for layers in slow_reference])
    np.testing.assert_allclose(acts.astype(np.float32), expected, rtol=2e-3, atol=1e-5)
    np.testing.assert_array_equal(s.prompt_activations(run.run_id, layer=1), acts[:, d_ff:])


def test_tokens_are_the_prompts_own_tokens(small_store, slow_reference, tiny_lm, small_prompts):
    s, run = small_store
    tokenizer = tiny_lm.tokenizer
    for i, p in enumerate(small_prompts.prompts):
        rows = s.tokens(run.run_id, i)
        assert [r[0] for r in rows] == list(range(len(slow_reference[i][0])))
        assert tokenizer.convert_tokens_to_string([r[2] for r in rows]) == p.text
    assert s.token_prompts(run.run_id).shape[0] == run.n_tokens == sum(len(r[0]) for r in slow_reference)


def test_firing_bits_are_the_top_tenth_by_output_magnitude(small_store, slow_reference, tiny_lm):
    s, run = small_store
    d_ff = tiny_lm.info.d_ff
    k = math.ceil(0.1 * d_ff)
    for layer in range(run.n_layers):
        fired = kernels.unpack_bits(s.firing_bits(run.run_id, layer), d_ff)
        score = np.abs(np.concatenate([r[layer] for r in slow_reference]))
        score *= models.down_column_norms(tiny_lm.model, layer).numpy()
        assert fired.shape == score.shape
        assert (fired.sum(axis=1) == k).all()
        # every fired neuron outranks every silent one (up to batched-vs-single float noise)
        lowest_fired = np.where(fired, score, np.inf).min(axis=1)
        highest_silent = np.where(fired, -np.inf, score).max(axis=1)
        assert (lowest_fired >= highest_silent * (1 - 1e-4)).all()
        rate = s.layer_array(run.run_id, "fire_rate")[layer]
        np.testing.assert_allclose(rate, fired.mean(axis=0), rtol=1e-6)


TOP_SQL = (
    "SELECT neuron, rank, prompt_idx, pos, value FROM top_examples WHERE run_id = ? AND layer = ? "
    "ORDER BY neuron, rank"
)


def test_top_examples_are_the_strongest_prompts_and_point_at_their_tokens(
    small_store, slow_reference, tiny_lm
):
    """Per neuron: the top_k prompts by their strongest own token's |a|, one example per prompt."""
    s, run = small_store
    k, d_ff = SMALL.top_k, tiny_lm.info.d_ff
    for layer in range(run.n_layers):
        absx = [np.abs(r[layer]) for r in slow_reference]
        prompt_max = np.stack([a.max(axis=0) for a in absx])  # (n_prompts, d_ff)
        rows = s.cursor().execute(TOP_SQL, [run.run_id, layer]).fetchall()
        table = np.array(rows, dtype=np.float64).reshape(d_ff, k, 5)
        values, prompt, pos = table[:, :, 4], table[:, :, 2].astype(int), table[:, :, 3].astype(int)
        assert (table[:, :, 1] == np.arange(k)).all()
        assert (np.diff(values, axis=1) <= 0).all()
        assert all(len(set(prompt[n])) == k for n in range(d_ff))
        np.testing.assert_allclose(values, np.sort(prompt_max, axis=0)[::-1][:k].T, rtol=1e-4)
        pointed = np.array([[absx[prompt[n, r]][pos[n, r], n] for r in range(k)] for n in range(d_ff)])
        np.testing.assert_allclose(pointed, values, rtol=1e-4)
        assert s.top_examples(run.run_id, layer, 3) == [tuple(r[1:]) for r in rows if r[0] == 3]


def test_layer_means(small_store, slow_reference):
    s, run = small_store
    for layer in range(run.n_layers):
        a = np.concatenate([r[layer] for r in slow_reference])
        np.testing.assert_allclose(s.layer_array(run.run_id, "mean_abs")[layer], np.abs(a).mean(0), rtol=2e-3)
        np.testing.assert_allclose(
            s.layer_array(run.run_id, "mean_act")[layer], a.mean(0), rtol=1e-3, atol=1e-6
        )
        hist = s.layer_array(run.run_id, "hist_out", np.int64)[layer]
        # every sampled token's maximum lands in the top bin
        assert hist.sum() > 0 and hist.sum() % a.shape[1] == 0 and hist[-1] > 0


def test_a_repeated_capture_is_a_cache_hit_that_computes_nothing(
    small_run, tiny_lm, small_prompts, monkeypatch
):
    path, run_id = small_run

    def forbidden(*args, **kwargs):
        raise AssertionError("a cache hit must compute nothing")

    monkeypatch.setattr(capture, "encode", forbidden)
    monkeypatch.setattr(capture, "_run_chunk", forbidden)
    s = Store(path)
    try:
        again = capture.capture(
            tiny_lm, small_prompts, s, capture.CaptureConfig(batch_size=3, chunk_prompts=5)
        )
    finally:
        s.close()
    assert again.cache_hit and again.run_id == run_id and again.n_tokens > 0
    other = capture.run_id_for(tiny_lm.info.fingerprint, small_prompts.hash, capture.CaptureConfig(top_k=5))
    assert other != run_id


KILLER = """
import os, signal, sys
from core import models, prompts
from core.capture import run as capture
from core.store import Store

lm = models.load_model(sys.argv[1], device="cpu")
store = Store(sys.argv[2])

def progress(done, total, message):
    if done >= int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

budget, every = int(sys.argv[4]), float(sys.argv[5])
config = capture.CaptureConfig(chunk_prompts=4, sample_bytes=budget, checkpoint_seconds=every)
capture.capture(lm, prompts.default_prompt_set().head(21), store, config, progress)
"""


def run_tables(s: Store, run_id: str) -> dict:
    """Everything a run holds, as comparable values."""
    tables = {
        name: s.cursor()
        .execute(f"SELECT * EXCLUDE (run_id) FROM {name} WHERE run_id = ? ORDER BY ALL", [run_id])
        .fetchall()
        for name in ("prompts", "tokens", "prompt_acts", "firing", "layer_arrays", "top_examples")
    }
    run = s.require_run(run_id)
    tables["acts"] = s.prompt_activations(run_id).tobytes()
    tables["bits"] = [s.firing_bits(run_id, layer).tobytes() for layer in range(run.n_layers)]
    files = s.array_files(run_id)  # a partial sample's co-activation counts, beside the file
    tables["arrays"] = {key: s.read_array(run_id, *key).tobytes() for key in files}
    folder = s.arrays_folder(run_id)
    named = s.named_files(run_id)  # counts and each chunk's prompt means: no other file stays
    tables["files"] = sorted(p.name for p in folder.iterdir()) == sorted(named) if named else True
    return tables


@pytest.mark.parametrize(
    "sample_bytes, every",
    [(1 << 30, 300.0), (3000, 0.0), (3000, 300.0)],
    ids=["every-token", "partial-sample-saved-each-chunk", "partial-sample-never-saved"],
)
def test_a_killed_capture_resumes_to_the_same_result(
    tiny_dir, tiny_lm, small_prompts, tmp_path, sample_bytes, every
):
    """A run without counts saves its state with every chunk; one with counts every `checkpoint_seconds`
    (0: every chunk), and a resume drops the chunks committed after the last save, then captures them."""
    killed_db = tmp_path / "killed.duckdb"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", KILLER, tiny_dir, str(killed_db), "10", str(sample_bytes), str(every)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    config = capture.CaptureConfig(chunk_prompts=4, sample_bytes=sample_bytes, checkpoint_seconds=every)
    saved = sample_bytes > 3000 or every == 0.0
    run_id = capture.run_id_for(tiny_lm.info.fingerprint, small_prompts.hash, config)

    s = Store(killed_db)
    try:
        assert s.run(run_id).status == "incomplete" and s.done_chunks(run_id) == {0, 1}
        with pytest.raises(BricklabError, match="incomplete"):
            s.prompt_activations(run_id)
        seen = []
        result = capture.capture(tiny_lm, small_prompts, s, config, lambda d, t, m: seen.append((d, m)))
        assert result.resumed == saved and not result.cache_hit
        assert seen[0] == ((8, "resuming") if saved else (0, "capturing"))
        assert interventions.hook_count(tiny_lm.model) == 0
        resumed = run_tables(s, run_id)
    finally:
        s.close()
    fresh = Store(tmp_path / "fresh.duckdb")
    try:
        assert capture.capture(tiny_lm, small_prompts, fresh, config).run_id == run_id
        expected = run_tables(fresh, run_id)
    finally:
        fresh.close()
    for name, value in expected.items():
        assert resumed[name] == value, name
    assert bool(expected["arrays"]) == (sample_bytes < 1 << 30) and resumed["files"]


def test_a_resumed_capture_reports_its_own_tokens_and_speed(tiny_lm, small_prompts, store):
    config = capture.CaptureConfig(chunk_prompts=4)
    before = capture.capture(tiny_lm, small_prompts, store, config, shard=(0, 2))  # chunks 0, 2, 4
    assert before.new_tokens == before.n_tokens > 0
    result = capture.capture(tiny_lm, small_prompts, store, config)  # resumes with chunks 1, 3, 5
    assert result.resumed and result.n_tokens == store.require_run(result.run_id).n_tokens
    assert result.new_tokens == result.n_tokens - before.n_tokens > 0
    assert result.tokens_per_second == pytest.approx(result.new_tokens / result.seconds)
    hit = capture.capture(tiny_lm, small_prompts, store, config)
    assert hit.cache_hit and hit.new_tokens == 0 and hit.n_tokens == result.n_tokens


def test_a_cut_text_warns_once(tiny_lm, store):
    cut = prompts.parse_prompts(b"word " * 5000 + b"\nshort\n", "long.txt")  # 25,000 characters
    assert cut.warnings == ("Line 1: cut to 20,000 characters.",)
    result = capture.capture(tiny_lm, cut, store, capture.CaptureConfig(max_tokens=64))
    # Shown by whoever loaded the set, not again in the result; the result adds the token cut.
    assert result.warnings == ("Prompt 'p00001' is longer than 64 tokens and was truncated.",)
    strings = capture.capture(tiny_lm, ["word " * 5000], store, capture.CaptureConfig(max_tokens=64))
    assert strings.warnings.count("Prompt 1: cut to 20,000 characters.") == 1  # made here: news


def test_a_prompt_longer_than_the_context_is_truncated_with_a_warning(tiny_dir, tmp_path, store):
    folder = tmp_path / "short-context"
    folder.mkdir()
    for f in Path(tiny_dir).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    lm = models.load_model(str(folder), device="cpu")
    long = prompts.Prompt("long", "writing", "Tell me a story about a lighthouse keeper. " * 20)
    ps = prompts.PromptSet("t", (long, prompts.Prompt("short", "math", "What is 2+2?")))
    result = capture.capture(lm, ps, store)
    assert any("'long' is longer than 40 tokens" in w for w in result.warnings)
    run = store.require_run(result.run_id)
    long_rows = (
        store.cursor()
        .execute(
            "SELECT count(*), bool_and(truncated) FROM tokens WHERE run_id = ? AND prompt_idx = 0",
            [run.run_id],
        )
        .fetchone()
    )
    assert 0 < long_rows[0] < 40 and long_rows[1]
    assert (
        not store.cursor()
        .execute("SELECT bool_or(truncated) FROM tokens WHERE run_id = ? AND prompt_idx = 1", [run.run_id])
        .fetchone()[0]
    )
    assert np.isfinite(store.prompt_activations(run.run_id).astype(np.float32)).all()


def test_batches_take_prompts_in_length_order_by_count_or_by_a_token_budget():
    lengths = [30, 5, 12, 12, 40, 7, 3]
    assert capture.batches(lengths, 3, None) == [[6, 1, 5], [2, 3, 0], [4]]
    assert capture.batches(lengths, 0, None) == [[6, 1, 5, 2, 3, 0, 4]]  # CPU_BATCH = 8 prompts
    by_tokens = capture.batches(lengths, 0, 40)
    assert by_tokens == [[6, 1, 5], [2, 3], [0], [4]]  # 3 x 7, 2 x 12, then the widest alone
    assert all(len(b) * max(lengths[i] for i in b) <= 40 for b in by_tokens)
    assert capture.batches([50, 60], 0, 10) == [[0], [1]]  # one prompt a pass even past the budget
    assert sorted(i for b in by_tokens for i in b) == list(range(len(lengths)))
    assert capture.batches([], 0, 40) == [] and capture.batches([], 4, None) == []


def test_the_batch_size_is_fixed_on_the_cpu_and_only_fit_to_memory_on_cuda(tiny_lm):
    encoded = [prompts.Encoded([1, 2, 3], 0, 3, False)]
    assert capture.token_budget(tiny_lm, encoded, capture.CaptureConfig()) is None  # CPU
    assert capture.token_budget(tiny_lm, encoded, capture.CaptureConfig(batch_size=4)) is None
    with pytest.raises(ValueError):
        capture.CaptureConfig(batch_size=-1)


def test_the_shared_prefix_is_what_every_prompt_starts_with_before_its_own_tokens():
    enc = prompts.Encoded
    assert capture.shared_prefix([enc([1, 2, 3, 4, 5], 3, 5, False), enc([1, 2, 9, 4], 3, 4, False)]) == 2
    assert capture.shared_prefix([enc([1, 2, 3, 4], 1, 4, False), enc([1, 2, 3, 5], 3, 4, False)]) == 1
    assert capture.shared_prefix([enc([7, 8], 0, 2, False), enc([7, 8], 0, 2, False)]) == 0  # no template
    assert capture.shared_prefix([]) == 0


def test_the_template_prefix_runs_once_per_chunk_and_nothing_after_the_own_tokens(
    tiny_lm, small_prompts, store
):
    """The FFN sees each chunk's shared prefix once and each prompt only up to its last own token."""
    config = capture.CaptureConfig(chunk_prompts=4)
    limit = prompts.token_limit(tiny_lm.model, config.max_tokens)
    encoded = [prompts.encode(tiny_lm.tokenizer, p.text, limit, True) for p in small_prompts.prompts]
    chunks = [encoded[lo : lo + 4] for lo in range(0, len(encoded), 4)]
    shared = [capture.shared_prefix(c) for c in chunks]
    assert min(shared) > 0  # the chat template's system part
    rows = []
    handle = models.down_proj(tiny_lm.model, 0).register_forward_pre_hook(
        lambda m, args: rows.append(args[0].shape[0] * args[0].shape[1])
    )
    try:
        capture.capture(tiny_lm, small_prompts, store, config)
    finally:
        handle.remove()
    expected = sum(shared)  # one pass over each chunk's prefix, then its batches cut after the own tokens
    for chunk, n in zip(chunks, shared, strict=True):
        for batch in capture.batches([len(e.ids) for e in chunk], 0, None):
            expected += len(batch) * (max(chunk[i].end for i in batch) - n)
    assert sum(rows) == expected < sum(len(e.ids) for e in encoded)


def test_a_finished_run_leaves_little_free_space(default_dir, tmp_path):
    """A chunk's top examples take megabytes on a wide model. Each chunk's own, deleted when the run was
    finalised, left their blocks free in the file; one running merge, replaced with each chunk, leaves
    about one merge's worth. (DuckDB also frees the blocks of the tables it rewrites at a checkpoint as
    they grow: on this run 38 free blocks for 23 used, against 68 with per-chunk top examples.)"""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"vocab_size": 49152, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    LlamaForCausalLM(LlamaConfig(intermediate_size=8192, **shape)).save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(default_dir).save_pretrained(tmp_path / "wide")
    wide = models.load_model(str(tmp_path / "wide"), device="cpu")
    store = Store(tmp_path / "wide.duckdb")
    # each default chunk's rows pass DuckDB's 16 MiB checkpoint threshold; these small ones pass this one
    store.cursor().execute("SET checkpoint_threshold = '1MB'")
    config = capture.CaptureConfig(chunk_prompts=4, top_k=4)
    try:
        capture.capture(wide, prompts.default_prompt_set().head(64), store, config)
    finally:
        store.close()
    store = Store(tmp_path / "wide.duckdb")
    used, free, _ = store.file_blocks()
    store.close()
    assert free < 2 * used, (used, free)
