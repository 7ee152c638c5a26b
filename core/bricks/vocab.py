"""What a neuron writes: its down-projection column read through the final norm and the unembedding
(the "logit lens" on one neuron), as the tokens it promotes and suppresses; per model, cached.

A neuron's direct effect on the logits, per unit of activation, is `W_U (g * w_i)`: `w_i` its
W_down column, `g` the final norm's scale. The norm also divides by the residual's RMS, a positive
per-token number that scales every logit alike, so it changes no ranking and is left out. Models
whose final norm is a LayerNorm (gpt2, opt, ...) also subtract the mean over d_model: the column is
centred first. Gemma's RMSNorm multiplies by (1 + weight). OLMo's LayerNorm has no weight (centred
only). Biases (of down_proj, the norm, the unembedding) are the same for every neuron, so they are
no part of what one neuron writes and are left out. Only the direct path is read: what later layers
make of the neuron's output is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core import models
from core.errors import BricklabError
from core.models import LoadedModel
from core.progress import Progress
from core.store import Store

VERSION = 1  # part of the cache key: bump when the projection changes
TOP = 16  # tokens kept per neuron and direction
_CHUNK = 512  # neurons per matrix product: (512, vocab) float32 is ~100 MB on a 49k vocabulary


@dataclass(frozen=True)
class FinalNorm:
    path: str | None  # dotted path from the model to the final norm; None: no scale
    centred: bool = False  # a LayerNorm: subtracts the mean over d_model
    offset: float = 0.0  # Gemma's RMSNorm scales by (offset + weight)


_RMS = FinalNorm("model.norm")
FINAL_NORMS: dict[str, FinalNorm] = {
    **{name: _RMS for name in ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "phi3")},
    **{name: FinalNorm("model.norm", offset=1.0) for name in ("gemma", "gemma2", "gemma3_text")},
    "olmo": FinalNorm(None, centred=True),
    "phi": FinalNorm("model.final_layernorm", centred=True),
    "gpt2": FinalNorm("transformer.ln_f", centred=True),
    "gptj": FinalNorm("transformer.ln_f", centred=True),
    "falcon": FinalNorm("transformer.ln_f", centred=True),
    "gpt_neox": FinalNorm("gpt_neox.final_layer_norm", centred=True),
    "opt": FinalNorm("model.decoder.final_layer_norm", centred=True),
}


@dataclass(frozen=True)
class Projection:
    """Per neuron (global id = layer * d_ff + index) the TOP tokens it promotes and suppresses."""

    promoted: np.ndarray  # int32 (n_neurons, TOP) token ids, strongest first
    promoted_logit: np.ndarray  # float16 (n_neurons, TOP) logit change per unit activation
    suppressed: np.ndarray  # int32 (n_neurons, TOP), most negative first
    suppressed_logit: np.ndarray  # float16 (n_neurons, TOP)


def _readout(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(W_U float32 (vocab, d_model), scale (d_model,) or None, centred) of the model's last step."""
    model = lm.model
    norm = FINAL_NORMS.get(model.config.model_type)
    unembed = model.get_output_embeddings()
    if norm is None or unembed is None:
        raise BricklabError(
            f"bricklab does not know how architecture '{model.config.model_type}' turns its last hidden "
            "state into logits.",
            f"Vocabulary projections are available for: {', '.join(sorted(FINAL_NORMS))}.",
        )
    scale = None
    if norm.path is not None:
        module = model
        for part in norm.path.split("."):
            module = getattr(module, part, None)
        weight = getattr(module, "weight", None)
        if weight is not None:
            scale = weight.detach().float() + norm.offset
    return unembed.weight.detach().float(), scale, norm.centred


def _directions(lm: LoadedModel, columns: torch.Tensor) -> torch.Tensor:
    """(d_model, n) W_down columns (or sums of them) as read by the unembedding: (n, vocab) logits."""
    w_u, scale, centred = _readout(lm)
    columns = columns.float().to(w_u.device)
    if centred:
        columns = columns - columns.mean(dim=0, keepdim=True)
    if scale is not None:
        columns = columns * scale[:, None]
    return columns.T @ w_u.T


def _key() -> dict:
    return {"top": TOP, "version": VERSION}


def _owner(lm: LoadedModel) -> str:
    """The results row's run_id for a per-model result: the model's fingerprint, not a run."""
    return f"model:{lm.info.fingerprint}"


@torch.inference_mode()
def projection(lm: LoadedModel, store: Store | None = None, progress: Progress | None = None) -> Projection:
    """Every neuron's promoted and suppressed tokens: computed once per model (batched over all
    neurons), then read from `store`'s cache, keyed by the model's fingerprint."""
    if store is not None and (cached := store.get_arrays(_owner(lm), "vocab", _key())) is not None:
        return _frozen(Projection(**cached[0]))
    report = progress or (lambda done, total, message: None)
    n_layers, d_ff = lm.info.n_layers, lm.info.d_ff
    out = {
        "promoted": np.zeros((n_layers * d_ff, TOP), np.int32),
        "promoted_logit": np.zeros((n_layers * d_ff, TOP), np.float16),
        "suppressed": np.zeros((n_layers * d_ff, TOP), np.int32),
        "suppressed_logit": np.zeros((n_layers * d_ff, TOP), np.float16),
    }
    for layer in range(n_layers):
        report(layer, n_layers, f"vocabulary projection of layer {layer}")
        weight = models.down_weight(lm.model, layer).detach()  # (d_model, d_ff)
        for lo in range(0, d_ff, _CHUNK):
            logits = _directions(lm, weight[:, lo : lo + _CHUNK])  # (n, vocab)
            rows = slice(layer * d_ff + lo, layer * d_ff + lo + logits.shape[0])
            k = min(TOP, logits.shape[1])
            top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
            out["promoted"][rows, :k] = top.indices.cpu().numpy()
            out["promoted_logit"][rows, :k] = top.values.cpu().numpy()
            out["suppressed"][rows, :k] = bottom.indices.cpu().numpy()
            out["suppressed_logit"][rows, :k] = bottom.values.cpu().numpy()
    report(n_layers, n_layers, "vocabulary projection done")
    if store is not None and not store.read_only:
        store.put_arrays(_owner(lm), "vocab", _key(), out, {"model_id": lm.info.model_id})
    return _frozen(Projection(**out))


def _frozen(p: Projection) -> Projection:
    for array in vars(p).values():
        array.flags.writeable = False
    return p


@torch.inference_mode()
def neuron_tokens(
    lm: LoadedModel, global_id: int, n: int = 10, store: Store | None = None
) -> dict[str, list]:
    """{'promoted': [(token text, logit per unit a)], 'suppressed': [...]} of one neuron, strongest
    first: from the cached projection when `store` holds it, else from its one column (milliseconds)."""
    if (
        store is not None
        and (cached := store.get_arrays(_owner(lm), "vocab", _key())) is not None
        and n <= TOP
    ):
        arrays = cached[0]
        sides = {
            side: (arrays[side][global_id, :n], arrays[f"{side}_logit"][global_id, :n])
            for side in ("promoted", "suppressed")
        }
    else:
        layer, index = divmod(int(global_id), lm.info.d_ff)
        logits = _directions(lm, models.down_weight(lm.model, layer).detach()[:, index : index + 1])[0]
        k = min(n, len(logits))
        top, bottom = logits.topk(k), logits.topk(k, largest=False)
        sides = {
            "promoted": (top.indices.cpu().numpy(), top.values.cpu().numpy()),
            "suppressed": (bottom.indices.cpu().numpy(), bottom.values.cpu().numpy()),
        }
    decode = _decoder(lm)
    return {
        side: [(decode(int(t)), float(v)) for t, v in zip(ids, vals, strict=True)]
        for side, (ids, vals) in sides.items()
    }


def _decoder(lm: LoadedModel):
    return lambda token_id: lm.tokenizer.decode([token_id])


def resolve_token(lm: LoadedModel, text: str) -> tuple[int, str]:
    """(token id, its text) for a word as typed: the single token reading ' text' (the form inside
    running text) if there is one, else `text` itself, else the first token of ' text'."""
    word = text.strip()
    if not word:
        raise BricklabError("The token to look for is empty.", "Type a word or token, e.g. Paris.")
    spaced = lm.tokenizer.encode(" " + word, add_special_tokens=False)
    plain = lm.tokenizer.encode(word, add_special_tokens=False)
    token_id = spaced[0] if len(spaced) == 1 or len(plain) != 1 else plain[0]
    return int(token_id), lm.tokenizer.decode([token_id])


@torch.inference_mode()
def promoting_neurons(lm: LoadedModel, text: str, limit: int = 50) -> tuple[str, list[dict]]:
    """(the token searched, the `limit` neurons whose output raises its logit the most per unit of
    activation): every neuron ranked by one row of the unembedding, read through the final norm."""
    token_id, token = resolve_token(lm, text)
    w_u, scale, centred = _readout(lm)
    row = w_u[token_id] * (scale if scale is not None else 1.0)  # (d_model,)
    if centred:
        row = row - row.mean()  # centring the columns is the same as centring this row
    per_neuron = torch.cat(
        [row.to(models.down_weight(lm.model, layer).device) @ models.down_weight(lm.model, layer).float()
         for layer in range(lm.info.n_layers)]
    ).cpu()  # fmt: skip
    best = per_neuron.topk(min(limit, len(per_neuron)))
    d_ff = lm.info.d_ff
    rows = [
        {"layer": int(i) // d_ff, "neuron": int(i) % d_ff, "logit per unit a": float(v)}
        for v, i in zip(best.values, best.indices, strict=True)
    ]
    return token, rows


@torch.inference_mode()
def group_tokens(
    lm: LoadedModel, neurons: np.ndarray, weights: np.ndarray | None = None, n: int = 10
) -> dict[str, list[tuple]]:
    """The tokens a group of neurons' summed output promotes and suppresses: the sum of their
    columns, each weighted by `weights` (e.g. the neurons' mean signed activation over a run, so a
    neuron that is mostly negative counts with its sign; default 1), through the readout."""
    neurons = np.asarray(neurons, np.int64)
    d_ff = lm.info.d_ff
    weights = np.ones(len(neurons), np.float32) if weights is None else np.asarray(weights, np.float32)
    total = None
    for layer in np.unique(neurons // d_ff):
        mine = neurons // d_ff == layer
        columns = models.down_weight(lm.model, int(layer)).detach()[:, torch.as_tensor(neurons[mine] % d_ff)]
        part = columns.float() @ torch.as_tensor(weights[mine], device=columns.device)
        total = part if total is None else total + part.to(total.device)
    if total is None:
        return {"promoted": [], "suppressed": []}
    logits = _directions(lm, total[:, None])[0]
    decode = _decoder(lm)
    k = min(n, len(logits))
    return {
        "promoted": [(decode(int(i)), float(v)) for v, i in zip(*logits.topk(k), strict=True)],
        "suppressed": [
            (decode(int(i)), float(v)) for v, i in zip(*logits.topk(k, largest=False), strict=True)
        ],
    }
