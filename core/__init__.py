"""bricklab's computation: models, capture, the DuckDB cache, bricks, maps and interventions.

Nothing in this package imports streamlit; the pages in `pages/` only show what it computes. This module
is also the library's facade for notebooks and scripts (README, "Use from Python"):

    lm = core.load_model()                              # the embedded SmolLM2, a hub id or a folder
    store = core.Store("bricklab.duckdb")               # the cache; a second capture is a cache hit
    run = core.capture_run(lm, ["a prompt", ...], store)  # plain strings or a PromptSet
    bricks = core.compute_bricks(store, run)            # candidates: co-activation bricks by default
    config = core.config_from_bricks(run, {bricks[0]: "off"})
    core.compare(lm, "a prompt", config).configured_text  # greedy, with and without the bricks
    core.generate(lm, "a prompt", config)               # `with core.configured(lm, config):` for more
    core.save_config(config, "bricks.json"); core.load_config("bricks.json", lm)
    core.prune(lm, config, "pruned-model/")             # the switched-off neurons removed
    core.explain_neuron(store, run.run_id, 15, 100, lm).text  # in words, with a held-out score
    core.neuron_vocab(lm, 15 * 1536 + 100)              # the tokens a neuron promotes and suppresses

Names load on first use, so `import core` (and `python -m core --help`) stays quick.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# facade name -> (module, attribute): loaded when first asked for
_LAZY = {
    "load_model": ("core.models", "load_model"),
    "LoadedModel": ("core.models", "LoadedModel"),
    "Store": ("core.store", "Store"),
    "PromptSet": ("core.prompts", "PromptSet"),
    "from_texts": ("core.prompts", "from_texts"),
    "load_prompts": ("core.prompts", "load_prompt_file"),
    "default_prompts": ("core.prompts", "default_prompt_set"),
    "CaptureConfig": ("core.capture.run", "CaptureConfig"),
    "BrickParams": ("core.bricks.candidates", "BrickParams"),
    "Candidate": ("core.bricks.candidates", "Candidate"),
    "config_from_bricks": ("core.bricks.configure", "config_from_bricks"),
    "Brick": ("core.configuration", "Brick"),
    "BrickConfig": ("core.configuration", "BrickConfig"),
    "configured": ("core.live.interventions", "configured"),
    "compare": ("core.live.compare", "compare"),
    "prune": ("core.export", "prune"),
    "BricklabError": ("core.errors", "BricklabError"),
    "explain_neuron": ("core.bricks.explain", "explain_neuron"),
    "explain_brick": ("core.bricks.explain", "explain_brick"),
    "vocab_projection": ("core.bricks.vocab", "projection"),
    "neuron_vocab": ("core.bricks.vocab", "neuron_tokens"),
    "promoting_neurons": ("core.bricks.vocab", "promoting_neurons"),
    "token_activity": ("core.bricks.token_search", "token_activity"),
}

__all__ = sorted([*_LAZY, "capture_run", "compute_bricks", "generate", "save_config", "load_config"])


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def capture_run(lm, prompts, store, progress=None, **settings):
    """Capture `prompts` (a PromptSet or plain strings) with `lm` into `store`; returns the run
    (a core.store.Run). `settings` are CaptureConfig fields (e.g. fire_fraction=0.1, max_tokens=256).
    An identical earlier capture is a cache hit; an interrupted one resumes. (Not `capture`: that
    name is the subpackage core.capture.)"""
    from core.capture import run as capture

    result = capture.capture(lm, prompts, store, capture.CaptureConfig(**settings), progress)
    return store.require_run(result.run_id)


def compute_bricks(store, run=None, progress=None, **params):
    """The run's candidate bricks (a list of core.bricks.candidates.Candidate); `run`: a Run, a run
    id, or None for the newest complete run. `params` are BrickParams fields: method="coact" (the
    default), "functional" or "map"; size=32; ... Computed once, then read from the cache."""
    from core.bricks import candidates

    run_id = getattr(run, "run_id", run)
    return candidates.compute_bricks(store, run_id, candidates.BrickParams(**params), progress)


def generate(lm, prompt: str, config=None, max_new_tokens: int = 32, store=None, run_id=None) -> str:
    """Greedy continuation of `prompt` (in the chat template), under `config` when given; the new text.
    store and run_id are needed for `mean` bricks."""
    import contextlib

    from core.live import compare, interventions

    compare.check_new_tokens(max_new_tokens)
    ids = compare.prompt_ids(lm, prompt)
    scope = (
        contextlib.nullcontext() if config is None else interventions.configured(lm, config, store, run_id)
    )
    with scope:
        tokens = compare.generate(lm, ids, max_new_tokens)
    return lm.tokenizer.decode(tokens, skip_special_tokens=True)


def save_config(config, path) -> Path:
    """Write a BrickConfig as its versioned JSON document; returns the path."""
    path = Path(path)
    path.write_text(config.to_json())
    return path


def load_config(path, lm=None):
    """Read and validate a brick-configuration JSON file; with `lm`, also check it matches that model."""
    from core import configuration

    return configuration.load(path, None if lm is None else lm.info)
