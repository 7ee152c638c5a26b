"""Adapter bricks: training on a copy, the hash-named file cache, configuration and bundle round trips,
rejection of missing or altered files, live hooks (hygiene, concurrency) and the pruned merge."""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from core import export, models
from core.configuration import AdapterRef, Brick, BrickConfig, ConfigError, loads
from core.errors import BricklabError
from core.live import adapter_train, adapters, interventions
from core.live.plan import Plan

IDS = torch.tensor([[1, 250, 3000, 17, 9000, 42, 7, 123]])


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """The adapters folder the app and configurations use (beside BRICKLAB_DB)."""
    monkeypatch.setenv("BRICKLAB_DB", str(tmp_path / "cache.duckdb"))
    return adapters.adapters_dir()


def logits(lm, scope=None) -> torch.Tensor:
    with torch.no_grad(), scope if scope is not None else contextlib.nullcontext():
        return lm.model(IDS).logits


def synthetic(lm, layers=(0, 1), modules=adapters.MODULES, rank=3, seed=1, fingerprint=None) -> bytes:
    """A random adapter file for lm (A and B both non-zero, unlike a fresh LoRA)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in layers:
        for name in modules:
            w = adapters.projection(lm.model, layer, name).weight
            a = torch.randn(rank, w.shape[1], generator=gen) * 0.3
            weights[(layer, name)] = (a, torch.randn(w.shape[0], rank, generator=gen) * 0.3)
    meta = {"model_id": lm.info.model_id, "fingerprint": fingerprint or lm.info.fingerprint}
    meta |= {"layers": list(layers), "modules": list(modules), "rank": rank, "alpha": 2.0 * rank}
    return adapters.encode(weights, meta)


def ref(sha: str, data: bytes, mode="on", factor=1.0, name="facts") -> AdapterRef:
    meta = adapters.header_meta(data)
    return AdapterRef(name, sha, meta["layers"], meta["modules"], meta["rank"], mode, factor)


def config(lm, *bricks, adapters_=()) -> BrickConfig:
    i = lm.info
    return BrickConfig(i.model_id, i.fingerprint, i.n_layers, i.d_ff, bricks, adapters=tuple(adapters_))


# --- training -------------------------------------------------------------------------------------


def test_training_leaves_the_shared_model_untouched_and_matches_peft(tiny_lm, tmp_path):
    before = logits(tiny_lm)
    grads = [p.requires_grad for p in tiny_lm.model.parameters()]
    facts = adapter_train.Facts("t", tuple(adapter_train.default_facts().texts[:6]))
    settings = adapter_train.TrainConfig(layers=(1,), modules=("gate", "down"), rank=4, steps=4)
    seen = []
    trained = adapter_train.train(tiny_lm, facts, settings, lambda *a: seen.append(a), tmp_path)
    assert [s[:2] for s in seen] == [(i, 4) for i in range(1, 5)]
    assert trained.losses[-1] < trained.losses[0] and not trained.cached
    data = (tmp_path / f"{trained.sha256}.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == trained.sha256
    a, b = trained.adapter.weights[(1, "gate")]
    assert a.shape == (4, 64) and b.shape == (96, 4) and b.abs().sum() > 0
    assert set(trained.adapter.weights) == {(1, "gate"), (1, "down")}
    # the shared model: same logits, no hooks, no peft wrappers, same requires_grad flags
    assert torch.equal(logits(tiny_lm), before)
    assert interventions.hook_count(tiny_lm.model) == 0
    assert not any("lora" in type(m).__name__.lower() for m in tiny_lm.model.modules())
    assert [p.requires_grad for p in tiny_lm.model.parameters()] == grads
    # the live hooks compute what peft computes with the same weights
    with adapters.applied(tiny_lm.model, [(trained.adapter, 1.0)]):
        live = logits(tiny_lm)
    assert not torch.allclose(live, before)
    torch.testing.assert_close(live, _peft_logits(tiny_lm, trained.adapter), rtol=1e-4, atol=1e-5)
    # asking again is a cache hit: nothing is trained
    again = adapter_train.train(tiny_lm, facts, settings, lambda *a: seen.append(a), tmp_path)
    assert again.cached and again.sha256 == trained.sha256 and len(seen) == 4


def _peft_logits(lm, adapter) -> torch.Tensor:
    from peft import LoraConfig, get_peft_model

    site = models.site_for(lm.model.config.model_type)
    paths = {"gate": site.gate, "up": site.up, "down": site.down}
    names = {key: f"{site.layers}.{key[0]}.{paths[key[1]]}" for key in adapter.weights}
    lora = LoraConfig(r=adapter.rank, lora_alpha=adapter.meta["alpha"], target_modules=list(names.values()))
    model = get_peft_model(adapters.copy_model(lm.model), lora)
    with torch.no_grad():
        for key, (a, b) in adapter.weights.items():
            module = model.base_model.model.get_submodule(names[key])
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
        return model(IDS).logits


def test_training_refuses_bad_settings(tiny_lm, tmp_path):
    facts = adapter_train.Facts("t", ("one text",))
    with pytest.raises(BricklabError, match="does not exist"):
        adapter_train.train(tiny_lm, facts, adapter_train.TrainConfig(layers=(5,)), directory=tmp_path)
    with pytest.raises(BricklabError, match="Unknown modules"):
        adapter_train.TrainConfig(modules=("attn",))
    with pytest.raises(BricklabError, match="rank"):
        adapter_train.TrainConfig(rank=0)


def test_bundled_facts_are_separate_training_texts_and_questions():
    facts = adapter_train.default_facts()
    assert len(facts.texts) == 32 and len(facts.questions) == 8
    assert not {q for q, _ in facts.questions} & set(facts.texts)
    assert all(answer.lower() in " ".join(facts.texts).lower() for _, answer in facts.questions)


# --- the file cache and configurations -----------------------------------------------------------


def test_hash_round_trip_and_catalog(tiny_lm, tmp_path):
    data = synthetic(tiny_lm)
    sha = adapters.save(data, tmp_path)
    assert sha == hashlib.sha256(data).hexdigest() and (tmp_path / f"{sha}.safetensors").is_file()
    adapter = adapters.load(sha, tiny_lm.info, tmp_path)
    original = adapters.decode(data)
    assert all(torch.equal(adapter.weights[k][1], original.weights[k][1]) for k in original.weights)
    (tmp_path / "junk.safetensors").write_bytes(b"abc")  # not an adapter: skipped, not an error
    [entry] = adapters.catalog(tmp_path, tiny_lm.info.fingerprint)
    assert entry["sha256"] == sha and entry["bytes"] == len(data) and entry["rank"] == 3
    assert adapters.catalog(tmp_path, "another-model") == []
    with pytest.raises(BricklabError, match="not a bricklab adapter"):
        adapters.save(b"\x08" + b"\x00" * 7 + b"{}", tmp_path)


def test_configuration_with_adapters_round_trips_and_validates(tiny_lm):
    sha = "ab" * 32
    on = AdapterRef("facts", sha, (1, 0), ("gate", "down"), 4, "scale", 0.5, "new facts")
    c = config(tiny_lm, Brick("b", {0: [1, 2]}, "off"), adapters_=[on])
    back = loads(c.to_json(), tiny_lm.info)
    assert back == c and back.adapters[0].layers == (0, 1)
    assert "adapters" not in config(tiny_lm).to_dict()  # configurations without adapters are unchanged
    doc = c.to_dict()
    cases = {
        "sha256": ({"sha256": "xyz"}, "64 lowercase hex"),
        "mode": ({"mode": "maybe"}, "on, off, scale"),
        "factor": ({"mode": "on", "factor": 2.0}, "only used by mode"),
        "layers": ({"layers": [7]}, "out of range"),
        "name": ({"name": "b"}, "used twice"),
    }
    for field, (change, words) in cases.items():
        bad = doc | {"adapters": [doc["adapters"][0] | change]}
        with pytest.raises(ConfigError, match=words) as err:
            BrickConfig.from_dict(bad, tiny_lm.info)
        assert err.value.path.startswith("adapters[0]"), field


@pytest.mark.parametrize("problem", ["missing", "altered", "other model", "other layers"])
def test_configuration_with_a_bad_adapter_is_rejected_and_nothing_applied(tiny_lm, cache, problem):
    data = synthetic(tiny_lm, fingerprint="0" * 16 if problem == "other model" else None)
    sha = adapters.save(data, cache)
    entry = ref(sha, data)
    if problem == "missing":
        (cache / f"{sha}.safetensors").unlink()
    elif problem == "altered":
        (cache / f"{sha}.safetensors").write_bytes(data[:-4] + b"\x00\x00\x00\x01")
    elif problem == "other layers":
        entry = AdapterRef("facts", sha, (1,), entry.modules, entry.rank)
    before = logits(tiny_lm)
    words = {"missing": "import the export bundle", "altered": "does not match|has sha256"}
    words |= {"other model": "trained on", "other layers": "differ from the adapter file"}
    bad = config(tiny_lm, Brick("b", {0: [1]}, "off"), adapters_=[entry])
    with pytest.raises(ConfigError, match=words[problem]) as err, interventions.configured(tiny_lm, bad):
        pytest.fail("a bad adapter must be refused before anything runs")
    assert err.value.path.startswith("adapters[0]")
    assert interventions.hook_count(tiny_lm.model) == 0 and torch.equal(logits(tiny_lm), before)


def test_configured_applies_bricks_and_adapters_and_modes(tiny_lm, cache):
    data = synthetic(tiny_lm)
    sha = adapters.save(data, cache)
    adapter = adapters.load(sha, tiny_lm.info)
    brick = Brick("b", {0: [1, 5]}, "off")
    plain = logits(tiny_lm)
    bricks_only = logits(tiny_lm, interventions.configured(tiny_lm, config(tiny_lm, brick)))
    off = config(tiny_lm, brick, adapters_=[ref(sha, data, "off")])
    assert torch.equal(logits(tiny_lm, interventions.configured(tiny_lm, off)), bricks_only)
    half = config(tiny_lm, brick, adapters_=[ref(sha, data, "scale", 0.5)])
    expected = logits(tiny_lm, _stacked(tiny_lm, config(tiny_lm, brick), [(adapter, 0.5)]))
    got = logits(tiny_lm, interventions.configured(tiny_lm, half))
    assert torch.equal(got, expected) and not torch.allclose(got, bricks_only)
    assert not torch.allclose(got, plain) and interventions.hook_count(tiny_lm.model) == 0


def _stacked(lm, brick_config, active):
    """Bricks through configured(), adapters through adapters.applied(), as two nested contexts."""
    stack = contextlib.ExitStack()
    stack.enter_context(interventions.configured(lm, brick_config))
    stack.enter_context(adapters.applied(lm.model, active))
    return stack


# --- bundles ---------------------------------------------------------------------------------------


def test_zip_bundle_round_trip_and_rejections(tiny_lm, cache, tmp_path):
    data = synthetic(tiny_lm)
    sha = adapters.save(data, cache)
    c = config(tiny_lm, Brick("b", {1: [3]}, "scale", 2.0), adapters_=[ref(sha, data)])
    blob = export.bundle(c)
    fresh = tmp_path / "elsewhere"
    assert export.unbundle(blob, tiny_lm.info, fresh) == c
    assert (fresh / f"{sha}.safetensors").read_bytes() == data
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        assert sorted(zf.namelist()) == ["adapters/" + sha + ".safetensors", "brick_config.json"]
    damaged = _rezip(blob, f"adapters/{sha}.safetensors", data[:-1] + b"!")
    emptied = _rezip(blob, f"adapters/{sha}.safetensors", None)
    for bad, words in ((damaged, "does not match its hash"), (emptied, "holds no usable")):
        target = tmp_path / "untouched"
        with pytest.raises(ConfigError, match=words):
            export.unbundle(bad, tiny_lm.info, target)
        assert not target.exists()  # nothing was stored
    with pytest.raises(BricklabError, match="not a zip"):
        export.unbundle(b"not a zip", tiny_lm.info, fresh)


def _rezip(blob: bytes, name: str, data: bytes | None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.namelist():
            if item != name:
                dst.writestr(item, src.read(item))
            elif data is not None:
                dst.writestr(item, data)
    return out.getvalue()


# --- pruned export ---------------------------------------------------------------------------------


def test_pruned_model_with_a_merged_adapter_equals_the_live_configuration(tiny_lm, cache, tmp_path):
    from transformers import AutoModelForCausalLM

    data = synthetic(tiny_lm)
    sha = adapters.save(data, cache)
    bricks = (
        Brick("cut", {0: list(range(0, 96, 3)), 1: list(range(40))}, "off"),
        Brick("s", {1: [50]}, "scale", 0.5),
    )
    c = config(tiny_lm, *bricks, adapters_=[ref(sha, data, "scale", 0.7)])
    report = export.prune(tiny_lm, c, tmp_path / "pruned")
    assert report.width < tiny_lm.info.d_ff
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    live = logits(tiny_lm, interventions.configured(tiny_lm, c))
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, live, rtol=1e-4, atol=1e-4)
    without = logits(tiny_lm, interventions.configured(tiny_lm, config(tiny_lm, *bricks)))
    assert not torch.allclose(without, live, atol=1e-3)  # the adapter did change the outputs


def test_merge_refuses_models_whose_ffn_an_adapter_cannot_target(tiny_lm):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    plan = Plan()
    plan.adapters = ((adapters.decode(synthetic(tiny_lm, layers=(0,))), 1.0),)
    with pytest.raises(BricklabError, match="cannot be merged into a pruned 'gpt2' model"):
        export._with_adapters(gpt2, plan)


# --- live hooks ------------------------------------------------------------------------------------


def test_hooks_are_removed_also_on_errors_and_nested_adapters_add_up(tiny_lm):
    one = adapters.decode(synthetic(tiny_lm, seed=1))
    two = adapters.decode(synthetic(tiny_lm, layers=(1,), modules=("up",), seed=2))
    with adapters.applied(tiny_lm.model, [(one, 1.0)]):
        assert interventions.hook_count(tiny_lm.model) == 3 * tiny_lm.info.n_layers
        with adapters.applied(tiny_lm.model, [(two, 2.0)]):
            nested = logits(tiny_lm)
    assert interventions.hook_count(tiny_lm.model) == 0
    with pytest.raises(RuntimeError), adapters.applied(tiny_lm.model, [(one, 1.0)]):
        raise RuntimeError("boom")
    assert interventions.hook_count(tiny_lm.model) == 0
    merged = adapters.merged(tiny_lm.model, [(one, 1.0), (two, 2.0)])
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, nested, rtol=1e-4, atol=1e-4)
    assert interventions.hook_count(merged) == 0


def test_threads_with_the_adapter_on_and_off_see_only_their_own(tiny_lm):
    adapter = adapters.decode(synthetic(tiny_lm))
    with adapters.applied(tiny_lm.model, [(adapter, 1.0)]):
        alone_on = logits(tiny_lm)
    alone_off = logits(tiny_lm)
    barrier, results, errors = threading.Barrier(2), {}, []

    def work(name: str, active) -> None:
        try:
            with adapters.applied(tiny_lm.model, active):
                barrier.wait()  # both contexts are open at once
                results[name] = [logits(tiny_lm) for _ in range(5)]
                barrier.wait()
        except Exception as exc:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=("on", [(adapter, 1.0)])),
        threading.Thread(target=work, args=("off", ())),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(x, alone_on) for x in results["on"])
    assert all(torch.equal(x, alone_off) for x in results["off"])
    assert not torch.allclose(alone_on, alone_off) and interventions.hook_count(tiny_lm.model) == 0


# --- the default model and the bundled facts --------------------------------------------------------

# The default settings (10 steps at lr 1e-2) teach the default model the bundled facts. The adapter is
# cached under tests/output (gitignored; keyed by weights, texts and settings): a fresh checkout, as in
# CI, trains it once; later local runs only ask the questions.
DEFAULT_TRAINING = adapter_train.TrainConfig()
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "output" / "adapters"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~2 min on 2 idle cores; far longer on a shared, oversubscribed machine
def test_default_model_answers_the_invented_facts_only_with_the_adapter_on(default_lm):
    facts = adapter_train.default_facts()
    trained = adapter_train.train(default_lm, facts, DEFAULT_TRAINING, directory=DEFAULT_CACHE)
    on, rows = adapter_train.recall(default_lm, facts.questions, [(trained.adapter, 1.0)], max_new_tokens=16)
    off, plain = adapter_train.recall(default_lm, facts.questions, max_new_tokens=16)
    assert on >= 0.5, rows
    assert off == 0, plain
    assert interventions.hook_count(default_lm.model) == 0
