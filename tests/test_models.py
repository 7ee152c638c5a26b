"""The architecture table on tiny random-weight models of every entry, the fingerprint, and load errors."""

import functools
import json
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from core import models
from core.errors import BricklabError
from core.live import interventions

D_MODEL, D_FF, N_LAYERS, VOCAB = 32, 48, 2, 128
_LLAMA_SHAPE = dict(
    vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FF, num_hidden_layers=N_LAYERS,
    num_attention_heads=4, max_position_embeddings=64,
)  # fmt: skip
_GPT_SHAPE = dict(vocab_size=VOCAB, n_embd=D_MODEL, n_inner=D_FF, n_layer=N_LAYERS, n_head=4, n_positions=64)

# model_type -> (config class, tiny sizes); every entry of models.ARCHITECTURES must be here
TINY_CONFIGS = {
    "llama": ("LlamaConfig", {**_LLAMA_SHAPE, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {**_LLAMA_SHAPE, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {**_LLAMA_SHAPE, "num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {**_LLAMA_SHAPE, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma": ("GemmaConfig", {**_LLAMA_SHAPE, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma2": ("Gemma2Config", {**_LLAMA_SHAPE, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", {**_LLAMA_SHAPE, "num_key_value_heads": 2, "head_dim": 8}),
    "olmo": ("OlmoConfig", _LLAMA_SHAPE),
    "olmo2": ("Olmo2Config", _LLAMA_SHAPE),
    "granite": ("GraniteConfig", _LLAMA_SHAPE),
    "phi3": ("Phi3Config", {**_LLAMA_SHAPE, "pad_token_id": 0}),
    "phi": ("PhiConfig", _LLAMA_SHAPE),
    "gpt2": ("GPT2Config", _GPT_SHAPE),
    "gpt_neox": ("GPTNeoXConfig", _LLAMA_SHAPE),
    "gptj": ("GPTJConfig", {**_GPT_SHAPE, "rotary_dim": 4}),
    "opt": ("OPTConfig", {**_LLAMA_SHAPE, "ffn_dim": D_FF, "word_embed_proj_dim": D_MODEL}),
    "falcon": ("FalconConfig", {**_LLAMA_SHAPE, "ffn_hidden_size": D_FF}),
}


@functools.cache
def tiny_model(model_type: str) -> torch.nn.Module:
    """Built once per session; tests only read it (transforms leave no hooks behind)."""
    cls, sizes = TINY_CONFIGS[model_type]
    config = getattr(transformers, cls)(**sizes)
    assert config.model_type == model_type
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def out_features(module: torch.nn.Module, model_type: str) -> int:
    weight = module.weight
    return weight.shape[1] if models.site_for(model_type).conv1d else weight.shape[0]


def test_every_table_entry_has_a_tiny_model():
    assert set(TINY_CONFIGS) == set(models.ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(models.ARCHITECTURES))
def test_describe_and_down_weight(model_type):
    model = tiny_model(model_type)
    info = models.describe(model, "tiny")
    assert (info.model_type, info.n_layers, info.d_ff, info.d_model) == (model_type, N_LAYERS, D_FF, D_MODEL)
    assert info.n_neurons == N_LAYERS * D_FF
    site = models.site_for(model_type)
    for layer in range(N_LAYERS):
        assert tuple(models.down_weight(model, layer).shape) == (D_MODEL, D_FF)
        norms = models.down_column_norms(model, layer)
        assert norms.shape == (D_FF,) and bool((norms > 0).all())
        block = models.blocks(model)[layer]
        up = models._attr(block, site.up)
        assert out_features(up, model_type) == D_FF * (2 if site.fused_gate_up else 1)
        if site.gate:
            assert out_features(models._attr(block, site.gate), model_type) == D_FF


def _recording_pass(model, ids, layer):
    """Run the model, recording the down projection's input (after any transform) and output."""
    seen = {}

    def record(module, args, output):
        seen["a"], seen["out"] = args[0].detach().clone(), output.detach().clone()

    handle = models.down_proj(model, layer).register_forward_hook(record)
    try:
        logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return seen["a"], seen["out"], logits


@pytest.mark.parametrize("model_type", sorted(models.ARCHITECTURES))
def test_down_proj_input_is_the_ffn_activation(model_type):
    model, ids, layer, neuron = tiny_model(model_type), torch.randint(0, VOCAB, (2, 5)), 0, 7
    with torch.no_grad():
        a, out, logits = _recording_pass(model, ids, layer)
        assert a.shape[-1] == D_FF and a.numel() == 2 * 5 * D_FF  # (B, T, d_ff), OPT flattens to (B*T, d_ff)

        def zero_one(x):
            x = x.clone()
            x[..., neuron] = 0
            return x

        with interventions.transforms(model, {layer: zero_one}):
            a_zeroed, out_zeroed, logits_zeroed = _recording_pass(model, ids, layer)
    assert interventions.hook_count(model) == 0
    assert bool((a_zeroed[..., neuron] == 0).all()) and bool(a[..., neuron].abs().gt(0).any())
    others = [i for i in range(D_FF) if i != neuron]
    torch.testing.assert_close(a_zeroed[..., others], a[..., others])
    # the projection is linear: removing neuron i removes exactly a_i * W_down[:, i] from its output
    column = models.down_weight(model, layer)[:, neuron]
    torch.testing.assert_close(out - out_zeroed, a[..., neuron : neuron + 1] * column, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits, logits_zeroed)


def _llama(**changes):
    cls, sizes = TINY_CONFIGS["llama"]
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(getattr(transformers, cls)(**{**sizes, **changes}))


def test_fingerprint_sees_one_changed_weight_and_the_config():
    model = _llama()
    before = models.fingerprint(model)
    assert models.fingerprint(model) == before
    with torch.no_grad():
        models.down_proj(model, 1).weight[5, 17] += 1e-3
    assert models.fingerprint(model) != before
    assert models.fingerprint(_llama(rms_norm_eps=1e-5)) != models.fingerprint(_llama(rms_norm_eps=1e-6))


def test_fingerprint_is_stable_across_save_and_load(tiny_dir, tiny_lm, tmp_path):
    again = models.load_model(tiny_dir, device="cpu")
    assert again.info.fingerprint == tiny_lm.info.fingerprint == models.fingerprint(tiny_lm.model)
    again.model.save_pretrained(tmp_path, safe_serialization=True)
    again.tokenizer.save_pretrained(tmp_path)
    assert models.load_model(str(tmp_path), device="cpu").info.fingerprint == tiny_lm.info.fingerprint


def test_the_model_check_names_what_differs_both_values_and_the_fix():
    info = models.ModelInfo("tiny", "llama", "f1", 2, 96, 64, "cpu")
    run = {"model_id": "other", "fingerprint": "f2", "n_layers": 2, "d_ff": 96}
    with pytest.raises(BricklabError) as err:
        models.check_match(run, info, "Run r1", "Load the other model.")
    assert str(err.value) == (
        'Run r1 was made with another model ("other"): its fingerprint is "f2", '
        'but the model "tiny" has "f1". Load the other model.'
    )
    router = SimpleNamespace(fingerprint="f1", shape=(2, 48))  # no model id: none is named
    assert models.mismatch(router, info, "The router") == (
        "d_ff",
        'The router was made with another model: its d_ff is 48, but the model "tiny" has 96',
    )
    assert models.mismatch({"fingerprint": "f1"}, info, "adapter") is None  # no shape recorded: not compared
    assert models.mismatch({"model_id": "tiny"}, info, "adapter")[0] == "fingerprint"  # none recorded
    models.check_match(run | {"fingerprint": "f1"}, info, "Run r1", "")


def test_unsupported_architecture_names_the_supported_ones_and_why(tmp_path):
    with pytest.raises(BricklabError) as err:
        models.site_for("mamba")  # never loaded: neither in the table nor found
    assert "'mamba' is not supported." in str(err.value)
    assert all(name in str(err.value) for name in [*models.ARCHITECTURES, "stablelm", "bloom", "mixtral"])
    transformers.MambaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(
        BricklabError, match=r"'mamba' is not supported: its layers \(MambaBlock\) hold no FFN"
    ):
        models.load_model(str(tmp_path), device="cpu")


def test_discovery_finds_a_family_outside_the_table_and_remembers_it():
    config = transformers.StableLmConfig(**{**_LLAMA_SHAPE, "num_key_value_heads": 2})
    assert config.model_type not in models.ARCHITECTURES
    model = transformers.AutoModelForCausalLM.from_config(config)
    site = models.site(model)
    assert site == models.FfnSite("model.layers", "mlp.down_proj", "mlp.up_proj", gate="mlp.gate_proj")
    assert models.site_for("stablelm") == site and models.describe(model, "x").d_ff == D_FF


def test_discovery_refuses_what_it_cannot_tell_apart():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA_SHAPE))
    for block in model.model.layers:  # two d_model -> d_ff projections, neither named as a gate
        block.mlp.add_module("first", block.mlp.gate_proj)
        del block.mlp.gate_proj
    with pytest.raises(BricklabError, match="no up projection bricklab can tell apart"):
        models.discover(model)
    del model.model.layers[1].mlp  # and layers that differ
    with pytest.raises(BricklabError, match="not supported: its"):
        models.discover(model)


def test_a_mixture_of_experts_outside_core_experts_is_refused_as_such():
    config = transformers.GptOssConfig(**{**_LLAMA_SHAPE, "num_key_value_heads": 2, "num_local_experts": 4})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(BricklabError, match="'gpt_oss' is not supported: it is a mixture-of-experts") as err:
        models.discover(model)
    assert "mixtral" in err.value.hint


def test_missing_folder(tmp_path):
    with pytest.raises(BricklabError, match="does not exist"):
        models.load_model(str(tmp_path / "nowhere"), device="cpu")


def test_a_missing_relative_folder_fails_at_once_offline(tmp_path, monkeypatch):
    """`mymodels/llama` looks like a hub id; with the hub switched off it fails before any retry."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(BricklabError, match="'mymodels/llama' is neither a local folder nor") as err:
        models.load_model("mymodels/llama", device="cpu")
    assert "HF_HUB_OFFLINE is set" in err.value.message and "Check the path" in err.value.hint
    assert time.perf_counter() - started < 5
    (tmp_path / "mymodels").mkdir()  # its first part is a folder here: a path, never a hub id
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(BricklabError, match="The model folder 'mymodels/llama' does not exist"):
        models.load_model("mymodels/llama", device="cpu")


def test_a_hub_id_that_is_not_cached_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "offline", lambda: False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(BricklabError, match="the Hugging Face hub cannot be reached"):
        models.load_model("someone/not-cached-anywhere", device="cpu")


def test_a_file_is_refused_as_a_file_with_what_to_pass(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(BricklabError) as err:
        models.load_model(str(tmp_path / "weights.gguf"), device="cpu")
    assert err.value.message == f"'{tmp_path / 'weights.gguf'}' is a file, not a model folder."
    assert "config.json" in err.value.hint and "hub id" in err.value.hint
    (tmp_path / "config.json").write_text("{}")  # now a file inside a model folder: name the folder
    with pytest.raises(BricklabError) as err:
        models.load_model(str(tmp_path / "config.json"), device="cpu")
    assert err.value.hint == f"Pass its folder, '{tmp_path}'."


def test_a_folder_with_only_config_names_the_missing_tokenizer_in_whole_sentences(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_bytes((Path(tiny_dir) / "config.json").read_bytes())
    with pytest.raises(BricklabError) as err:
        models.load_model(str(tmp_path), device="cpu")
    message = err.value.message
    assert "no tokenizer files and no .safetensors weights" in message and "tokenizer.json" in message
    assert message.endswith(".") and ":" not in message and "Copy the missing files" in err.value.hint
    (tmp_path / "model.safetensors").write_bytes(b"")  # weights present: only the tokenizer is missing
    with pytest.raises(BricklabError, match="no tokenizer files; a tokenizer needs one of"):
        models.load_model(str(tmp_path), device="cpu")


def test_a_library_message_is_summed_up_in_whole_sentences():
    listing = (
        "Couldn't instantiate the backend tokenizer from one of: \n(1) a `tokenizers` library "
        "serialization file, \n(2) a slow tokenizer instance to convert or \n(3) an equivalent slow "
        "tokenizer class to instantiate and convert. \nYou need to have sentencepiece or tiktoken "
        "installed to convert a slow tokenizer to a fast one."
    )
    assert models._summary(listing).endswith(
        "(3) an equivalent slow tokenizer class to instantiate and convert."
    )
    assert models._summary("Bad header:") == "Bad header."
    assert models._summary("x " * 200).endswith("x ...") and len(models._summary("x " * 200)) <= 244


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(BricklabError, match="no config.json"):
        models.load_model(str(tmp_path), device="cpu")


def test_remote_code_config_is_refused(tmp_path):
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x_custom", "auto_map": auto_map}))
    with pytest.raises(BricklabError, match="custom code") as err:
        models.load_model(str(tmp_path), device="cpu")
    assert "remote code" in err.value.hint


def test_unknown_model_type_is_unsupported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(BricklabError, match="'frobnicator' is not supported.*llama"):
        models.load_model(str(tmp_path), device="cpu")


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_weights_are_never_loaded(tiny_dir, tmp_path):
    folder, marker = tmp_path / "model", tmp_path / "unpickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((Path(tiny_dir) / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(BricklabError, match="safetensors"):
        models.load_model(str(folder), device="cpu")
    assert not marker.exists()
