"""The numba kernels against their numpy twins and sklearn, on seeded awkward sizes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from core.kernels import coact as kernels

# (n_tokens, n_neurons): empty, one token, and widths on both sides of a 64-bit word
SIZES = [(0, 0), (0, 65), (5, 0), (1, 1), (1, 64), (67, 63), (67, 65)]
SIZES += [(1000, 64), (1000, 130)]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_bits(rng, n_tokens, n_neurons, rate=0.3):
    fired = rng.random((n_tokens, n_neurons)) < rate
    return fired, kernels.pack_bits(fired)


def test_pack_bits_follows_the_capture_convention():
    fired = np.zeros((2, 130), dtype=bool)
    fired[1, 129] = True
    bits = kernels.pack_bits(fired)
    assert bits.dtype == np.uint64 and bits.shape == (2, 3)
    assert bits[1, 129 // 64] == np.uint64(1) << np.uint64(129 % 64)
    assert bits.sum() == bits[1, 2]
    np.testing.assert_array_equal(kernels.unpack_bits(bits, 130), fired)


@pytest.mark.parametrize("n_tokens,n_neurons", SIZES)
def test_transpose_bits_matches_numpy(rng, n_tokens, n_neurons):
    fired, bits = random_bits(rng, n_tokens, n_neurons)
    out = kernels.transpose_bits(bits, n_neurons)
    assert out.dtype == np.uint64 and out.shape == (n_neurons, -(-n_tokens // 64))
    np.testing.assert_array_equal(out, kernels.transpose_bits_numpy(bits, n_neurons))
    np.testing.assert_array_equal(kernels.unpack_bits(out, n_tokens), fired.T)


@pytest.mark.parametrize("n_tokens,n_neurons", SIZES)
def test_coactivation_counts_match_numpy(rng, n_tokens, n_neurons):
    fired, bits = random_bits(rng, n_tokens, n_neurons)
    counts = kernels.coactivation_counts(bits, n_neurons)
    assert counts.dtype == np.int32 and counts.shape == (n_neurons, n_neurons)
    np.testing.assert_array_equal(counts, kernels.coactivation_counts_numpy(bits, n_neurons))
    np.testing.assert_array_equal(np.diag(counts), fired.sum(axis=0))
    neuron_bits = kernels.transpose_bits(bits, n_neurons)
    by_neuron = kernels.coactivation_counts(neuron_bits, n_neurons, neuron_major=True)
    np.testing.assert_array_equal(by_neuron, counts)


@pytest.mark.parametrize("n_neurons", [2, 5, 9, 63])
def test_coactivation_counts_with_correlated_neurons(rng, n_neurons):
    """Neurons that copy each other make every tile's counts distinct and large."""
    base = rng.random((300, 1)) < 0.5
    fired = base & (rng.random((300, n_neurons)) < np.linspace(0.2, 1.0, n_neurons))
    bits = kernels.pack_bits(fired)
    expected = fired.astype(np.int64).T @ fired.astype(np.int64)
    np.testing.assert_array_equal(kernels.coactivation_counts(bits, n_neurons), expected)


def test_padding_bits_are_ignored(rng):
    fired, bits = random_bits(rng, 100, 70)
    dirty = bits.copy()
    dirty[:, -1] |= np.uint64(0xFFFF_FFFF_FFFF_FFC0)  # neurons 70..127 do not exist
    np.testing.assert_array_equal(
        kernels.coactivation_counts(dirty, 70), kernels.coactivation_counts(bits, 70)
    )
    np.testing.assert_allclose(kernels.firing_rates(dirty, 70), fired.mean(axis=0))


@pytest.mark.parametrize("n_tokens,n_neurons", SIZES)
def test_firing_rates_match_numpy(rng, n_tokens, n_neurons):
    _, bits = random_bits(rng, n_tokens, n_neurons)
    rates = kernels.firing_rates(bits, n_neurons)
    assert rates.dtype == np.float64 and rates.shape == (n_neurons,)
    np.testing.assert_allclose(rates, kernels.firing_rates_numpy(bits, n_neurons))


@pytest.mark.parametrize("kind", kernels.NORMALISATIONS)
@pytest.mark.parametrize("n_tokens,n_neurons", SIZES)
def test_normalised_coactivation_matches_numpy(rng, kind, n_tokens, n_neurons):
    _, bits = random_bits(rng, n_tokens, n_neurons, rate=0.05)  # some never fire
    counts = kernels.coactivation_counts(bits, n_neurons)
    out = kernels.normalised_coactivation(counts, n_tokens, kind)
    assert out.dtype == np.float32 and out.shape == (n_neurons, n_neurons)
    expected = kernels.normalised_coactivation_numpy(counts, n_tokens, kind)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert np.isfinite(out).all()


def test_normalised_coactivation_by_hand():
    # neuron 0 fires on tokens 0, 1; neuron 1 on tokens 1, 2; neuron 2 never; 4 tokens
    counts = np.array([[2, 1, 0], [1, 2, 0], [0, 0, 0]])
    jaccard = kernels.normalised_coactivation(counts, 4, "jaccard")
    np.testing.assert_allclose(jaccard, [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 0]], rtol=1e-6)
    pmi = kernels.normalised_coactivation(counts, 4, "pmi")
    np.testing.assert_allclose(pmi, [[np.log(2), 0, 0], [0, np.log(2), 0], [0, 0, 0]], atol=1e-6)


def sklearn_ap(X, labels, n_categories):
    return np.array(
        [
            [average_precision_score(labels == c, X[:, j]) for j in range(X.shape[1])]
            for c in range(n_categories)
        ]
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_average_precision_matches_sklearn_with_ties(rng, monkeypatch, dtype):
    monkeypatch.setattr(kernels, "_AP_CHUNK", 4)  # 9 neurons: three kernel calls
    X = rng.integers(0, 4, size=(60, 9)).astype(dtype)  # a handful of values: many ties
    X[:, 0] = 1.0  # one neuron ranks every prompt equal
    labels = rng.integers(0, 4, size=60)
    ap = kernels.average_precision(X, labels, 4)
    assert ap.dtype == np.float32 and ap.shape == (4, 9)
    np.testing.assert_allclose(ap, sklearn_ap(X, labels, 4), rtol=1e-5)
    np.testing.assert_allclose(ap, kernels.average_precision_numpy(X, labels, 4), rtol=1e-5)
    np.testing.assert_allclose(ap[:, 0], np.bincount(labels) / 60, rtol=1e-5)


def test_average_precision_matches_sklearn_without_ties(rng):
    labels = rng.integers(0, 3, size=200)
    liking = (labels[:, None] == 1) * rng.random(70)  # neurons that prefer category 1
    X = rng.random((200, 70)) + liking
    ap = kernels.average_precision(X, labels, 3)
    np.testing.assert_allclose(ap, sklearn_ap(X, labels, 3), rtol=1e-5)
    assert ap[1].mean() > ap[0].mean() + 0.1


def test_average_precision_edge_cases():
    labels = np.array([0, 0, 2])  # category 1 has no prompts
    ap = kernels.average_precision(np.array([[3.0], [1.0], [2.0]]), labels, 3)
    np.testing.assert_allclose(ap[:, 0], [(1 + 2 / 3) / 2, np.nan, 1 / 2], rtol=1e-6)
    no_prompts = kernels.average_precision(np.zeros((0, 4)), np.zeros(0, int), 2)
    assert no_prompts.shape == (2, 4) and np.isnan(no_prompts).all()
    no_neurons = kernels.average_precision(np.zeros((5, 0)), np.zeros(5, int), 2)
    assert no_neurons.shape == (2, 0)
    one = kernels.average_precision(np.ones((1, 3)), np.array([1]), 2)
    np.testing.assert_array_equal(one[1], [1, 1, 1])
    assert np.isnan(one[0]).all()


BITS = np.zeros((3, 2), np.uint64)
COUNTS = np.eye(2, dtype=int)
AP = kernels.average_precision
BAD_CALLS = [
    (kernels.transpose_bits, (BITS.astype(np.int64), 100), "uint64"),
    (kernels.transpose_bits, (BITS, 200), r"shape \(n_tokens, 4\)"),
    (kernels.transpose_bits, (BITS[0], 100), "shape"),
    (kernels.coactivation_counts, (BITS, -1), "non-negative"),
    (kernels.coactivation_counts, (BITS, 100.0), "non-negative integer"),
    (kernels.firing_rates, (BITS, 300), r"shape \(n_tokens, 5\)"),
    (kernels.normalised_coactivation, (COUNTS, 3, "cosine"), "pmi"),
    (kernels.normalised_coactivation, (np.ones((2, 3), int), 3), "square"),
    (kernels.normalised_coactivation, (COUNTS.astype(float), 3), "integers"),
    (kernels.normalised_coactivation, (COUNTS * 9, 3), "n_tokens=3"),
    (AP, (np.ones((3, 2)), np.array([0, 1, 2]), 2), "labels must lie"),
    (AP, (np.ones((3, 2)), np.array([0, 1]), 2), "3 integers"),
    (AP, (np.ones((3, 2)), np.array([0.0, 1, 1]), 2), "integers"),
    (AP, (np.ones(3), np.array([0, 1, 1]), 2), "n_prompts"),
    (AP, (np.ones((3, 1), complex), np.array([0, 1, 1]), 2), "real"),
    (AP, (np.full((3, 1), np.nan), np.zeros(3, int), 1), "NaN"),
]


@pytest.mark.parametrize("function,args,message", BAD_CALLS)
def test_bad_inputs_raise_clear_errors(function, args, message):
    with pytest.raises(ValueError, match=message):
        function(*args)


def test_neuron_major_bits_must_have_one_row_per_neuron():
    with pytest.raises(ValueError, match=r"shape \(5, n_token_words\)"):
        kernels.coactivation_counts(BITS, 5, neuron_major=True)


CONCURRENT_SCRIPT = """
import threading, numpy as np
from core.kernels import coact as kernels
bits = kernels.pack_bits(np.random.default_rng(0).random((5000, 512)) < 0.1)
X, labels = np.random.default_rng(1).random((300, 512)), np.arange(300) % 3
expected = kernels.coactivation_counts(bits, 512)
def work():
    for _ in range(10):
        assert (kernels.coactivation_counts(bits, 512) == expected).all()
        kernels.average_precision(X, labels, 3)
threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_parallel_kernels_survive_concurrent_sessions():
    """Several browser sessions call the kernels at once; numba's workqueue layer aborts on that."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT_SCRIPT], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_parallel_kernels_leave_torch_thread_count_alone():
    """numba's OpenMP layer used to reset torch's thread count (2x-6x slower model passes)."""
    import subprocess
    import sys

    code = (
        "import torch, numpy as np\n"
        "from core.kernels import coact as kernels\n"
        "before = torch.get_num_threads()\n"
        "kernels.average_precision(np.random.rand(40, 200).astype(np.float32), np.arange(40) % 3, 3)\n"
        "assert torch.get_num_threads() == before, (before, torch.get_num_threads())\n"
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
