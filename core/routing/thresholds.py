"""Magnitude thresholds for activation sparsity (as in TEAL), calibrated offline per layer so that a
target share of the work is skipped model-wide: on the neurons (|a_i| / max|a| under tau, from the
histograms a capture stores), optionally on the FFN input (|x_k| under t_x, from a calibration pass) and
on the attention projections' inputs (q/k/v: the attention input, o: the attention output; quantiles of
a calibration pass too: a capture stores no histograms of them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from core import models
from core.live import hooks, sparse

if TYPE_CHECKING:  # the store needs duckdb, which a GPU machine running the benchmark may lack
    from core.store import Store


def relative(hist: np.ndarray, sparsity: float) -> np.ndarray:
    """(n_layers,) tau per layer such that a share `sparsity` of the layer's neurons has |a| under
    tau * (the token's max |a|), from (n_layers, bins) counts of |a| / max over [0, 1] (capture's
    `hist_abs`); linear within a bin. Every layer gets the same share, so the model-wide share is it too."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    hist = np.asarray(hist, dtype=np.float64)
    if sparsity == 0:
        return np.zeros(len(hist))
    bins = hist.shape[1]
    cdf = np.cumsum(hist, axis=1) / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    edges = np.arange(bins + 1) / bins
    return np.array([np.interp(sparsity, np.r_[0.0, row], edges) for row in cdf])


def histograms(a: torch.Tensor, bins: int = 100) -> np.ndarray:
    """(bins,) counts of |a| / (each row's max |a|) over the rows of a (tokens, d_ff), as capture
    counts them (core.capture.reduce): the peak itself in the last bin."""
    v = a.detach().float().abs()
    idx = (v * (bins / v.amax(dim=-1, keepdim=True).clamp_min(1e-30))).long().clamp_(max=bins - 1)
    return np.bincount(idx.reshape(-1).cpu().numpy(), minlength=bins)


def from_run(store: Store, run_id: str, sparsity: float) -> np.ndarray:
    """(n_layers,) tau from a captured run's histograms of |a| (`relative`)."""
    return relative(store.layer_array(run_id, "hist_abs", np.int64), sparsity)


class Recorder:
    """A dense sparse-context layer function that keeps |x| and a's histogram of every token it sees."""

    def __init__(self, bins: int = 100):
        self.xs: list[torch.Tensor] = []
        self.hist = np.zeros(bins, np.int64)

    def __call__(self, f: sparse.Ffn, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1])
        self.xs.append(flat.abs().float().cpu())
        a = f.activations(x)
        self.hist += histograms(a.reshape(-1, a.shape[-1]), len(self.hist))
        return f.down(a)


def calibrate(lm: models.LoadedModel, ids: Iterable[list[int]]) -> list[Recorder]:
    """Run the model densely over token sequences `ids` and record each layer's inputs and activations."""
    model = lm.model
    recorders = [Recorder() for _ in models.blocks(model)]
    device = next(model.parameters()).device
    with torch.inference_mode(), sparse.sparse(model, dict(enumerate(recorders))):
        for row in ids:
            model(torch.tensor([row], device=device))
    return recorders


def input_thresholds(recorders: list[Recorder], sparsity: float) -> np.ndarray:
    """(n_layers,) t_x per layer: the `sparsity` quantile of the recorded |x|; 0 keeps every input."""
    if sparsity <= 0:
        return np.zeros(len(recorders))
    return np.array([float(np.quantile(torch.cat(r.xs).numpy(), sparsity)) for r in recorders])


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama's names; o_proj reads the attention output


def _attention_sites(model) -> list:
    """Every layer's q, k, v and o projections (the harness's architectures: Llama, Mistral)."""
    try:
        return [getattr(block.self_attn, name) for block in models.blocks(model) for name in ATTENTION]
    except AttributeError as exc:
        raise ValueError(f"attention sparsity needs {', '.join(ATTENTION)} in self_attn: {exc}") from None


_attention_inputs = hooks.Dispatcher("attention_inputs", "input", _attention_sites)


@contextmanager
def attention_inputs(model, functions: dict[int, tuple]) -> Iterator[None]:
    """Within the block, layer i's q/k/v projections read f_qkv(x) and its o projection f_o(y), for
    functions {i: (f_qkv, f_o)} (core.live.hooks: this context only)."""
    blocks = models.blocks(model)
    pairs = []
    for layer, (f_qkv, f_o) in functions.items():
        attn = blocks[layer].self_attn
        pairs += [(attn.q_proj, f_qkv), (attn.k_proj, f_qkv), (attn.v_proj, f_qkv), (attn.o_proj, f_o)]
    with _attention_inputs.using(model, pairs):
        yield


def calibrate_attention(lm: models.LoadedModel, ids: Iterable[list[int]]) -> list[tuple[list, list]]:
    """Per layer, the |inputs| of its q projection (the attention input) and of its o projection (the
    attention output) over token sequences `ids`, run densely."""
    model = lm.model
    seen: list[tuple[list, list]] = [([], []) for _ in models.blocks(model)]

    def keeper(store: list):
        def keep(x):
            store.append(x.detach().reshape(-1, x.shape[-1]).abs().float().cpu())
            return x

        return keep

    device = next(model.parameters()).device
    blocks = models.blocks(model)
    pairs = []
    for block, (xs, ys) in zip(blocks, seen, strict=True):
        pairs += [(block.self_attn.q_proj, keeper(xs)), (block.self_attn.o_proj, keeper(ys))]
    with torch.inference_mode(), _attention_inputs.using(model, pairs):
        for row in ids:
            model(torch.tensor([row], device=device))
    return seen


def attention_thresholds(seen: list[tuple[list, list]], sparsity: float) -> tuple[np.ndarray, np.ndarray]:
    """(t_qkv, t_o), each (n_layers,): the `sparsity` quantiles of the recorded |inputs|; 0 keeps all."""
    if sparsity <= 0:
        return np.zeros(len(seen)), np.zeros(len(seen))
    quantile = lambda values: float(np.quantile(torch.cat(values).numpy(), sparsity))  # noqa: E731
    return np.array([quantile(xs) for xs, _ in seen]), np.array([quantile(ys) for _, ys in seen])


def attention_functions(t_qkv: np.ndarray, t_o: np.ndarray) -> dict[int, tuple]:
    """attention_inputs' functions: inputs under the layer's threshold read as zero."""

    def under(t: float):
        return lambda x: x.masked_fill(x.abs() < t, 0.0)

    return {layer: (under(float(t_qkv[layer])), under(float(t_o[layer]))) for layer in range(len(t_qkv))}


def layer_functions(tau: np.ndarray, t_x: np.ndarray | None = None) -> dict[int, sparse.Threshold]:
    """The sparse context's per-layer functions for thresholds tau (and t_x: none skips no input)."""
    t_x = np.zeros(len(tau)) if t_x is None else t_x
    return {layer: sparse.Threshold(float(tau[layer]), float(t_x[layer])) for layer in range(len(tau))}


CURVE_KIND = "threshold_curve"  # store.put_json kind
SHARES = (0.25, 0.4, 0.5)  # shares of inputs and neurons skipped in every layer


def stored_curve(store: Store, run_id: str, device: str, per_category: int = 2) -> dict | None:
    return store.get_json(run_id, CURVE_KIND, _curve_key(device, per_category))


def _curve_key(device: str, per_category: int) -> dict:
    return {"shares": list(SHARES), "device": device, "per_category": per_category}


def curve(lm: models.LoadedModel, store: Store, run_id: str, per_category: int = 2, progress=None) -> dict:
    """Per share skipped: the held-out loss relative to dense with calibrated thresholds (tau from the
    run's histograms, t_x from its other prompts), and on CUDA the decoding speed against dense on the
    benchmark's harness (core.routing.decode: a CUDA graph a token). Cached per device."""
    from core.live import evaluate
    from core.routing import tradeoff

    device = next(lm.model.parameters()).device
    key = _curve_key(device.type, per_category)
    if (cached := store.get_json(run_id, CURVE_KIND, key)) is not None:
        return cached
    texts = tradeoff.held_out(store, run_id, per_category)
    others = [row[3] for row in store.prompts(run_id) if row[3] not in set(texts)][: 2 * per_category]
    recorders = calibrate(lm, [lm.tokenizer(t)["input_ids"][:128] for t in others])
    dense = float(np.nanmean(evaluate.loss_per_prompt(lm, texts)))
    functions = {}
    points = []
    for done, share in enumerate(SHARES):
        if progress:
            progress(done, len(SHARES) + 1, f"loss with {share:.0%} skipped")
        functions[share] = layer_functions(from_run(store, run_id, share), input_thresholds(recorders, share))
        with sparse.sparse(lm.model, functions[share]):
            ratio = float(np.nanmean(evaluate.loss_per_prompt(lm, texts))) / dense
        points.append({"share": share, "active_share": 1 - share, "loss_ratio": ratio})
    result = {"n_prompts": len(texts), "dense_loss": dense, "points": points, "dense_tokens_per_s": None}
    if device.type == "cuda" and decode_supported(lm.model):
        if progress:
            progress(len(SHARES), len(SHARES) + 1, "decoding speed")
        speeds = _speeds(lm, texts[0], functions)
        result["dense_tokens_per_s"] = speeds.pop("dense")
        for point in points:
            point["tokens_per_s"] = speeds[point["share"]]
    store.put_json(run_id, CURVE_KIND, key, result)
    return result


def decode_supported(model) -> bool:
    """Whether core.routing.decode's harness computes this model: Llama-like, no attention biases."""
    cfg = model.config
    return cfg.model_type in ("llama", "mistral") and not getattr(cfg, "attention_bias", False)


def _speeds(lm: models.LoadedModel, text: str, functions: dict, tokens: int = 64, reps: int = 3) -> dict:
    """Greedy tokens/s, dense and per share, on one prompt: medians of interleaved repetitions."""
    from core.routing import decode

    prompt = lm.tokenizer(text)["input_ids"][:64]
    dec = decode.Decoder(lm.model, len(prompt) + tokens + 1)
    blocks = models.blocks(lm.model)
    ffns = [sparse.ffn(lm.model, layer) for layer in range(len(blocks))]
    runners = {"dense": decode.Runner(dec, lambda i, x: blocks[i].mlp(x), graph=True)}
    for share, fns in functions.items():
        runners[share] = decode.Runner(dec, lambda i, x, fns=fns: fns[i](ffns[i], x), graph=True)
    seconds = decode.interleaved(runners, prompt, tokens, reps)
    return {name: tokens / float(np.median(times)) for name, times in seconds.items()}
