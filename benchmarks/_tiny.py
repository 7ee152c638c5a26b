"""What the benchmarks' --smoke runs measure: a tiny random-weight Llama with the default model's tokenizer,
and a small complete run of it in a fresh cache. Seconds, not figures: smoke runs only prove a script works.

Not a benchmark itself (the leading underscore keeps it out of tests/test_benchmarks.py's list).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from core import models, prompts
from core.capture import run as capture
from core.store import Store

SHAPE = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
)  # fmt: skip


def save(folder: str | Path) -> str:
    """Write the tiny model and the default tokenizer (with its chat template) to folder; returns it."""
    lm = model()
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


def model() -> models.LoadedModel:
    """The tiny model on the CPU, built in memory: a save and a load would add seconds to every run."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    net = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    tokenizer = AutoTokenizer.from_pretrained(models.prepare_default_model())
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as models.load_model does
    return models.LoadedModel(net, tokenizer, models.describe(net, "tiny-random"))


def run(lm: models.LoadedModel, folder: str | Path, per_category: int = 2) -> tuple[Path, str]:
    """(cache path, run id) of a complete capture of `per_category` default prompts per category,
    into a new cache in folder."""
    path = Path(folder) / "smoke.duckdb"
    store = Store(path)
    try:
        prompt_set = prompts.default_prompt_set().head(per_category * len(prompts.CATEGORIES))
        result = capture.capture(lm, prompt_set, store, capture.CaptureConfig(chunk_prompts=8))
    finally:
        store.close()
    return path, result.run_id


@contextmanager
def opened_run(lm: models.LoadedModel) -> Iterator[tuple[Store, str]]:
    """(store, run id) of a fresh `run` in a temporary folder, open for the duration."""
    with tempfile.TemporaryDirectory() as tmp:
        path, run_id = run(lm, tmp)
        store = Store(path)
        try:
            yield store, run_id
        finally:
            store.close()
