"""Every row of the README's architecture table, end to end on a tiny random model of its family
(core.architectures): load from a saved folder, capture, bricks, apply, prune (or the documented
refusal); and the README's table equals the generated one."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import core
from core import architectures, experts, models
from core.errors import BricklabError
from core.live.interventions import configured, hook_count

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "def add(a, b): return a + b",
    "The capital of France is Paris.",
    "Solve 12 * 7 = 84 and 9 + 10 = 19.",
    "Translate 'good morning' into German: Guten Morgen.",
    "Once upon a time a small robot wrote a poem.",
    "Water boils at 100 degrees Celsius at sea level.",
]
IDS = torch.tensor([[1, 40, 41, 70, 101, 33, 200, 260, 75, 9]])
RUNS = [name for name in architectures.MOE if name in experts.MOE_TYPES]
REFUSED = [name for name in architectures.MOE if name not in experts.MOE_TYPES]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer of VOCAB - 16 entries trained on TEXTS: every family shares it."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 4, vocab_size=architectures.VOCAB - 16, show_progress=False,
                            special_tokens=["<pad>", "<s>", "</s>"])  # fmt: skip
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    store = core.Store(tmp_path_factory.mktemp("arch") / "cache.duckdb")
    yield store
    store.close()


def saved(model_type: str, tokenizer_dir: Path, tmp_path: Path) -> str:
    """The family's tiny model with random weights, saved as a user would pass it (`--model FOLDER`)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(architectures.tiny_config(model_type))
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


def bricks_config(lm, store):
    """Capture TEXTS, partition the neurons into co-activation bricks, and switch off the first brick
    of each layer and scale the second of layer 0."""
    run = core.capture_run(lm, TEXTS, store, top_k=3, max_tokens=32, chunk_prompts=8)
    bricks = core.compute_bricks(store, run, size=32, stability=False)
    first = {}
    for brick in bricks:
        first.setdefault(brick.layers[0], []).append(brick)
    chosen = {group[0]: "off" for group in first.values()} | {first[0][1]: ("scale", 0.5)}
    return run, core.config_from_bricks(run, chosen)


@pytest.mark.parametrize("model_type", list(architectures.DENSE))
def test_dense_family_captures_bricks_applies_and_prunes(model_type, tokenizer_dir, shared_store, tmp_path):
    lm = models.load_model(saved(model_type, tokenizer_dir, tmp_path), device="cpu")
    assert (lm.info.model_type, lm.info.n_layers, lm.info.d_model) == (model_type, 2, 64)
    assert lm.info.d_ff % 128 == 0  # 128, or a fixed multiple of the width (bloom, gpt2 defaults: 4x)
    run, config = bricks_config(lm, shared_store)
    assert run.complete and len(config.bricks) == 3
    result = core.compare(lm, "The capital of", config, max_new_tokens=3, chat_template=False)
    assert result.active_share < 1 and hook_count(lm.model) == 0
    with configured(lm, config), torch.no_grad():
        masked = lm.model(IDS).logits
    with torch.no_grad():
        assert not torch.allclose(masked, lm.model(IDS).logits)  # the bricks change the output
    row = architectures.row(model_type)
    if row.prune.startswith("no"):
        with pytest.raises(BricklabError, match="cannot be pruned"):
            core.prune(lm, config, tmp_path / "pruned")
        return
    report = core.prune(lm, config, tmp_path / "pruned")
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, masked, rtol=1e-4, atol=1e-5)
    narrower = lm.info.d_ff - 32  # each layer loses one brick of 32
    assert report.width == (narrower if row.prune == "yes" else lm.info.d_ff)
    assert report.kept == (narrower, narrower) and hook_count(lm.model) == 0


@pytest.mark.parametrize("model_type", RUNS)
def test_moe_family_runs_its_experts_and_refuses_to_prune(model_type, tokenizer_dir, shared_store, tmp_path):
    lm = models.load_model(saved(model_type, tokenizer_dir, tmp_path), device="cpu")
    assert models.site(lm.model).experts
    _, config = bricks_config(lm, shared_store)
    with configured(lm, config), torch.no_grad():
        masked = lm.model(IDS).logits
    with torch.no_grad():
        assert not torch.allclose(masked, lm.model(IDS).logits)
    assert hook_count(lm.model) == 0 and experts.leftovers(lm.model) == 0
    with pytest.raises(BricklabError, match="cannot be pruned: its neurons sit inside fused"):
        core.prune(lm, config, tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("model_type", REFUSED)
def test_other_moe_families_are_refused_before_their_weights_load(model_type, tokenizer_dir, tmp_path):
    with pytest.raises(BricklabError, match=f"'{model_type}' is not supported: it is a mixture-of-experts"):
        models.load_model(saved(model_type, tokenizer_dir, tmp_path), device="cpu")


def test_the_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- architectures: begin.*?-->\n(.*?)<!-- architectures: end -->", readme, re.S)
    assert found, "README.md lacks the architecture table markers"
    assert found.group(1) == architectures.markdown(), "run: python -m core architectures --markdown"


def test_discovery_agrees_with_the_table():
    """The hand-written table only names what discovery would find anyway on these families."""
    for model_type, site in models.ARCHITECTURES.items():
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(architectures.tiny_config(model_type))
        assert models.discover(model) == site, model_type


def test_fixed_width_families_are_named_by_the_prune_column():
    fixed = [r.model_type for r in architectures.rows() if r.prune.startswith("same width")]
    assert "bloom" in fixed and "llama" not in fixed
    assert np.all([r.runs == "yes" for r in architectures.rows() if r.model_type in architectures.DENSE])


def test_the_command_prints_the_table(capsys):
    from core.cli import main

    assert main(["architectures", "--markdown"]) == 0
    assert capsys.readouterr().out == architectures.markdown()
    assert main(["architectures"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "same width" in lines["bloom"] and "prune: yes" in lines["llama"] and "runs" in lines["llama"]
    assert "no: it is a mixture-of-experts" in lines["gpt_oss"]
