"""GPU capture benchmark: bare forward vs full capture on a random model of a real LLM's shape.

Used by `benchmarks/capture.py --device cuda --shape NAME`; run alone for the same thing.
Speed does not depend on weight values, so random weights of Llama-3-8B's shape stand in for it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import capture, models  # noqa: E402
from core.reduce import ChunkReducer  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192),
}  # fmt: skip


class _Ids:
    """Stands in for a tokenizer when the cache records token strings of random ids."""

    pad_token_id = 0

    @staticmethod
    def convert_ids_to_tokens(ids):
        return [str(i) for i in ids]


def random_model(shape: str, device: str) -> models.LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
        try:
            model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(default)
    info = models.describe(model, f"random-{shape}")
    return models.LoadedModel(model, _Ids(), info)


def encoded_batches(n_prompts: int, seq: int, vocab: int) -> list[capture.Encoded]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (n_prompts, seq), generator=g)
    return [capture.Encoded(row.tolist(), 0, seq, False) for row in ids]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_bare(lm, encoded, batch_size: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for b in range(0, len(encoded), batch_size):
        ids = torch.tensor([e.ids for e in encoded[b : b + batch_size]], device=device)
        lm.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    sync(device)
    return time.perf_counter() - t0


def time_capture(lm, encoded, batch_size: int, device: str, write: bool, fused=None) -> float:
    """Hooks, reductions and host copies; with `write`, also the chunk's cache transaction."""
    from core.store import Store

    config = capture.CaptureConfig(batch_size=batch_size, chunk_prompts=len(encoded), max_tokens=10**6)
    norms = [models.down_column_norms(lm.model, layer) for layer in range(lm.info.n_layers)]
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.duckdb") if write else None
        if store:
            capture._create_run(store, "bench", lm, _FakeSet(len(encoded)), config, 1)
        sync(device)
        t0 = time.perf_counter()
        reducer = ChunkReducer(lm.info.n_layers, lm.info.d_ff, config, norms, device=device, fused=fused)
        capture._run_chunk(lm, encoded, 0, reducer, config, None, 0, len(encoded))
        if store:
            capture._write_chunk(store, "bench", 0, 0, encoded, lm.tokenizer, reducer, 0.0)
        else:
            reducer.partials(0)
        sync(device)
        elapsed = time.perf_counter() - t0
        if store:
            store.close()
    return elapsed


class _FakeSet:
    def __init__(self, n):
        from core.prompts import Prompt

        self.prompts = tuple(Prompt(f"p{i}", None, "") for i in range(n))
        self.name, self.hash, self.categories, self.warnings = "random", "random", [], ()

    def __len__(self):
        return len(self.prompts)


def run(
    shape: str, device: str, n_prompts: int, seq: int, batch_size: int, reps: int, write: bool, compare=False
) -> dict:
    """Bare vs capture; with `compare`, also capture through torch's ops instead of the fused kernels."""
    lm = random_model(shape, device)
    encoded = encoded_batches(n_prompts, seq, SHAPES[shape]["vocab_size"])
    time_bare(lm, encoded[:batch_size], batch_size, device)  # warm-up: kernels, allocator
    time_capture(lm, encoded[:batch_size], batch_size, device, write=False)
    if compare:
        time_capture(lm, encoded[:batch_size], batch_size, device, write=False, fused=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bare, full, plain = [], [], []
    for _ in range(reps):  # interleaved, so drift hits both alike
        bare.append(time_bare(lm, encoded, batch_size, device))
        full.append(time_capture(lm, encoded, batch_size, device, write))
        if compare:
            plain.append(time_capture(lm, encoded, batch_size, device, write, fused=False))
    n_tokens = n_prompts * seq
    best_bare, best_cap = min(bare), min(full)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": shape, "n_prompts": n_prompts, "seq": seq, "batch_size": batch_size, "reps": reps,
        "cache_writes": write, "bare_s": best_bare, "capture_s": best_cap, "ratio": best_cap / best_bare,
        "bare_all": bare, "capture_all": full,
        "tokens_per_s": n_tokens / best_cap, "bare_tokens_per_s": n_tokens / best_bare,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "fused": device == "cuda",
        **({"torch_ops_capture_s": min(plain), "torch_ops_ratio": min(plain) / best_bare,
            "torch_ops_all": plain} if compare else {}),
    }  # fmt: skip


def profile(shape: str, device: str, n_prompts: int, seq: int, batch_size: int) -> None:
    """Device time per operator of one reductions-only capture (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    lm = random_model(shape, device)
    encoded = encoded_batches(n_prompts, seq, SHAPES[shape]["vocab_size"])
    time_capture(lm, encoded[:batch_size], batch_size, device, write=False)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_capture(lm, encoded, batch_size, device, write=False)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="skip the cache transaction")
    p.add_argument("--profile", action="store_true", help="print device time per operator instead")
    p.add_argument("--compare", action="store_true", help="also time capture through torch's ops (unfused)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.profile:
        return profile(args.shape, args.device, args.prompts, args.seq, args.batch_size)
    result = run(
        args.shape, args.device, args.prompts, args.seq, args.batch_size, args.reps, not args.no_write,
        args.compare,
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
