"""The sparse FFN kernels (core.kernels.sparse_gpu) against the masked dense computation, on CUDA or
Triton's CPU interpreter; skipped where Triton is not installed."""

import pytest
import torch

pytest.importorskip("triton")

from core.kernels import sparse_gpu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def layer(d_model: int, d_ff: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(d_ff, d_model, generator=g) / d_model**0.5 for _ in range(2))
    down = torch.randn(d_model, d_ff, generator=g) / d_ff**0.5
    x = torch.randn(d_model, generator=g)
    w = sparse_gpu.Packed.of(*(t.to(DEVICE, dtype) for t in (gate, up, down)))
    return x.to(DEVICE, dtype), w


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref.cpu()).norm() / ref.norm().clamp_min(1e-30))


TILE = sparse_gpu.Launch(listed=False, block_k=16, block_n=32, warps=4)
RAGGED_TILE = sparse_gpu.Launch(listed=False, block_k=32, block_n=64, warps=2)
LISTED = sparse_gpu.Launch(listed=True, block_k=8, block_n=32, warps=4, chunk=32, ahead=False)
AHEAD = sparse_gpu.Launch(listed=True, block_k=4, block_n=64, warps=4, chunk=16, ahead=True)
# even shapes and ragged ones (outputs past a block, inputs past a chunk); tiles and lists; gate+up
# listed with down tiled and the other way round
SHAPES = [
    (64, 128, sparse_gpu.Tiles(gate_up=TILE, down=TILE)),
    (48, 100, sparse_gpu.Tiles(gate_up=RAGGED_TILE, down=RAGGED_TILE)),
    (64, 128, sparse_gpu.Tiles(gate_up=LISTED, down=LISTED)),
    (48, 100, sparse_gpu.Tiles(gate_up=AHEAD, down=AHEAD)),
    (48, 100, sparse_gpu.Tiles(gate_up=LISTED, down=RAGGED_TILE)),
    (64, 96, sparse_gpu.Tiles(gate_up=TILE, down=AHEAD)),
]
THRESHOLDS = [(0.0, 0.0), (0.0, 0.2), (0.6, 0.0), (0.8, 0.35), (10.0, 0.0), (0.0, 1.0)]  # (t_x, tau)


@pytest.mark.parametrize("d_model, d_ff, tiles", SHAPES)
@pytest.mark.parametrize("t_x, tau", THRESHOLDS)
def test_the_kernels_equal_the_masked_dense_ffn(d_model, d_ff, tiles, t_x, tau):
    x, w = layer(d_model, d_ff, torch.float32, seed=d_ff)
    out = sparse_gpu.ffn_one(x, w, t_x, tau, tiles)
    ref = sparse_gpu.reference(x, w, t_x, tau)
    assert out.dtype == torch.float32 and out.shape == (d_model,)
    assert torch.isfinite(out).all()
    if t_x == 10.0:  # no input passes: exactly zero
        assert not out.any()
    else:
        assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("launch", [TILE, RAGGED_TILE, LISTED, AHEAD])
@pytest.mark.parametrize("k, n", [(64, 96), (100, 72), (7, 33)])
@pytest.mark.parametrize("share", [0.0, 0.5, 0.9])
def test_a_projection_equals_the_masked_dense_product(launch, k, n, share):
    """q/k/v and o: x @ W.T over the inputs |x_k| >= threshold, weights input-major."""
    g = torch.Generator().manual_seed(k * n)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE)
    x = torch.randn(k, generator=g).to(DEVICE)
    threshold = float(x.abs().quantile(share)) if share else 0.0
    w_t = sparse_gpu.input_major(weight)
    assert w_t.shape == (k, n) and w_t.is_contiguous()
    out = sparse_gpu.project(x, w_t, threshold, launch)
    ref = sparse_gpu.proj_reference(x, w_t, threshold)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert relative_error(out, ref) < 1e-5
    if share:  # the skipped inputs matter: not the dense product
        assert relative_error(out, sparse_gpu.proj_reference(x, w_t, 0.0)) > 1e-3


def test_skipping_changes_the_output_and_bf16_stays_close():
    x, w = layer(64, 128, torch.bfloat16, seed=7)
    dense = sparse_gpu.ffn_one(x, w, 0.0, 0.0)
    sparse = sparse_gpu.ffn_one(x, w, 0.5, 0.3)
    assert dense.dtype == torch.bfloat16
    assert relative_error(dense, sparse_gpu.reference(x, w, 0.0, 0.0)) < 1e-2
    assert relative_error(sparse, sparse_gpu.reference(x, w, 0.5, 0.3)) < 1e-2
    assert relative_error(sparse, sparse_gpu.reference(x, w, 0.0, 0.0)) > 1e-2  # the masks do something


def test_the_sparse_layer_function_runs_one_token_through_the_kernels(monkeypatch):
    """core.live.sparse.Threshold: one token through the kernels (on CUDA by itself, on the CPU
    through the interpreter when told to), the same output as its torch path on several tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.live import sparse

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    f = sparse.ffn(model, 1)
    x = torch.randn(1, 1, 64, device=DEVICE)
    if DEVICE == "cpu":
        monkeypatch.setattr(sparse, "gpu_token", lambda f, x: x.numel() == x.shape[-1])
    assert sparse.gpu_token(f, x) and not sparse.gpu_token(f, x.expand(1, 2, 64))
    fn = sparse.Threshold(0.3, float(x.abs().median()))
    with torch.inference_mode():
        got = fn(f, x)
        want = fn(f, x.expand(1, 2, 64))[:, :1]  # two equal tokens: the torch path
        dense = sparse.Threshold(0.0)(f, x)
    assert got.shape == x.shape
    assert relative_error(got, want.double()) < 1e-5
    assert relative_error(got, dense.double()) > 1e-3
    assert sparse.packed(f) is sparse.packed(f)  # packed once
