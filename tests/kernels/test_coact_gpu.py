"""The torch co-activation path (core.kernels.coact_gpu) against the numba kernel, run on CPU torch."""

import numpy as np
import pytest
import torch

from core.kernels import coact as kernels
from core.kernels import coact_gpu

# (n_tokens, n_neurons): empty, odd token counts (not a multiple of 8 or 64), word edges
SIZES = [(0, 0), (0, 65), (5, 0), (1, 1), (7, 64), (67, 63), (67, 65), (129, 130), (1001, 200)]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_bits(rng, n_tokens, n_neurons, rate=0.3):
    return kernels.pack_bits(rng.random((n_tokens, n_neurons)) < rate)


@pytest.mark.parametrize("n_tokens,n_neurons", SIZES)
@pytest.mark.parametrize("block_bytes", [1, 1 << 29])  # one block per 64 tokens (or words), or one block
@pytest.mark.parametrize("split", [True, False])  # 4 x 4 upper-triangle blocks (from 128 neurons) or one
def test_counts_equal_the_numba_kernel(rng, monkeypatch, n_tokens, n_neurons, block_bytes, split):
    monkeypatch.setattr(coact_gpu, "SPLIT_ROWS", 0 if split else 10**9)
    bits = random_bits(rng, n_tokens, n_neurons)
    expected = kernels.coactivation_counts(bits, n_neurons)
    got = coact_gpu.coactivation_counts(bits, n_neurons, device="cpu", block_bytes=block_bytes)
    assert got.dtype == np.int32 and got.shape == (n_neurons, n_neurons)
    np.testing.assert_array_equal(got, expected)
    by_neuron = kernels.transpose_bits(bits, n_neurons)
    got = coact_gpu.coactivation_counts(
        by_neuron, n_neurons, neuron_major=True, device="cpu", block_bytes=block_bytes
    )
    np.testing.assert_array_equal(got, expected)


def test_padding_bits_are_ignored(rng):
    bits = random_bits(rng, 100, 70)
    dirty = bits.copy()
    dirty[:, -1] |= np.uint64(0xFFFF_FFFF_FFFF_FFC0)  # neurons 70..127 do not exist
    np.testing.assert_array_equal(
        coact_gpu.coactivation_counts(dirty, 70, device="cpu"), kernels.coactivation_counts(bits, 70)
    )


def test_counts_of_neurons_that_always_fire_are_the_token_count():
    """Every pair of all-ones columns counts every token: no block or byte boundary drops one."""
    n_tokens = 3 * 64 + 5
    bits = kernels.pack_bits(np.ones((n_tokens, 9), dtype=bool))
    got = coact_gpu.coactivation_counts(bits, 9, device="cpu", block_bytes=1)
    np.testing.assert_array_equal(got, np.full((9, 9), n_tokens, np.int32))


def test_pack_and_unpack_follow_the_capture_convention(rng):
    fired = rng.random((37, 130)) < 0.3
    packed = coact_gpu.pack(torch.from_numpy(fired))
    np.testing.assert_array_equal(packed.numpy().view(np.uint64), kernels.pack_bits(fired))
    unpacked = coact_gpu.unpack(packed)[:, :130].numpy().astype(bool)
    np.testing.assert_array_equal(unpacked, fired)


def test_the_cpu_wrapper_picks_the_torch_path_for_large_layers_on_a_device(rng, monkeypatch):
    calls = []
    real = coact_gpu.coactivation_counts

    def spy(bits, n, **kw):
        calls.append(n)
        return real(bits, n, device="cpu", **kw)

    monkeypatch.setattr(coact_gpu, "available", lambda: True)
    monkeypatch.setattr(coact_gpu, "coactivation_counts", spy)
    monkeypatch.setattr(kernels, "GPU_MIN_NEURONS", 100)
    bits = random_bits(rng, 50, 130)
    expected = kernels.coactivation_counts_numpy(bits, 130)
    np.testing.assert_array_equal(kernels.coactivation_counts(bits, 130), expected)
    np.testing.assert_array_equal(kernels.coactivation_counts(bits[:, :1], 64), expected[:64, :64])
    assert calls == [130]  # 64 neurons stay on the numba kernel


def test_the_cpu_never_takes_fp8():
    assert not coact_gpu.fp8_exact(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_counts_on_the_gpu_equal_the_numba_kernel(rng):
    """Where the device has fp8 tensor cores (8.9 and up) its probe passes, so the fast path is the one
    taken; the counts of a layer split into blocks equal the numba kernel's either way."""
    device = torch.device("cuda")
    fp8 = torch.cuda.get_device_capability(device) >= (8, 9)
    assert coact_gpu.fp8_exact(device) == fp8
    n_neurons = coact_gpu.SPLIT_ROWS + 64  # 4 x 4 blocks of multiples of 16 rows
    bits = random_bits(rng, 3001, n_neurons, rate=0.1)
    expected = kernels.coactivation_counts(bits, n_neurons)
    np.testing.assert_array_equal(coact_gpu.coactivation_counts(bits, n_neurons, device="cuda"), expected)
    if fp8:  # and the int8 path still equals it
        y = coact_gpu.unpack_by_neuron(coact_gpu._words(bits[:1024]).to(device))
        a, b = (torch.zeros((len(y), len(y)), dtype=torch.int32, device=device) for _ in range(2))
        coact_gpu._gram(y, a, fp8=True)
        coact_gpu._gram(y, b, fp8=False)
        assert torch.equal(a.triu(), b.triu()) and a.trace() > 0
