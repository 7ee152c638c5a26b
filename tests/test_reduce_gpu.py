"""The fused Triton reductions (core.reduce_gpu) against capture's torch ops, on CUDA or Triton's CPU
interpreter; skipped where Triton is not installed."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton reads it on import
pytest.importorskip("triton")

from core import kernels  # noqa: E402
from core.capture import CaptureConfig  # noqa: E402
from core.reduce import ChunkReducer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D, WIDTH = 200, 40
SPANS = [(2, 40), (5, 17), (0, 33)]  # own tokens of three prompts in one padded batch


@pytest.fixture(scope="module")
def reduced():
    """The same batch of two layers through the torch ops and the fused kernels."""
    torch.manual_seed(0)
    config = CaptureConfig(batch_size=3, hist_stride=3, top_k=2)
    norms = [torch.rand(D) + 0.5 for _ in range(2)]
    a = (torch.randn(len(SPANS), WIDTH, D) * torch.rand(D)).to(torch.bfloat16).to(DEVICE)
    a[0, 5, :7] = 0  # ties at zero
    a[1, 6] = a[1, 7]  # two equal tokens of one prompt
    out = {}
    for fused in (False, True):
        r = ChunkReducer(2, D, config, norms, device=DEVICE, fused=fused)
        r.set_batch([0, 1, 2], SPANS, WIDTH)
        r.reduce(0, a)
        r.reduce(1, a * 2)
        r.file(r.take_batch())
        out[fused] = r, {(layer, name): v for layer, name, v in r.partials(0)}
    return config, norms, a, out


def scores(a, norm, layer, reducer):
    """Each own token's output magnitude, as the torch path rounds it (bf16)."""
    x = (a * (1 + layer)).reshape(-1, D)[reducer.flat].abs()
    return x, (x * norm.to(DEVICE).bfloat16()).float().cpu().numpy()


def test_exactly_k_fire_and_every_fired_neuron_outranks_every_silent_one(reduced):
    config, norms, a, out = reduced
    r, partial = out[True]
    for layer in range(2):
        fired = np.concatenate([kernels.unpack_bits(r.prompt_bits[i][layer], D) for i in range(3)])
        _, score = scores(a, norms[layer], layer, r)
        assert (fired.sum(axis=1) == r.k_fire).all()
        assert (np.where(fired, score, np.inf).min(1) >= np.where(fired, -np.inf, score).max(1)).all()
        np.testing.assert_array_equal(partial[(layer, "fire_count")], fired.sum(axis=0))


def test_histograms_equal_a_numpy_recount(reduced):
    config, norms, a, out = reduced
    r, partial = out[True]
    for layer in range(2):
        absx, score = scores(a, norms[layer], layer, r)
        for name, v in (("hist_abs", absx.float().cpu().numpy()), ("hist_out", score)):
            v = torch.from_numpy(v[:: config.hist_stride])
            idx = (v * (config.hist_bins / v.amax(1, keepdim=True).clamp_min(1e-30))).long()
            expected = np.bincount(
                idx.clamp(max=config.hist_bins - 1).reshape(-1), minlength=config.hist_bins
            )
            np.testing.assert_array_equal(partial[(layer, name)], expected)


def test_top_examples_means_and_sums_match_the_torch_ops(reduced):
    _, _, _, out = reduced
    (plain, want), (fused, got) = out[False], out[True]
    for key, value in want.items():
        if key[1].startswith("top"):
            np.testing.assert_array_equal(got[key], value, err_msg=str(key))
        elif key[1].startswith("sum"):  # the torch path sums in bf16
            np.testing.assert_allclose(got[key], value, rtol=2e-2, atol=1e-2, err_msg=str(key))
    for i in range(3):
        for layer in range(2):
            np.testing.assert_allclose(
                fused.prompt_means[i][layer].astype(np.float32),
                plain.prompt_means[i][layer].astype(np.float32),
                rtol=1e-2,
                atol=1e-3,
            )
