"""The fused Triton reductions (select_gpu, reduce_gpu) against capture's torch ops, on CUDA or
Triton's CPU interpreter; skipped where Triton is not installed."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from core.capture.reduce import ChunkReducer  # noqa: E402
from core.capture.run import CaptureConfig  # noqa: E402
from core.kernels import coact as kernels  # noqa: E402
from core.prompts import Encoded  # noqa: E402

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


# the one-neuron-a-lane kernel; the paired one as capture runs it; paired with two rows a reduction,
# in-kernel counts and norms read per row, over programs of 4 rows (15 rows: the last partly empty);
# paired with the full cut-off search always, or first in a window of 2 or 8 keys; histograms of both
# halves in one call, the output one from the selection's keys
VARIANTS = {
    "one": {"pairs": False},
    "pairs": {"pairs": True},
    "pairs2": {"pairs": True, "per_program": 4, "rows_at_once": 2, "count": True, "reload_norm": True},
    "pairs_full_search": {"pairs": True, "near": 0},
    "pairs_window_2": {"pairs": True, "near": 1},  # misses often: every path of the window search
    "pairs_window_8": {"pairs": True, "near": 3, "per_program": 4},
    "pairs_hist_joined_reused": {"pairs": True, "hist_join": True, "hist_reuse": True},
}


def reference_bits(x: torch.Tensor, rows: torch.Tensor, norm: torch.Tensor, k: int, use_output: bool):
    """(N, d) 0/1: per row the k largest scores (torch's bf16 product), ties to the lower index."""
    absx = x[rows.long()].abs()
    score = absx * norm if use_output else absx
    key = (score.view(torch.int16).cpu().numpy().astype(np.int32)) & 0x7FFF
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    fired = np.zeros(key.shape, dtype=np.uint8)
    np.put_along_axis(fired, order, 1, axis=1)
    return fired


def unpacked(bits: torch.Tensor, d: int) -> np.ndarray:
    return np.unpackbits(bits.cpu().numpy().view(np.uint8), axis=1, bitorder="little")[:, :d]


def hard_rows(d: int) -> torch.Tensor:
    """Rows built to break a selection: ties everywhere, equal or zero rows, denormals, signs."""
    g = torch.Generator().manual_seed(1)
    plain = torch.randn(4, d, generator=g)
    few = torch.tensor([0.0, 0.5, -0.5, 1.0, 2.0])[torch.randint(0, 5, (4, d), generator=g)]
    tiny = torch.tensor([0.0, 1e-39, -2e-39, 5e-40, 1e-38])[torch.randint(0, 5, (2, d), generator=g)]
    rows = [plain, few, tiny, torch.full((1, d), 0.75), torch.full((1, d), -3.0), torch.zeros(1, d)]
    x = torch.cat(rows)
    x[0, ::7] = x[0, 3]  # one value many times in an otherwise plain row
    return x.to(torch.bfloat16).to(DEVICE)


@pytest.mark.parametrize(
    "use_output, d, k",  # k at and beside 32-bit word edges, one, all but one, and a width of odd pairs
    [(True, 256, 31), (True, 256, 32), (True, 256, 33), (True, 202, 21), (False, 256, 1), (False, 256, 64),
     (False, 256, 255)],
)  # fmt: skip
def test_the_kernels_select_exactly_torchs_top_k_with_ties_to_the_lower_index(use_output, d, k):
    from core.kernels import select_gpu

    x = hard_rows(d)
    g = torch.Generator().manual_seed(2)
    norm = (torch.rand(d, generator=g) + 0.5).to(torch.bfloat16)
    norm[:5] = torch.tensor([1e-3, 1.0, 3.0, 1e-30, 0.5])  # products that land in denormals
    norm = norm.to(DEVICE)
    rows = torch.tensor([12, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3], dtype=torch.int32, device=DEVICE)
    want = reference_bits(x, rows, norm, k, use_output)
    for name, kwargs in VARIANTS.items():
        counts = torch.zeros(d, dtype=torch.int32, device=DEVICE)
        hist = torch.zeros((2, select_gpu.HIST_SLOTS), dtype=torch.int32, device=DEVICE)
        bits = select_gpu.select_pack(x, rows, norm, k, counts, hist, 3, 100, use_output, **kwargs)
        # Triton's CPU interpreter converts subnormal bf16 to float32 wrongly; the one-lane kernel
        # converts, the paired kernel only shifts bits, so on the interpreter it alone sees those rows
        seen = np.ones(len(rows), bool) if name != "one" or DEVICE == "cuda" else ~subnormal(x[rows.long()])
        fired = unpacked(bits, d)
        np.testing.assert_array_equal(fired[seen], want[seen], err_msg=name)
        if seen.all():
            np.testing.assert_array_equal(counts.cpu().numpy(), want.sum(axis=0), err_msg=name)
            np.testing.assert_array_equal(hist.cpu().numpy()[:, :100], recount(x[rows.long()], norm, 3, 100))


def subnormal(x: torch.Tensor) -> np.ndarray:
    """Rows of bf16 `x` holding a nonzero value below float32's smallest normal."""
    return ((x.abs().float() < 2.0**-126) & (x != 0)).any(dim=1).cpu().numpy()


def recount(x: torch.Tensor, norm: torch.Tensor, stride: int, bins: int) -> np.ndarray:
    """(2, bins) histograms of |a| and output magnitude over every `stride`-th row, as torch counts them."""
    absx = x[::stride].abs()
    out = []
    for v in (absx.float(), (absx * norm).float()):
        idx = (v * (bins / v.amax(1, keepdim=True).clamp_min(1e-30))).long().clamp(max=bins - 1)
        out.append(np.bincount(idx.reshape(-1).cpu().numpy(), minlength=bins))
    return np.stack(out)


def test_odd_widths_take_the_one_neuron_a_lane_kernel():
    from core.kernels import select_gpu

    x = hard_rows(202)[:, :201]  # rows 4-byte aligned (even stride), an odd number of neurons
    norm = torch.ones(201, dtype=torch.bfloat16, device=DEVICE)
    assert not select_gpu._pairable(x, norm) and select_gpu._pairable(hard_rows(200), norm[:200])
    rows = torch.arange(len(x), dtype=torch.int32, device=DEVICE)
    counts = torch.zeros(201, dtype=torch.int32, device=DEVICE)
    hist = torch.zeros((2, select_gpu.HIST_SLOTS), dtype=torch.int32, device=DEVICE)
    bits = select_gpu.select_pack(x, rows, norm, 20, counts, hist, 3, 100, True)
    np.testing.assert_array_equal(unpacked(bits, 201), reference_bits(x, rows, norm, 20, True))


def tiny_cuda_llama():
    """A random bf16 Llama of four layers on CUDA and 24 encoded prompts of 5-199 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core import models

    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE, torch.bfloat16).eval()

    class Ids:
        pad_token_id = 0

    lm = models.LoadedModel(model, Ids(), models.describe(model, "tiny-llama"))
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 200, (24,), generator=g).tolist()
    ids = [torch.randint(1, 1000, (n,), generator=g).tolist() for n in lengths]
    return lm, [Encoded(row, 2, len(row), False) for row in ids]


@pytest.mark.skipif(DEVICE != "cuda", reason="streams need CUDA")
def test_a_capture_with_its_reductions_on_a_side_stream_equals_one_in_line():
    """Streams race only when the forward pass frees or reuses memory the side stream still reads."""
    from core import models
    from core.capture import run as capture

    lm, encoded = tiny_cuda_llama()
    model = lm.model
    cfg = CaptureConfig(batch_size=5, chunk_prompts=24)
    norms = [models.down_column_norms(model, layer) for layer in range(4)]
    out = []
    for overlap in (False, True):
        r = ChunkReducer(4, 1024, cfg, norms, device=DEVICE, overlap=overlap)
        assert (r.side is not None) == overlap
        capture._run_chunk(lm, encoded, 0, r, cfg, None, 0, len(encoded))
        out.append((r, r.partials(0)))
    (a, pa), (b, pb) = out
    for (la, na, va), (lb, nb, vb) in zip(pa, pb, strict=True):
        assert (la, na) == (lb, nb)
        np.testing.assert_array_equal(va, vb, err_msg=f"{la} {na}")
    for i in range(len(encoded)):
        for layer in range(4):
            np.testing.assert_array_equal(a.prompt_bits[i][layer], b.prompt_bits[i][layer])
            np.testing.assert_array_equal(a.prompt_means[i][layer], b.prompt_means[i][layer])


def test_counting_many_layers_at_once_equals_counting_each():
    from core.kernels import select_gpu

    g = torch.Generator().manual_seed(3)
    d, n, layers = 200, 300, 3  # 300 rows: more than one program's rows, the last block partly empty
    shape = (layers, n, 2 * ((d + 63) // 64))  # bits past the last neuron set too: never counted
    bits = torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    bits = bits.to(DEVICE)
    together = torch.zeros((layers, d), dtype=torch.int32, device=DEVICE)
    select_gpu.count_bits(bits, together, d)
    for layer in range(layers):
        alone = torch.zeros(d, dtype=torch.int32, device=DEVICE)
        select_gpu.count_bits(bits[layer], alone, d)
        np.testing.assert_array_equal(together[layer].cpu().numpy(), alone.cpu().numpy())
        np.testing.assert_array_equal(alone.cpu().numpy(), unpacked(bits[layer], d).sum(axis=0))


@pytest.mark.skipif(DEVICE != "cuda", reason="the batch fits free GPU memory only on CUDA")
def test_on_cuda_a_forward_pass_takes_as_many_prompts_as_free_memory_allows(monkeypatch):
    from core import models
    from core.capture import run as capture

    lm, encoded = tiny_cuda_llama()
    config = CaptureConfig(chunk_prompts=24)  # batch_size 0: fit the memory
    longest = max(len(e.ids) for e in encoded)
    assert capture.token_budget(lm, encoded, config) == 24 * longest  # a tiny model: the chunk fits
    assert capture.token_budget(lm, encoded, CaptureConfig(batch_size=5)) is None
    total = torch.cuda.mem_get_info()[1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, total))  # nothing free
    monkeypatch.setattr(torch.cuda, "memory_reserved", torch.cuda.memory_allocated)
    budget = capture.token_budget(lm, encoded, config)
    assert budget == longest  # one prompt a pass
    monkeypatch.undo()
    norms = [models.down_column_norms(lm.model, layer) for layer in range(4)]
    r = ChunkReducer(4, 1024, config, norms, device=DEVICE)
    capture._run_chunk(lm, encoded, 0, r, config, None, 0, len(encoded), budget)
    for i, e in enumerate(encoded):
        assert all(r.prompt_bits[i][layer].shape[0] == e.end - e.start for layer in range(4))
