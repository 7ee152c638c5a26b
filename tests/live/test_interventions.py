"""Applying brick configurations to a live model: what each mode does to the FFN activation, hooks
always removed, nesting, and several threads generating on one shared model at once."""

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from core import models
from core.configuration import Brick, BrickConfig, ConfigError
from core.errors import BricklabError
from core.live import compare
from core.live.interventions import configured, hook_count, transforms
from core.store import Store
from tests.conftest import save_tiny

IDS = torch.tensor([[1, 502, 3312, 7, 981, 44, 12000, 5]])  # (1, 8) arbitrary tokens


def make(lm, *bricks: Brick) -> BrickConfig:
    info = lm.info
    return BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, bricks)


@contextmanager
def recorded(model, layer: int):
    """The activations layer `layer`'s down projection receives inside this context (a list)."""
    seen = []

    def record(a):
        seen.append(a.detach().clone())
        return a

    with transforms(model, {layer: record}):
        yield seen


def before_after(lm, config, layer, store=None, run_id=None):
    """(raw, configured) activations of one layer on IDS: recorders outside and inside the config."""
    with (
        recorded(lm.model, layer) as raw,
        configured(lm, config, store, run_id),
        recorded(lm.model, layer) as changed,
        torch.no_grad(),
    ):
        lm.model(IDS)
    return raw[0], changed[0]


# --- what each mode does -----------------------------------------------------------------------


def test_off_zeroes_exactly_its_neurons(tiny_lm):
    idx = [0, 5, 17, 95]
    raw, out = before_after(tiny_lm, make(tiny_lm, Brick("x", {1: idx}, "off")), layer=1)
    assert torch.all(out[..., idx] == 0) and torch.all(raw[..., idx] != 0)
    rest = np.setdiff1d(np.arange(tiny_lm.info.d_ff), idx)
    assert torch.equal(out[..., rest], raw[..., rest])


def test_off_in_one_layer_leaves_the_other_layer_alone(tiny_lm):
    config = make(tiny_lm, Brick("x", {1: [3]}, "off"))
    raw, out = before_after(tiny_lm, config, layer=0)
    assert torch.equal(raw, out)


def test_keep_zeroes_everything_outside_kept_bricks(tiny_lm):
    config = make(tiny_lm, Brick("k1", {0: [1, 2]}, "keep"), Brick("k2", {0: [40]}, "keep"))
    raw, out = before_after(tiny_lm, config, layer=0)
    kept = [1, 2, 40]
    assert torch.equal(out[..., kept], raw[..., kept])
    assert int(torch.count_nonzero(out)) == int(torch.count_nonzero(raw[..., kept]))
    _, other = before_after(tiny_lm, config, layer=1)  # a layer without kept neurons is all off
    assert torch.all(other == 0)


def test_scale_multiplies_its_neurons(tiny_lm):
    idx = [4, 9]
    raw, out = before_after(tiny_lm, make(tiny_lm, Brick("s", {0: idx}, "scale", 2.5)), layer=0)
    torch.testing.assert_close(out[..., idx], raw[..., idx] * 2.5, rtol=0, atol=0)
    assert torch.equal(out[..., 10:], raw[..., 10:])


def test_mean_replaces_by_the_runs_mean(tiny_lm, small_run):
    path, run_id = small_run
    store = Store(path)
    try:
        means = store.layer_array(run_id, "mean_act")
        idx = [2, 30, 31]
        raw, out = before_after(tiny_lm, make(tiny_lm, Brick("m", {1: idx}, "mean")), 1, store, run_id)
    finally:
        store.close()
    expected = torch.from_numpy(means[1, idx]).expand_as(out[..., idx])
    assert torch.equal(out[..., idx], expected) and not torch.equal(raw[..., idx], expected)
    assert torch.equal(out[..., :2], raw[..., :2])


def test_mean_without_a_run_is_refused_before_any_hook(tiny_lm):
    with (
        pytest.raises(BricklabError, match="mean"),
        configured(tiny_lm, make(tiny_lm, Brick("m", {0: [1]}, "mean"))),
    ):
        pass
    assert hook_count(tiny_lm.model) == 0


@pytest.mark.parametrize("field", ["fingerprint", "n_layers", "d_ff"])
def test_a_configuration_for_another_model_is_refused(tiny_lm, field):
    info = tiny_lm.info
    values = {"fingerprint": info.fingerprint, "n_layers": info.n_layers, "d_ff": info.d_ff}
    values[field] = "0123456789abcdef" if field == "fingerprint" else values[field] * 2
    config = BrickConfig("other", values["fingerprint"], values["n_layers"], values["d_ff"], ())
    with pytest.raises(ConfigError, match=f"model.{field}"), configured(tiny_lm, config):
        pass
    assert hook_count(tiny_lm.model) == 0


# --- hooks, nesting ----------------------------------------------------------------------------


def test_hooks_removed_and_logits_restored_after_normal_exit_and_exception(tiny_lm):
    model, config = tiny_lm.model, make(tiny_lm, Brick("x", {0: list(range(48))}, "off"))
    with torch.no_grad():
        before = model(IDS).logits
        with configured(tiny_lm, config):
            assert hook_count(model) == tiny_lm.info.n_layers
            inside = model(IDS).logits
        assert hook_count(model) == 0
        with pytest.raises(KeyError), configured(tiny_lm, config):
            raise KeyError("boom")
        assert hook_count(model) == 0
        after = model(IDS).logits
    assert not torch.equal(before, inside)
    assert torch.equal(before, after)


def test_nested_configurations_compose_and_unwind(tiny_lm):
    outer = make(tiny_lm, Brick("a", {0: [1, 2]}, "off"))
    inner = make(tiny_lm, Brick("b", {0: [3]}, "off"), Brick("c", {0: [1]}, "scale", 3.0))
    with recorded(tiny_lm.model, 0) as raw, configured(tiny_lm, outer), torch.no_grad():
        with configured(tiny_lm, inner), recorded(tiny_lm.model, 0) as both:
            tiny_lm.model(IDS)
        with recorded(tiny_lm.model, 0) as only_outer:
            tiny_lm.model(IDS)
    assert torch.all(both[0][..., [1, 2, 3]] == 0)  # off stays off when scaled later
    assert torch.all(only_outer[0][..., [1, 2]] == 0)
    assert torch.equal(only_outer[0][..., 3], raw[1][..., 3]) and bool(torch.any(raw[1][..., 3] != 0))
    assert hook_count(tiny_lm.model) == 0


# --- many threads, one model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lively_lm(tmp_path_factory, default_dir):
    """A tiny model with large random weights: its greedy outputs change when neurons do."""
    path = save_tiny(tmp_path_factory.mktemp("lively"), default_dir, initializer_range=0.3)
    return models.load_model(path, device="cpu")


def greedy(lm, config, ids, n=10):
    if config is None:
        return compare.generate(lm, ids, n)
    with configured(lm, config):
        return compare.generate(lm, ids, n)


def test_threads_with_different_configurations_get_their_own_outputs(lively_lm):
    lm = lively_lm
    configs = {
        "off": make(lm, Brick("a", {0: list(range(48)), 1: list(range(0, 96, 2))}, "off")),
        "keep": make(lm, Brick("k", {0: list(range(20)), 1: list(range(30, 60))}, "keep")),
        "plain": None,
    }
    ids = compare.prompt_ids(lm, "Write a poem about the sea.")
    alone = {name: greedy(lm, config, ids) for name, config in configs.items()}
    assert len({tuple(v) for v in alone.values()}) == 3  # otherwise a leak could not show
    rounds, barrier, got, errors = 3, threading.Barrier(len(configs)), {k: [] for k in configs}, []

    def worker(name):
        try:
            for _ in range(rounds):
                barrier.wait(timeout=60)  # start together, so the generations overlap
                got[name].append(greedy(lm, configs[name], ids))
        except Exception as exc:  # reported below: an exception in a thread would pass silently
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(name,)) for name in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in configs:
        assert got[name] == [alone[name]] * rounds, name
    assert hook_count(lm.model) == 0


# --- the real default model --------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_changes_when_many_neurons_are_zeroed(default_lm):
    lm = default_lm
    ids = compare.prompt_ids(lm, "What is the capital of France?")
    plain = compare.generate(lm, ids, 8)
    with configured(lm, make(lm)):
        assert compare.generate(lm, ids, 8) == plain
    half = {layer: list(range(0, lm.info.d_ff, 2)) for layer in range(lm.info.n_layers)}
    with configured(lm, make(lm, Brick("half", half, "off"))):
        assert compare.generate(lm, ids, 8) != plain
    assert hook_count(lm.model) == 0
