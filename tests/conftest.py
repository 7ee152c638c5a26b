"""Shared fixtures: a tiny random-weight Llama with the real tokenizer, a temp cache, a small run;
and the helpers that drive pages in Streamlit's AppTest."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # the GPU kernels' tests run on Triton's CPU interpreter, which Triton
    os.environ.setdefault(
        "TRITON_INTERPRET", "1"
    )  # reads as a kernel is defined: before any test imports one

from core import models, prompts
from core.capture import run as capture
from core.store import Store

ROOT = Path(__file__).resolve().parents[1]
PAGE_TIMEOUT = 180  # seconds per script run: the first run of a page loads the tiny model


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_dir() -> str:
    return models.prepare_default_model()


def save_tiny(path, default_dir: str, **overrides) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, saved as safetensors."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, **overrides,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(default_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_dir) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), default_dir)


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir) -> models.LoadedModel:
    return models.load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def default_lm(default_dir) -> models.LoadedModel:
    return models.load_model(None, device="cpu")


@pytest.fixture(scope="session")
def small_prompts() -> prompts.PromptSet:
    return prompts.default_prompt_set().head(21)


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "cache.duckdb")
    yield s
    s.close()


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, tiny_lm, small_prompts):
    """(store path, run id) of a complete capture of 21 prompts with the tiny model."""
    path = tmp_path_factory.mktemp("run") / "cache.duckdb"
    s = Store(path)
    result = capture.capture(tiny_lm, small_prompts, s, capture.CaptureConfig(chunk_prompts=8))
    s.close()
    return path, result.run_id


@pytest.fixture
def small_store(small_run):
    """(open Store, Run) of the tiny capture, closed after the test."""
    path, run_id = small_run
    store = Store(path)
    yield store, store.require_run(run_id)
    store.close()


def app(name: str):
    """Streamlit's AppTest of app.py or of a page in pages/ ("3_Bricks.py"); call .run() on it."""
    from streamlit.testing.v1 import AppTest  # only the tests that drive pages import streamlit

    path = ROOT / ("app.py" if name == "app.py" else f"pages/{name}")
    return AppTest.from_file(str(path), default_timeout=PAGE_TIMEOUT)


def texts(elements) -> str:
    """The values of AppTest elements (captions, markdown, errors), one a line, to search in."""
    return "\n".join(str(e.value) for e in elements)


@pytest.fixture
def on_small_run(monkeypatch, small_run, tiny_dir) -> str:
    """The app looks at the tiny capture; returns its run id."""
    path, run_id = small_run
    monkeypatch.setenv("BRICKLAB_DB", str(path))
    monkeypatch.setenv("BRICKLAB_MODEL", tiny_dir)
    return run_id
