"""Pruned models: plain transformers loads them and their logits equal the masked model's."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from core import configuration, export, models
from core.configuration import Brick, BrickConfig
from core.errors import BricklabError
from core.live.interventions import configured, hook_count

IDS = torch.tensor([[1, 502, 3312, 7, 981, 44, 12000, 5, 77, 310]])


def make(lm, *bricks: Brick) -> BrickConfig:
    info = lm.info
    return BrickConfig(info.model_id, info.fingerprint, info.n_layers, info.d_ff, bricks)


class OneRun:
    """Stands in for core.store.Store: one complete run of `lm` with the given mean activations."""

    def __init__(self, lm, means):
        self.info, self.means = lm.info, means

    def require_run(self, run_id):
        return SimpleNamespace(run_id=run_id, fingerprint=self.info.fingerprint, model_id=self.info.model_id)

    def layer_array(self, run_id, name):
        return self.means


def masked_and_pruned(lm, config, out, store=None):
    with configured(lm, config, store, "r1"), torch.no_grad():
        masked = lm.model(IDS).logits
    report = export.prune(lm, config, out, store, "r1")
    pruned = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no custom code
    with torch.no_grad():
        return masked, pruned(IDS).logits, report, pruned


def test_off_and_scale_prune_equals_mask(tiny_lm, tmp_path):
    config = make(
        tiny_lm,
        Brick("a", {0: list(range(40)), 1: list(range(10, 30))}, "off"),
        Brick("s", {1: [50, 51, 60]}, "scale", 0.3),
    )
    masked, logits, report, pruned = masked_and_pruned(tiny_lm, config, tmp_path / "out")
    torch.testing.assert_close(logits, masked, rtol=1e-4, atol=1e-5)
    d, d_model, n_layers = tiny_lm.info.d_ff, tiny_lm.info.d_model, tiny_lm.info.n_layers
    assert report.kept == (56, 76) and report.width == 76 == pruned.config.intermediate_size
    assert report.params_saved == (d - 76) * 3 * d_model * n_layers
    assert report.bytes_saved == report.params_saved * 4
    assert report.params_per_layer_widths == report.params_before - (40 + 20) * 3 * d_model
    assert hook_count(tiny_lm.model) == 0


def test_keep_prune_equals_mask_and_pads_narrow_layers(tiny_lm, tmp_path):
    config = make(tiny_lm, Brick("k", {0: [3, 7, 11], 1: list(range(20, 45))}, "keep"))
    masked, logits, report, pruned = masked_and_pruned(tiny_lm, config, tmp_path / "out")
    torch.testing.assert_close(logits, masked, rtol=1e-4, atol=1e-5)
    assert report.kept == (3, 25) and report.width == 25
    down0 = pruned.model.layers[0].mlp.down_proj.weight
    assert torch.all(down0[:, 3:] == 0) and torch.all(pruned.model.layers[0].mlp.gate_proj.weight[3:] == 0)


def test_mean_bricks_fold_into_a_down_bias(tiny_lm, tmp_path):
    means = (
        np.random.default_rng(0).normal(0, 0.5, (tiny_lm.info.n_layers, tiny_lm.info.d_ff)).astype(np.float32)
    )
    config = make(tiny_lm, Brick("m", {0: list(range(30)), 1: [5, 6]}, "mean"), Brick("o", {1: [7]}, "off"))
    masked, logits, report, pruned = masked_and_pruned(
        tiny_lm, config, tmp_path / "out", OneRun(tiny_lm, means)
    )
    torch.testing.assert_close(logits, masked, rtol=1e-4, atol=1e-5)
    assert report.folded_means and pruned.config.mlp_bias
    assert pruned.model.layers[0].mlp.down_proj.bias.abs().sum() > 0


def test_output_folder_holds_safetensors_and_the_configuration(tiny_lm, tmp_path):
    config = make(tiny_lm, Brick("a", {0: [1, 2], 1: [3]}, "off"))
    out = tmp_path / "out"
    calls = []
    export.prune(tiny_lm, config, out, progress=lambda *a: calls.append(a))
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert configuration.load(out / "brick_config.json") == config
    assert AutoTokenizer.from_pretrained(out).encode("hi") == tiny_lm.tokenizer.encode("hi")
    assert calls[-1][:2] == (2, 2)


def test_existing_folder_is_not_overwritten(tiny_lm, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(BricklabError, match="not an empty folder"):
        export.prune(tiny_lm, make(tiny_lm, Brick("a", {0: [1]}, "off")), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def _tiny(tmp_path, default_dir, model) -> models.LoadedModel:
    model.save_pretrained(tmp_path / "src")
    AutoTokenizer.from_pretrained(default_dir).save_pretrained(tmp_path / "src")
    return models.load_model(str(tmp_path / "src"), device="cpu")


def test_gpt2_conv1d_with_biases_prunes_and_folds(tmp_path, default_dir):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    lm = _tiny(tmp_path, default_dir, gpt2)
    d = lm.info.d_ff
    means = np.random.default_rng(1).normal(0, 0.5, (2, d)).astype(np.float32)
    config = make(
        lm, Brick("o", {0: list(range(100)), 1: list(range(50))}, "off"), Brick("m", {1: [60]}, "mean")
    )
    masked, logits, report, pruned = masked_and_pruned(lm, config, tmp_path / "out", OneRun(lm, means))
    torch.testing.assert_close(logits, masked, rtol=1e-4, atol=1e-5)
    assert report.width == d - 51 == pruned.config.n_inner


def test_mean_is_refused_where_the_down_projection_has_no_bias(tmp_path, default_dir):
    config = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    lm = _tiny(tmp_path, default_dir, Qwen2ForCausalLM(config))
    means = np.ones((2, 96), np.float32)
    with pytest.raises(BricklabError, match="no bias"):
        export.prune(lm, make(lm, Brick("m", {0: [1]}, "mean")), tmp_path / "out", OneRun(lm, means), "r1")
    assert not (tmp_path / "out").exists()
