"""The architectures bricklab is tested on: a tiny configuration of each family, and the table of what
each supports (the README's, generated here by `python -m core architectures --markdown`).

Every row is found by building the family's tiny model on the meta device (no memory, no weights) and
asking core.models and core.export what they make of it, so the table cannot drift from the code.
tests/test_architectures.py builds each with random weights and runs capture, bricks, apply and prune.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

VOCAB = 320  # enough for the tests' small byte-level tokenizer
# hidden 64, 2 layers, FFN 128: the sizes of issue #17's survey; ids 0-2 are pad, bos, eos
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip
_GPT = dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128)
_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# model_type -> what its tiny configuration changes in COMMON (None drops a key the config rejects)
DENSE: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "ministral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "vaultgemma": {},
    "phi3": {},
    "phi": {},
    "olmo": {},
    "olmo2": {},
    "olmo3": {},
    "granite": {},
    "stablelm": {},
    "cohere": {},
    "cohere2": {},
    "starcoder2": {},
    "glm": {},
    "glm4": {},
    "helium": {},
    "smollm3": {},
    "exaone4": {},
    "ernie4_5": {},
    "seed_oss": {},
    "internlm3": {},
    "hunyuan_v1_dense": {},
    "diffllama": {},
    "apertus": {},
    "arcee": {},
    "nemotron": {},
    "jais2": {},
    "persimmon": {},
    "bitnet": {},
    "gpt2": _GPT,
    "gpt_bigcode": _GPT,
    "gptj": {**_GPT, "rotary_dim": 4, "head_dim": None},
    "codegen": {**_GPT, "rotary_dim": 4, "head_dim": None},
    "openai-gpt": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "gpt_neox": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "biogpt": {},
    "xglm": {"ffn_dim": 128},
    "falcon": {"ffn_hidden_size": 128, "head_dim": None},
    "bloom": {"n_layer": 2, "n_head": 4},
    "mpt": {"d_model": 64, "n_layers": 2, "n_heads": 4, "expansion_ratio": 2},
}
# mixture-of-experts families: core/experts.py runs those in its MOE_TYPES; the rest are refused
MOE: dict[str, dict] = {
    "mixtral": _MOE,
    "qwen2_moe": {**_MOE, "shared_expert_intermediate_size": 64},
    "qwen3_moe": _MOE,
    "olmoe": _MOE,
    "granitemoe": _MOE,
    "phimoe": _MOE,
    "flex_olmo": _MOE,
    "minimax": _MOE,
    "hunyuan_v1_moe": _MOE,
    "ernie4_5_moe": {**_MOE, "moe_layer_start_index": 0},
    "deepseek_v3": {**_MOE, "n_routed_experts": 4, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1},
    "gpt_oss": _MOE,
}


def supported() -> tuple[list[str], list[str]]:
    """(dense families, mixture-of-experts families that run) as the error messages name them."""
    from core import experts

    return sorted(DENSE), list(experts.MOE_TYPES)


def tiny_config(model_type: str):
    """The family's tiny configuration (hidden 64, 2 layers, FFN 128 or its fixed multiple)."""
    from transformers import AutoConfig

    changes = DENSE[model_type] if model_type in DENSE else MOE[model_type]
    kwargs = {key: value for key, value in (COMMON | changes).items() if value is not None}
    return AutoConfig.for_model(model_type, **kwargs)


@dataclass(frozen=True)
class Row:
    model_type: str
    ffn: str  # what kind of FFN: gated, gated (fused gate/up), plain, plain (Conv1D), mixture of experts
    down: str  # the module whose input is the activation, inside a decoder block
    runs: str  # capture, bricks and apply: "yes", "experts as bricks" or "no: why"
    prune: str  # "yes", "same width, neurons zeroed", or "no: why"


def row(model_type: str) -> Row:
    import torch
    from transformers import AutoModelForCausalLM

    from core import models
    from core.errors import BricklabError

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    try:
        site = models.site(model)
    except BricklabError as exc:
        return Row(model_type, "mixture of experts", "", f"no: {_reason(exc.message)}", "no")
    if site.experts:
        return Row(model_type, "mixture of experts", site.down, "experts as bricks", _prune(model))
    ffn = "gated" if site.gate else ("gated (fused gate/up)" if site.fused_gate_up else "plain")
    if site.conv1d:
        ffn += " (Conv1D)"
    return Row(model_type, ffn, site.down, "yes", _prune(model))


def _prune(model) -> str:
    from core import export

    if (why := export.refusal(model)) is not None:
        return f"no: {why}"
    return "yes" if export.width_key(model) else "same width, neurons zeroed (no FFN width setting)"


def _reason(message: str) -> str:
    return message.partition(": ")[2].rstrip(".") or message


@functools.cache
def rows() -> tuple[Row, ...]:
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the tiny configs' warnings (odd RoPE factors, ...) are not the user's
    try:
        return tuple(row(name) for name in [*DENSE, *MOE])
    finally:
        logging.set_verbosity(verbosity)


def markdown() -> str:
    """The README's table: one line per family, dense ones first."""
    lines = [
        "| architecture (`model_type`) | FFN | activation read at | capture, bricks, apply | prune |",
        "|---|---|---|---|---|",
    ]
    for r in rows():
        down = f"`{r.down}`" if r.down else ""
        lines.append(f"| {r.model_type} | {r.ffn} | {down} | {r.runs} | {r.prune} |")
    return "\n".join(lines) + "\n"
