"""The store's token-sample reads: which tokens' firing bits a run keeps (today: every token)."""

import numpy as np
import pytest

from core.errors import BricklabError
from core.store import Store


def test_the_sample_of_a_run_is_every_token_in_firing_order(small_run):
    path, run_id = small_run
    store = Store(path)
    run = store.require_run(run_id)
    prompt, pos = store.sample_rows(run_id)
    want = (
        store.cursor()
        .execute("SELECT prompt_idx, pos FROM tokens WHERE run_id = ? ORDER BY prompt_idx, pos", [run_id])
        .fetchall()
    )
    assert list(zip(prompt.tolist(), pos.tolist(), strict=True)) == want and len(want) == run.n_tokens
    assert prompt.dtype == pos.dtype == np.int32
    assert store.sample_complete(run_id)
    for layer in range(run.n_layers):
        bits = store.firing_sample(run_id, layer)
        assert bits.shape == (run.n_tokens, (run.d_ff + 63) // 64)
        assert np.array_equal(bits, store.firing_bits(run_id, layer))
    with pytest.raises(BricklabError, match="no run"):
        store.sample_complete("no-such-run")
    store.close()
