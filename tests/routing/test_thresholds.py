"""Threshold calibration (core.routing.thresholds): quantiles of the stored histograms reach the target
share, and a calibrated model skips about that share of neurons and inputs."""

import numpy as np
import pytest
import torch

from core.live import sparse
from core.routing import thresholds
from core.store import Store


def test_relative_thresholds_are_the_histograms_quantiles():
    rng = np.random.default_rng(0)
    values = rng.random((2, 5000)) ** np.array([[3.0], [0.5]])  # two layers, different shapes
    hist = np.stack([np.bincount((v * 100).astype(int).clip(max=99), minlength=100) for v in values])
    for s in (0.25, 0.4, 0.5):
        tau = thresholds.relative(hist, s)
        assert tau.shape == (2,) and tau[0] < tau[1]
        np.testing.assert_allclose((values < tau[:, None]).mean(axis=1), s, atol=0.01)
    assert (thresholds.relative(hist, 0.0) == 0).all()
    with pytest.raises(ValueError):
        thresholds.relative(hist, 1.0)


def test_histograms_count_as_capture_does():
    a = torch.tensor([[0.0, -0.5, 1.0, 0.25], [2.0, 0.1, -0.3, 0.0]])
    hist = thresholds.histograms(a, bins=4)
    np.testing.assert_array_equal(hist, [4, 1, 1, 2])  # 0, 0, .05, .15 | .25 | .5 | 1, 1


def test_calibrated_from_a_run_the_model_skips_the_target_share(tiny_lm, small_run):
    path, run_id = small_run
    store = Store(path)
    try:
        tau = thresholds.from_run(store, run_id, 0.4)
    finally:
        store.close()
    assert tau.shape == (tiny_lm.info.n_layers,) and (tau > 0).all()
    ids = [[1, 502, 3312, 7, 981, 44, 12000, 5, 77, 3001, 15, 400, 9, 2000, 31]]
    recorded = thresholds.calibrate(tiny_lm, ids)
    t_x = thresholds.input_thresholds(recorded, 0.4)
    assert t_x.shape == (tiny_lm.info.n_layers,) and (t_x > 0).all()
    for layer, r in enumerate(recorded):  # the same prompts: the input share is the quantile's
        assert abs(float((torch.cat(r.xs) < t_x[layer]).float().mean()) - 0.4) < 0.02
    skipped = []
    for layer in range(tiny_lm.info.n_layers):
        f = sparse.ffn(tiny_lm.model, layer)
        with torch.no_grad():
            a = f.activations(recorded_x(tiny_lm, ids, layer))
        skipped.append(float((a.abs() < tau[layer] * a.abs().amax(-1, keepdim=True)).float().mean()))
    assert 0.2 < np.mean(skipped) < 0.6  # the run's prompts are not these: near the target, not at it
    functions = thresholds.layer_functions(tau, t_x)
    assert sorted(functions) == list(range(tiny_lm.info.n_layers))
    assert functions[1].tau == tau[1] and functions[1].t_x == t_x[1]


def recorded_x(lm, ids, layer: int) -> torch.Tensor:
    """The FFN input of `layer` itself (signed), for the prompts."""
    keep = []

    def fn(f, x):
        keep.append(x.detach().reshape(-1, x.shape[-1]))
        return f.down(f.activations(x))

    with torch.inference_mode(), sparse.sparse(lm.model, {layer: fn}):
        lm.model(torch.tensor(ids))
    return keep[0]


def test_the_curve_measures_each_share_once_and_caches_it(tiny_lm, small_run, tmp_path):
    import shutil

    from core.live import evaluate
    from core.routing import tradeoff

    path = tmp_path / "cache.duckdb"
    shutil.copy(small_run[0], path)
    store = Store(path)
    try:
        result = thresholds.curve(tiny_lm, store, small_run[1], per_category=1)
        assert [p["share"] for p in result["points"]] == list(thresholds.SHARES)
        assert result["dense_tokens_per_s"] is None  # the CPU: no speed
        texts = tradeoff.held_out(store, small_run[1], 1)
        assert result["n_prompts"] == len(texts)
        others = [r[3] for r in store.prompts(small_run[1]) if r[3] not in set(texts)][:2]
        recorded = thresholds.calibrate(tiny_lm, [tiny_lm.tokenizer(t)["input_ids"][:128] for t in others])
        tau, t_x = thresholds.from_run(store, small_run[1], 0.5), thresholds.input_thresholds(recorded, 0.5)
        with sparse.sparse(tiny_lm.model, thresholds.layer_functions(tau, t_x)):  # the last point by hand
            ratio = float(np.nanmean(evaluate.loss_per_prompt(tiny_lm, texts))) / result["dense_loss"]
        assert result["points"][-1]["loss_ratio"] == pytest.approx(ratio, rel=1e-6)
        assert ratio != pytest.approx(1.0, abs=1e-6)  # skipping half of the work changes the loss
        assert thresholds.stored_curve(store, small_run[1], "cpu", 1) == result
        assert thresholds.curve(tiny_lm, store, small_run[1], per_category=1) == result  # from the cache
    finally:
        store.close()
