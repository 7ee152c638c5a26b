"""Adapter bricks: low-rank (LoRA) updates of FFN projections, stored as safetensors files named by their
sha256 under the cache directory, and applied live through context-local hooks, so a session that
switches an adapter on never changes what another session's forward passes compute."""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core import models, settings
from core.configuration import ConfigError
from core.errors import BricklabError
from core.live.hooks import Dispatcher

MODULES = ("gate", "up", "down")  # the FFN projections an adapter may change
META_KEY = "bricklab_adapter"  # safetensors metadata entry holding the adapter's JSON description
Active = Sequence[tuple["Adapter", float]]  # adapters switched on, each with its factor


def adapters_dir() -> Path:
    """Where adapter files live: beside the DuckDB cache (BRICKLAB_DB moves both)."""
    return settings.db_path().parent / "adapters"


def projection(model, layer: int, name: str) -> torch.nn.Linear:
    """The gate, up or down projection of a layer, refusing layouts an adapter cannot target."""
    site = models.site_for(model.config.model_type)
    path = {"gate": site.gate, "up": site.up, "down": site.down}.get(name)
    if path is None or site.fused_gate_up or site.conv1d:
        raise BricklabError(
            f"Adapters on '{name}' are not supported for '{model.config.model_type}' models.",
            "Adapters need separate gate/up/down linear layers (Llama-style MLPs); pick such a model.",
        )
    module = models.blocks(model)[layer].get_submodule(path)
    if not isinstance(module, torch.nn.Linear):
        raise BricklabError(f"'{path}' is not a linear layer.", "Adapters need plain nn.Linear projections.")
    return module


@dataclass(frozen=True, eq=False)
class Adapter:
    """A decoded adapter file: per (layer, module) the LoRA pair, delta W = scaling * B @ A."""

    sha256: str  # of the file's bytes; its name in the adapters folder and in configurations
    meta: dict  # model_id, fingerprint, layers, modules, rank, alpha, training details
    weights: dict  # (layer, module) -> (A (rank, in), B (out, rank)), float32

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.meta["layers"])

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.meta["modules"])

    @property
    def rank(self) -> int:
        return int(self.meta["rank"])

    @property
    def scaling(self) -> float:
        return float(self.meta["alpha"]) / self.rank

    @property
    def n_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.weights.values())


def encode(weights: dict, meta: dict) -> bytes:
    """Safetensors bytes: tensors "<layer>.<module>.lora_A/B" and the description as metadata."""
    tensors = {}
    for (layer, name), (a, b) in sorted(weights.items()):
        tensors[f"{layer}.{name}.lora_A"] = a.detach().float().contiguous().cpu()
        tensors[f"{layer}.{name}.lora_B"] = b.detach().float().contiguous().cpu()
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def header_meta(data: bytes) -> dict:
    """The description stored in a safetensors file's header, without reading the tensors."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        return json.loads(header["__metadata__"][META_KEY])
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise BricklabError(
            "This file is not a bricklab adapter (no adapter description in its safetensors header).",
            "Use an adapter trained on the Custom bricks page or exported in a bricklab bundle.",
        ) from exc


def decode(data: bytes) -> Adapter:
    meta = header_meta(data)
    tensors = st_load(data)
    weights = {}
    for layer in meta["layers"]:
        for name in meta["modules"]:
            key = f"{layer}.{name}"
            weights[(int(layer), name)] = (tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"])
    return Adapter(hashlib.sha256(data).hexdigest(), meta, weights)


def save(data: bytes, directory: Path | None = None) -> str:
    """Store adapter bytes as <sha256>.safetensors (written whole, then renamed); returns the hash."""
    header_meta(data)  # refuse anything that is not an adapter before it lands in the cache
    sha = hashlib.sha256(data).hexdigest()
    folder = Path(directory or adapters_dir())
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{sha}.safetensors"
    if not target.is_file():
        staging = target.with_suffix(".partial")
        staging.write_bytes(data)
        staging.replace(target)
    return sha


def read(sha: str, directory: Path | None = None, where: str = "sha256") -> bytes:
    """An adapter file's bytes, checked against its hash; ConfigError (at `where`) when missing or wrong."""
    path = Path(directory or adapters_dir()) / f"{sha}.safetensors"
    if not path.is_file():
        problem = f"adapter {sha[:12]}… is not in {path.parent}"
        fix = "import the export bundle (.zip) that holds it, or train it again on the Custom bricks page"
        raise ConfigError(where, f"{problem}; {fix}. Nothing was applied")
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        problem = f"the file {path.name} has sha256 {got[:12]}…, not the {sha[:12]}… the configuration names"
        fix = "it was changed or damaged: delete it and import the export bundle again"
        raise ConfigError(where, f"{problem}; {fix}. Nothing was applied")
    return data


def load(sha: str, info: models.ModelInfo | None = None, directory=None, where="sha256") -> Adapter:
    """A verified adapter, refused when it was trained on other weights than `info`'s model."""
    path = Path(directory or adapters_dir()) / f"{sha}.safetensors"
    stamp = path.stat() if path.is_file() else None
    key = (str(path), sha, stamp and (stamp.st_mtime_ns, stamp.st_size))
    adapter = _cached(key, where) if stamp else decode(read(sha, directory, where))
    found = None if info is None else models.mismatch(adapter.meta, info, f"adapter {sha[:12]}…")
    if found is not None:
        raise ConfigError(where, f"{found[1]}; load the model it was trained on, or train it again")
    return adapter


@functools.lru_cache(maxsize=8)
def _cached(key: tuple, where: str) -> Adapter:
    """Decoded adapters by (path, hash, mtime, size): a Playground toggle does not re-read the file."""
    path, sha, _ = key
    return decode(read(sha, Path(path).parent, where))


def catalog(directory: Path | None = None, fingerprint: str | None = None) -> list[dict]:
    """The stored adapters (newest first), each its description plus sha256 and file bytes."""
    folder = Path(directory or adapters_dir())
    out = []
    for path in folder.glob("*.safetensors") if folder.is_dir() else ():
        with open(path, "rb") as file:
            start = file.read(8)
            head = file.read(min(struct.unpack("<Q", start)[0], 2**24)) if len(start) == 8 else b""
        try:
            meta = header_meta(start + head)
        except BricklabError:
            continue  # not an adapter: listed nowhere, used nowhere
        if fingerprint is None or meta["fingerprint"] == fingerprint:
            out.append(meta | {"sha256": path.stem, "bytes": path.stat().st_size})
    return sorted(out, key=lambda m: m.get("created", ""), reverse=True)


def resolve(lm: models.LoadedModel, config) -> tuple[tuple[Adapter, float], ...]:
    """Check every adapter a configuration references (file, hash, model, shape) and return the
    ones switched on with their factors; any problem raises before anything is applied."""
    active = []
    for i, ref in enumerate(getattr(config, "adapters", ())):
        adapter = load(ref.sha256, lm.info, where=f"adapters[{i}].sha256")
        stored = (adapter.layers, adapter.modules, adapter.rank)
        if (tuple(ref.layers), tuple(ref.modules), ref.rank) != stored:
            problem = f"layers/modules/rank differ from the adapter file's {stored}"
            raise ConfigError(f"adapters[{i}]", f"{problem}; export the configuration again")
        if ref.mode != "off":
            active.append((adapter, ref.factor))
    return tuple(active)


# --- live application -----------------------------------------------------------------------------


def _projections(model) -> list:
    return [projection(model, layer, name) for layer in range(len(models.blocks(model))) for name in MODULES]


_hooks = Dispatcher("adapters", "output", _projections)


def _term(a: torch.Tensor, b: torch.Tensor, scale: float):
    """y + scale * B(A(x)): one adapter's update of one projection's output."""

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)

    return fn


@contextmanager
def applied(model, active: Active):
    """Add factor * scaling * B(A(x)) to the adapted projections' outputs, in this context only.

    One forward hook per projection exists while any context anywhere uses an adapter (a
    core.live.hooks.Dispatcher); each hook runs the calling context's adapters. Nested uses add up.
    """
    if not active:
        yield
        return
    terms = []
    for adapter, factor in active:
        for (layer, name), (a, b) in adapter.weights.items():
            module = projection(model, layer, name)
            w = module.weight
            scale = adapter.scaling * float(factor)
            terms.append((module, _term(a.to(w.device, w.dtype), b.to(w.device, w.dtype), scale)))
    with _hooks.using(model, terms):
        yield


# --- copies and merging ---------------------------------------------------------------------------


def copy_model(model) -> torch.nn.Module:
    """A separate model with cloned weights and no hooks (a deep copy would also copy live hooks)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    fresh.load_state_dict(state, strict=True, assign=True)
    fresh.tie_weights()
    for name, buffer in model.named_buffers():  # non-persistent ones (rotary inv_freq) are not in state
        owner, _, attr = name.rpartition(".")
        fresh.get_submodule(owner)._buffers[attr] = buffer.detach().clone()
    fresh.generation_config = model.generation_config
    return fresh.eval()


@torch.no_grad()
def merged(model, active: Active) -> torch.nn.Module:
    """A copy of `model` with the adapters' deltas added to its weights: W + factor * scaling * B @ A."""
    out = copy_model(model)
    for adapter, factor in active:
        for (layer, name), (a, b) in adapter.weights.items():
            w = projection(out, layer, name).weight
            w.copy_((w.float() + adapter.scaling * float(factor) * (b @ a)).to(w.dtype))
    return out
