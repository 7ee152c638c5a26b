"""A first end-to-end check of capture on the tiny model (full capture tests live in test_capture.py)."""

from core.store import Store


def test_small_run_is_complete(small_run):
    path, run_id = small_run
    s = Store(path)
    run = s.require_run(run_id)
    assert run.complete and run.n_prompts == 21
    acts = s.prompt_activations(run_id)
    assert acts.shape == (21, run.n_layers * run.d_ff)
    s.close()
