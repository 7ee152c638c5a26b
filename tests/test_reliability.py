"""Many sessions on one process: concurrent captures, readers during writes, hooks after failures."""

import threading

import numpy as np
import pytest
import torch

from core.capture import run as capture
from core.live import interventions
from core.prompts import PromptSet
from core.store import Store

CONFIG = capture.CaptureConfig(chunk_prompts=4, batch_size=2)


def run_in_threads(fns):
    results, errors = [None] * len(fns), []
    barrier = threading.Barrier(len(fns))

    def work(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    return results


def test_same_run_requested_twice_at_once_is_computed_once(tiny_lm, small_prompts, store):
    results = run_in_threads([lambda: capture.capture(tiny_lm, small_prompts, store, CONFIG)] * 2)
    assert sorted(r.cache_hit for r in results) == [False, True]
    assert results[0].run_id == results[1].run_id
    assert store.cursor().execute("SELECT count(*) FROM runs").fetchone()[0] == 1


def test_two_different_captures_at_once_match_each_alone(tiny_lm, small_prompts, store, tmp_path):
    halves = [
        PromptSet("a", small_prompts.prompts[:10]),
        PromptSet("b", small_prompts.prompts[10:]),
    ]
    together = run_in_threads([lambda p=p: capture.capture(tiny_lm, p, store, CONFIG) for p in halves])
    for prompt_set, result in zip(halves, together, strict=True):
        alone_store = Store(tmp_path / f"{prompt_set.name}.duckdb")
        alone = capture.capture(tiny_lm, prompt_set, alone_store, CONFIG)
        assert alone.run_id == result.run_id
        np.testing.assert_array_equal(
            store.prompt_activations(result.run_id), alone_store.prompt_activations(alone.run_id)
        )
        for layer in range(tiny_lm.info.n_layers):
            np.testing.assert_array_equal(
                store.firing_bits(result.run_id, layer), alone_store.firing_bits(alone.run_id, layer)
            )
        alone_store.close()


def test_readers_never_see_a_half_written_run(tiny_lm, small_prompts, store):
    stop = threading.Event()
    seen = []

    def read():
        try:
            while not stop.is_set():
                for run in store.runs():
                    try:
                        checked = store.require_run(run.run_id)
                    except Exception as exc:  # only an incomplete run may be refused, and must say so
                        assert "incomplete" in str(exc)
                        continue
                    acts = store.prompt_activations(checked.run_id)  # a complete run reads back whole
                    assert acts.shape == (checked.n_prompts, checked.n_layers * checked.d_ff)
                    seen.append(checked.run_id)
        except BaseException as exc:
            errors.append(exc)

    errors = []
    readers = [threading.Thread(target=read) for _ in range(4)]
    for r in readers:
        r.start()
    try:
        capture.capture(tiny_lm, small_prompts, store, CONFIG)
        while not seen and not errors:  # let the readers see the finished run at least once
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for r in readers:
            r.join(timeout=60)
    assert not errors, errors[0]
    assert store.require_run(seen[-1]).complete


def test_a_capture_that_fails_midway_leaves_no_hooks_and_same_logits(tiny_lm, small_prompts, store):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = tiny_lm.model(ids).logits

    def explode(done, total, message):
        if done >= 6:
            raise RuntimeError("browser tab closed")

    with pytest.raises(RuntimeError, match="browser tab closed"):
        capture.capture(tiny_lm, small_prompts, store, CONFIG, progress=explode)
    assert interventions.hook_count(tiny_lm.model) == 0
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(ids).logits, before)
    run = store.runs()[0]
    assert not run.complete  # marked incomplete, and a second call resumes it
    result = capture.capture(tiny_lm, small_prompts, store, CONFIG)
    assert result.resumed and store.require_run(result.run_id).complete
