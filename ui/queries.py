"""Cached query results for the pages (st.cache_data, bounded): thin wrappers over core calls.

Keys are run ids: a run id is a hash of the model, the prompts and the capture settings, so equal ids
mean equal data whichever cache file holds them.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import streamlit as st

from core import configuration
from core.bricks import candidates as bricks
from core.bricks import explain, neuron_map, neurons, scores, token_search, vocab
from core.errors import BricklabError
from core.live import compare, demo, evaluate, interventions
from ui import resources


@st.cache_data(max_entries=8, show_spinner=False)
def neuron_map_arrays(run_id: str, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """(coords (n, 2), cluster labels (n,)) of the run's neuron map."""
    result = neuron_map.compute_map(resources.store(), run_id, neuron_map.MapParams.from_dict(params))
    return result.coords, result.labels


@st.cache_data(max_entries=8, show_spinner=False)
def functionality(run_id: str, shuffled: bool = False) -> np.ndarray:
    """(n_categories, n_neurons) functionality scores."""
    return scores.functionality_scores(resources.store(), run_id, shuffled=shuffled)


@st.cache_data(max_entries=16, show_spinner=False)
def neuron_stat(run_id: str, name: str) -> np.ndarray:
    return neurons.neuron_stat(resources.store(), run_id, name)


@st.cache_data(max_entries=256, show_spinner=False)
def neuron_detail(run_id: str, layer: int, neuron: int) -> neurons.NeuronDetail:
    return neurons.neuron_detail(resources.store(), run_id, layer, neuron)


@st.cache_data(max_entries=512, show_spinner=False)
def token_activations(run_id: str, model_ref: str, prompt_idx: int, layer: int, neuron: int) -> np.ndarray:
    lm = resources.model(model_ref)
    return neurons.token_activations(lm, resources.store(), run_id, prompt_idx, layer, neuron)


@st.cache_data(max_entries=8, show_spinner=False)
def bricks_of(run_id: str, params: dict) -> list[bricks.Candidate]:
    return bricks.compute_bricks(resources.store(), run_id, bricks.BrickParams.from_dict(params))


def playground_bricks(run) -> list[bricks.Candidate]:
    """The bricks the Playground offers: those of the session's method (Bricks page) and, on a run with
    categories, the functional ones; labelled bricks first, the most enriched first."""
    found = {}
    if run.categories:
        with contextlib.suppress(BricklabError):
            found = {b.brick_id: b for b in bricks_of(run.run_id, demo.PARAMS.to_dict())}
    found |= {b.brick_id: b for b in bricks_of(run.run_id, session_brick_params())}  # same id: the session's
    return sorted(found.values(), key=lambda b: (b.label is None, min(b.p_values.values(), default=1.0)))


def session_brick_params() -> dict:
    """The brick parameters this session chose on the Bricks page (the defaults until then)."""
    return st.session_state.get("brick_params") or bricks.BrickParams().to_dict()


@st.cache_data(max_entries=8, show_spinner=False)
def brick_of_neuron(run_id: str, params: dict, n_neurons: int) -> np.ndarray:
    """int32 (n_neurons,): index of the (first) brick holding each neuron, -1 for none."""
    index = np.full(n_neurons, -1, np.int32)
    for i, brick in reversed(list(enumerate(bricks_of(run_id, params)))):
        index[brick.neurons] = i
    return index


@st.cache_data(max_entries=16, show_spinner=False)  # ~6 MB each on the default model (log-probs)
def baseline(model_ref: str, prompt: str, max_new_tokens: int) -> compare.Generation:
    """The plain model's greedy continuation and its log-probabilities: computed once per prompt,
    reused by every toggle."""
    lm = resources.model(model_ref)
    return compare.generate_scored(lm, compare.prompt_ids(lm, prompt), max_new_tokens)


@st.cache_data(max_entries=64, show_spinner=False)
def comparison(
    model_ref: str, run_id: str, prompt: str, config_json: str, max_new_tokens: int
) -> tuple[compare.Comparison, float]:
    """The side-by-side comparison and the seconds it took to compute (a cached answer comes back
    faster: the page says "cached" then)."""
    started = time.perf_counter()
    lm = resources.model(model_ref)
    config = configuration.loads(config_json, lm.info)
    plain = baseline(model_ref, prompt, max_new_tokens)
    result = compare.compare(lm, prompt, config, max_new_tokens, resources.store(), run_id, baseline=plain)
    return result, time.perf_counter() - started


@st.cache_data(max_entries=64, show_spinner=False)
def category_loss(
    model_ref: str, run_id: str, config_json: str | None, per_category: int
) -> dict[str, float]:
    """Mean next-token loss on the first `per_category` prompts of each category of the run, with
    the configuration applied (None: the plain model)."""
    lm, store = resources.model(model_ref), resources.store()
    picked: dict[str, list[str]] = {}
    for _, _, category, text in store.prompts(run_id):
        if category and len(picked.setdefault(category, [])) < per_category:
            picked[category].append(text)
    texts = [t for group in picked.values() for t in group]
    scope = contextlib.nullcontext()
    if config_json is not None:
        scope = interventions.configured(lm, configuration.loads(config_json, lm.info), store, run_id)
    with scope:
        loss = evaluate.loss_per_prompt(lm, texts)
    bounds = np.cumsum([0, *(len(g) for g in picked.values())])
    return {c: float(np.nanmean(loss[a:b])) for c, a, b in zip(picked, bounds[:-1], bounds[1:], strict=True)}


def brick_name(run_id: str, params: dict | None, global_id: int) -> str | None:
    """The brick holding a neuron, for bricks this session already formed (None before that)."""
    if params is None:
        return None
    run = resources.store().require_run(run_id)
    index = brick_of_neuron(run_id, params, run.n_layers * run.d_ff)[global_id]
    return bricks_of(run_id, params)[index].brick_id if index >= 0 else None


# --- what a neuron does: explanations, vocabulary projections, token search (core.bricks.explain,
# vocab, token_search); the model is the run's, loaded once by resources.model


@st.cache_data(max_entries=256, show_spinner=False)
def neuron_explanation(run_id: str, model_ref: str, layer: int, neuron: int):
    """(the neuron's Explanation, its promoted and suppressed tokens {side: [(text, logit)]})."""
    lm, store = resources.model(model_ref), resources.store()
    described = explain.explain_neuron(store, run_id, layer, neuron, lm=lm)
    if not described.promoted:  # another model than the run's: its tokens would say nothing here
        return described, {"promoted": [], "suppressed": []}
    return described, vocab.neuron_tokens(lm, layer * lm.info.d_ff + neuron, 10, store)


@st.cache_data(max_entries=64, show_spinner=False)
def brick_explanation(run_id: str, model_ref: str, params: dict, brick_id: str):
    """(the brick's Explanation, the tokens its summed output promotes and suppresses)."""
    lm, store = resources.model(model_ref), resources.store()
    brick = next(b for b in bricks_of(run_id, params) if b.brick_id == brick_id)
    described = explain.explain_brick(store, run_id, brick, lm=lm)
    if not described.promoted:  # another model than the run's
        return described, {"promoted": [], "suppressed": []}
    mean_act = store.layer_array(run_id, "mean_act").reshape(-1)[brick.neurons]
    return described, vocab.group_tokens(lm, brick.neurons, mean_act)


@st.cache_data(max_entries=64, show_spinner=False)
def promoting_neurons(model_ref: str, text: str) -> tuple[str, list[dict]]:
    return vocab.promoting_neurons(resources.model(model_ref), text)


def token_activity(run_id: str, model_ref: str, text: str, progress=None) -> dict:
    """Not st.cache_data: the store caches the answer per (run, token), and the first call reports
    progress."""
    lm = resources.model(model_ref)
    return token_search.token_activity(lm, resources.store(), run_id, text, progress=progress)
