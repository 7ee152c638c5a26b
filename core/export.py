"""A brick configuration made permanent: a smaller Hugging Face model with the disabled FFN neurons
physically removed from gate/up/down (scales folded into W_down, run means into its bias), and
bundles of a configuration with its adapter files."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core import configuration, models
from core.configuration import BrickConfig, ConfigError
from core.errors import BricklabError
from core.live import adapters, interventions
from core.models import FfnSite, LoadedModel
from core.progress import Progress

# Plain transformers gives every layer one FFN width (Llama's intermediate_size is an int; of the
# built-in models only gemma3n takes a per-layer list), so a layer keeping fewer neurons than the
# widest one is padded with zero neurons (zero gate/up rows, zero W_down columns): they add exactly
# nothing, and AutoModelForCausalLM loads the folder with no custom code.
# Config attributes that may hold the FFN width; `width_key` keeps the one that sets the model's d_ff.
# Where none does (bloom's MLP is 4 x hidden_size, fixed), the model keeps its width and the removed
# neurons are zeroed in place: the same logits, in a folder plain transformers loads, but no smaller.
WIDTH_NAMES = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "inner_hidden_size")


@dataclass(frozen=True)
class PruneReport:
    out_dir: str
    d_ff: int  # FFN width before
    width: int  # FFN width stored per layer: the most neurons any layer keeps
    kept: tuple[int, ...]  # neurons kept per layer (the rest of `width` is zero padding)
    params_before: int  # unique parameters of the loaded model
    params_after: int  # unique parameters of the written model
    params_per_layer_widths: int  # what it would hold if each layer could have its own width
    bytes_before: int  # weight bytes before, same dtype
    bytes_after: int  # weight bytes written
    file_bytes: int  # size of the .safetensors file(s) on disk
    folded_means: bool  # `mean` bricks became a W_down bias
    fixed_width: bool = False  # the architecture has no FFN width setting: removed neurons are zeroed

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict:
        return asdict(self) | {"params_saved": self.params_saved, "bytes_saved": self.bytes_saved}


def prune(
    lm: LoadedModel,
    config: BrickConfig,
    out_dir: str | Path,
    store=None,
    run_id: str | None = None,
    progress: Progress | None = None,
) -> PruneReport:
    """Write the pruned model, its tokenizer and the configuration (brick_config.json) to out_dir."""
    if (why := refusal(lm.model)) is not None:
        raise BricklabError(
            f"A '{lm.info.model_type}' model cannot be pruned: {why}.",
            "Apply the configuration live instead, or take the configuration JSON into code.",
        )
    plan = interventions.plan_for(lm, config, store, run_id)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BricklabError(f"'{out}' already exists and is not an empty folder.", "Choose a new folder.")
    info = lm.info
    kept = [_kept(plan.get(layer), info.d_ff) for layer in range(info.n_layers)]
    key = width_key(lm.model)
    pruned = _pruned_model(_with_adapters(lm.model, plan), plan, kept, key, progress)
    staging = _write(pruned, lm.tokenizer, config, out)
    (before, bytes_before), (after, bytes_after) = _sizes(lm.model), _sizes(pruned)
    site = models.site(lm.model)
    removed = sum(info.d_ff - len(k) for k in kept) * _params_per_neuron(lm.model, site, info.d_ff)
    report = PruneReport(
        out_dir=str(out),
        d_ff=info.d_ff,
        width=int(models.down_weight(pruned, 0).shape[1]),
        kept=tuple(len(k) for k in kept),
        params_before=before,
        params_after=after,
        params_per_layer_widths=before - removed,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        file_bytes=sum(f.stat().st_size for f in staging.glob("*.safetensors")),
        folded_means=any(bool(np.any(lp.add)) for lp in plan.values()),
        fixed_width=key is None,
    )
    detail = report.to_dict() | {"kept_neurons": {str(i): k.tolist() for i, k in enumerate(kept)}}
    detail["merged_adapters"] = [adapter.sha256 for adapter, _ in getattr(plan, "adapters", ())]
    (staging / "bricklab_prune.json").write_text(json.dumps(detail) + "\n")
    if out.exists():
        out.rmdir()  # empty, checked above
    staging.rename(out)  # an interrupted export never leaves a half folder under the real name
    return report


def _pruned_model(model, plan: dict, kept: list[np.ndarray], key, progress) -> torch.nn.Module:
    """A new model of the same architecture whose FFNs hold only the kept neurons (zero-padded); `key`
    is its FFN width setting (None: the width stays, removed neurons are zeroed)."""
    site = models.site(model)
    width = max(1, max(len(k) for k in kept)) if key else models.down_weight(model, 0).shape[1]
    fold_means = any(bool(np.any(lp.add)) for lp in plan.values())
    new_config = copy.deepcopy(model.config)
    if key:
        setattr(new_config.get_text_config(), key, width)
    if fold_means and models.down_proj(model, 0).bias is None:
        _enable_mlp_bias(new_config)
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    for layer, neurons in enumerate(kept):
        state |= _layer_state(model, site, layer, plan.get(layer), neurons, width, fold_means)
        if progress:
            progress(layer + 1, len(kept), "pruning")
    pruned = _build(new_config, state)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned


def _with_adapters(model, plan):
    """The model to prune: `model` itself, or a copy with the switched-on adapters merged into its
    weights (dropping a removed neuron's gate/up rows and W_down column afterwards drops its LoRA
    rows and columns with it)."""
    active = getattr(plan, "adapters", ())
    if not active:
        return model
    try:
        return adapters.merged(model, active)
    except BricklabError as exc:
        raise BricklabError(
            f"The adapter bricks cannot be merged into a pruned '{model.config.model_type}' model: {exc}",
            "Switch the adapters off for the pruned model, or apply them live instead.",
        ) from exc


def width_key(model) -> str | None:
    """The config attribute that sets the FFN width, found by building the model on the meta device
    with it changed (no memory, no weights); None where no attribute does."""
    from transformers import AutoModelForCausalLM

    config, d_ff = model.config.get_text_config(), models.down_weight(model, 0).shape[1]
    for key in (name for name in WIDTH_NAMES if hasattr(config, name)):
        changed = copy.deepcopy(model.config)
        setattr(changed.get_text_config(), key, d_ff - 1)
        try:
            with torch.device("meta"):
                narrow = AutoModelForCausalLM.from_config(changed)
        except Exception:  # this value is not one the architecture takes for that attribute
            continue
        widths = {models.down_weight(narrow, layer).shape[1] for layer in range(len(models.blocks(narrow)))}
        if widths == {d_ff - 1}:
            return key
    return None


def refusal(model) -> str | None:
    """Why `model` cannot be pruned, or None: a mixture of experts, or an FFN whose other parameters
    span the neurons (a norm over them, as in BitNet), so that removing some changes the rest."""
    found = models.site(model)
    if found.experts:
        return "its neurons sit inside fused mixture-of-experts weights, which transformers cannot narrow"
    d_ff, block = models.down_weight(model, 0).shape[1], models.blocks(model)[0]
    ffn = found.down.rpartition(".")[0]
    container = block.get_submodule(ffn) if ffn else block
    own = {name.rpartition(".")[2] for name in (found.gate, found.up, found.down) if name}
    for name, child in container.named_children():
        if name in own or any(True for _ in child.children()):
            continue
        if any(d_ff in p.shape for p in child.parameters(recurse=False)):
            return f"its FFN's '{name}' acts on all {d_ff} neurons at once: removing some changes the others"
    return None


def _enable_mlp_bias(config) -> None:
    if not hasattr(config, "mlp_bias"):
        raise BricklabError(
            f"'mean' bricks cannot be pruned from a '{config.model_type}' model: its down projection has "
            "no bias to hold the constant they contribute.",
            "Switch those bricks to 'off' for the pruned model, or apply them live instead.",
        )
    config.mlp_bias = True  # Llama-style: biases on gate/up (zero here) and down (the folded means)


def _kept(lp, d_ff: int) -> np.ndarray:
    """Neurons whose activation still matters: all but those scaled by zero."""
    return np.arange(d_ff) if lp is None else np.flatnonzero(lp.scale != 0)


def _prefix(site: FfnSite, layer: int) -> str:
    return f"{site.layers}.{layer}."


def _params_per_neuron(model, site: FfnSite, d_ff: int) -> int:
    """Weights one neuron owns in a layer: its gate and up rows and its W_down column."""
    names = [p for p in (site.gate, site.up, site.down) if p]
    return sum(model.get_submodule(_prefix(site, 0) + p).weight.numel() for p in names) // d_ff


def _layer_state(model, site, layer, lp, kept, width, fold_means) -> dict[str, torch.Tensor]:
    """The layer's gate/up/down tensors cut to `kept` neurons and zero-padded to `width`."""
    prefix, d_ff = _prefix(site, layer), models.down_weight(model, layer).shape[1]
    idx = torch.from_numpy(kept)
    out = {}
    for name in (site.gate, site.up):
        if name is None:
            continue
        module = model.get_submodule(prefix + name)
        weight = module.weight.detach().cpu()
        rows = torch.cat([idx, idx + d_ff]) if site.fused_gate_up else idx
        axis = 1 if site.conv1d else 0  # Conv1D stores (in, out)
        parts = (2, width) if site.fused_gate_up else (1, width)
        out[f"{prefix}{name}.weight"] = _pad(weight.index_select(axis, rows), axis, *parts)
        if module.bias is not None:
            out[f"{prefix}{name}.bias"] = _pad(module.bias.detach().cpu().index_select(0, rows), 0, *parts)
        elif fold_means:
            out[f"{prefix}{name}.bias"] = torch.zeros(parts[0] * width, dtype=weight.dtype)
    return out | _down_state(model, site, layer, lp, idx, width, fold_means)


def _down_state(model, site, layer, lp, idx, width, fold_means) -> dict[str, torch.Tensor]:
    """W_down columns of kept neurons times their scale; W_down @ add joins the bias."""
    prefix, down = _prefix(site, layer), models.down_proj(model, layer)
    w = models.down_weight(model, layer).detach().cpu()  # (d_model, d_ff)
    w32 = w.float()
    bias = torch.zeros(w.shape[0]) if down.bias is None else down.bias.detach().cpu().float()
    if lp is not None:
        scale, add = torch.from_numpy(np.array(lp.scale)), torch.from_numpy(np.array(lp.add))
        bias = bias + w32 @ add
        w32 = w32 * scale
    cut = _pad(w32.index_select(1, idx), 1, 1, width).to(w.dtype)  # (d_model, width)
    out = {f"{prefix}{site.down}.weight": cut.T.contiguous() if site.conv1d else cut}
    if down.bias is not None or fold_means:
        out[f"{prefix}{site.down}.bias"] = bias.to(w.dtype)
    return out


def _pad(t: torch.Tensor, axis: int, parts: int, width: int) -> torch.Tensor:
    """Zero-pad each of `parts` equal blocks along `axis` to `width` (fused gate/up has two)."""
    blocks = t.chunk(parts, dim=axis) if parts > 1 else (t,)
    padded = []
    for block in blocks:
        shape = list(block.shape)
        shape[axis] = width - block.shape[axis]
        padded += [block, torch.zeros(shape, dtype=block.dtype)]
    return torch.cat(padded, dim=axis).contiguous()


def _build(config, state) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no random init: every weight comes from `state`
        model = AutoModelForCausalLM.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise BricklabError(
            f"Could not build the pruned '{config.model_type}' model: {str(exc).splitlines()[0]}",
            "This architecture does not take a plain FFN width change; apply the configuration live instead.",
        ) from exc
    model.tie_weights()
    return model


def _write(model, tokenizer, config: BrickConfig, out: Path) -> Path:
    """Everything into a staging folder beside `out`; the caller renames it when complete."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "brick_config.json").write_text(config.to_json())
    return staging


def _sizes(model) -> tuple[int, int]:
    """(unique parameters, their bytes); tied weights count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


# --- bundles: configuration + adapter files -----------------------------------------------------

BUNDLE_CONFIG = "brick_config.json"
MAX_ADAPTER_BYTES = 2**31  # per file inside a bundle; a rank-8 adapter of the default model is ~6 MB


def bundle(config: BrickConfig, directory=None) -> bytes:
    """One zip holding brick_config.json and adapters/<sha256>.safetensors for each adapter it names."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(BUNDLE_CONFIG, config.to_json())
        for i, ref in enumerate(config.adapters):
            data = adapters.read(ref.sha256, directory, f"adapters[{i}].sha256")
            zf.writestr(f"adapters/{ref.sha256}.safetensors", data)
    return buffer.getvalue()


def unbundle(data: bytes, model=None, directory=None) -> BrickConfig:
    """Check a bundle whole (configuration, every adapter file and its hash), then store its adapters
    in the cache and return the configuration; on any problem nothing is stored."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise BricklabError("This file is not a zip bundle.", "Upload a .zip exported by bricklab.") from exc
    with zf:
        if BUNDLE_CONFIG not in zf.namelist():
            raise BricklabError(f"The bundle has no {BUNDLE_CONFIG}.", "Upload a .zip exported by bricklab.")
        config = configuration.loads(zf.read(BUNDLE_CONFIG), model)
        files = [_bundled(zf, i, ref, config) for i, ref in enumerate(config.adapters)]
    for blob in files:
        adapters.save(blob, directory)
    return config


def _bundled(zf: zipfile.ZipFile, i: int, ref, config: BrickConfig) -> bytes:
    name, where = f"adapters/{ref.sha256}.safetensors", f"adapters[{i}].sha256"
    if name not in zf.namelist() or zf.getinfo(name).file_size > MAX_ADAPTER_BYTES:
        raise ConfigError(where, f"the bundle holds no usable {name}; export the bundle again")
    blob = zf.read(name)
    if hashlib.sha256(blob).hexdigest() != ref.sha256:
        raise ConfigError(where, f"{name} in the bundle does not match its hash; export the bundle again")
    if (found := models.mismatch(adapters.header_meta(blob), config, "the adapter")) is not None:
        raise ConfigError(where, f"{found[1]}; bundle it with the configuration of its own model")
    return blob
