"""Sparse FFN execution: compute a gated MLP only for the neurons a configuration or a router keeps,
so skipped neurons save real time. Context-local and thread-safe like core.live.interventions: while any
sparse context is active, each MLP's forward is a core.live.hooks.Dispatcher's, which runs the calling
context's layer function (or the dense forward); the last context to exit restores the model's own.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core import models
from core.errors import BricklabError
from core.kernels import ffn as ffn_kernels
from core.live import hooks, interventions

_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # down module -> {key: W_down.T or Packed}


@dataclass(frozen=True, eq=False)
class Ffn:
    """One layer's gated MLP as views of the live weights: a = act(gate x) * (up x), out = down a."""

    model: torch.nn.Module
    layer: int
    gate: torch.Tensor  # (d_ff, d_model)
    up: torch.Tensor  # (d_ff, d_model)
    down: torch.nn.Module  # the down projection itself: calling it runs intervention transforms
    act: Callable[[torch.Tensor], torch.Tensor]
    silu: bool  # act is SiLU (the one-token kernel computes it itself)
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense a (..., d_ff)."""
        return self.act(F.linear(x, self.gate, self.gate_bias)) * F.linear(x, self.up, self.up_bias)

    def transformed(self) -> bool:
        """Whether the calling context also transforms this layer's activation (core.live.interventions):
        then the down projection must see the full-width activation."""
        return interventions.has_transform(self.model, self.layer)

    def full_down(self, a_sel: torch.Tensor, idx: torch.Tensor, add: torch.Tensor | None = None):
        """down(a) through the module (so intervention transforms run), a zero outside `idx` plus `add`."""
        full = a_sel.new_zeros((*a_sel.shape[:-1], self.gate.shape[0])).index_copy_(-1, idx, a_sel)
        return self.down(full if add is None else full + add.to(full.device, full.dtype))

    def down_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.down.bias is None else out + self.down.bias


LayerFn = Callable[[Ffn, torch.Tensor], torch.Tensor]  # (layer's FFN, x (..., d_model)) -> (..., d_model)


def supported(model) -> bool:
    """Gated MLPs with separate or fused gate/up projections (Llama, Mistral, Qwen, Gemma, Phi-3...)."""
    site = models.site_for(model.config.model_type)
    return (site.gate is not None or site.fused_gate_up) and not site.conv1d


def _mlp(model, layer: int) -> torch.nn.Module:
    site = models.site_for(model.config.model_type)
    return models._attr(models.blocks(model)[layer], site.down.rsplit(".", 1)[0])


def ffn(model, layer: int) -> Ffn:
    if not supported(model):
        plain = "a mixture of experts" if models.site_for(model.config.model_type).experts else "a plain one"
        raise BricklabError(
            f"Sparse execution needs a gated MLP; '{model.config.model_type}' has {plain}.",
            "Use a Llama-like model, or apply the configuration with masks (core.live.interventions).",
        )
    site, mlp = models.site_for(model.config.model_type), _mlp(model, layer)
    block = models.blocks(model)[layer]
    act = getattr(mlp, "act_fn", None) or mlp.activation_fn
    if site.fused_gate_up:
        fused = models._attr(block, site.up)
        gate, up = fused.weight.chunk(2, dim=0)
        biases = fused.bias.chunk(2) if fused.bias is not None else (None, None)
    else:
        g, u = models._attr(block, site.gate), models._attr(block, site.up)
        gate, up, biases = g.weight, u.weight, (g.bias, u.bias)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return Ffn(model, layer, gate, up, models.down_proj(model, layer), act, silu, *biases)


def _mlps(model) -> list:
    return [_mlp(model, layer) for layer in range(len(models.blocks(model)))]


_patches = hooks.Dispatcher("sparse", "forward", _mlps)


def patched_count(model) -> int:
    """MLPs whose forward is currently bricklab's dispatcher (0 outside every sparse context)."""
    return sum(hooks.replaced(m) for m in model.modules())


@contextmanager
def sparse(model, per_layer: dict[int, LayerFn]):
    """Run layer `layer`'s FFN as `per_layer[layer](ffn, x)`, this context only; other layers,
    threads and contexts run dense. An inner context replaces an outer one's function per layer."""
    n_layers = len(models.blocks(model))
    if per_layer and not supported(model):
        ffn(model, 0)  # raises the explanation
    for layer in per_layer:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {n_layers} layers")
    if not per_layer:
        yield
        return
    # each function gets its layer's Ffn bound here, so building one fails before anything is patched
    functions = [
        (_mlp(model, layer), functools.partial(fn, ffn(model, layer))) for layer, fn in per_layer.items()
    ]
    with _patches.using(model, functions):
        yield


class KeepOnly:
    """A static neuron set: the rows of gate/up and columns of down are gathered once (per device
    and dtype), then each call computes only those neurons. a' = a * scale + add on the whole layer,
    as a compiled brick plan does; neurons with scale 0 cost nothing (their `add` is a constant)."""

    def __init__(self, keep: np.ndarray, scale: np.ndarray | None = None, add: np.ndarray | None = None):
        self.idx = torch.from_numpy(np.flatnonzero(np.asarray(keep)).astype(np.int64))  # (n,)
        self.scale = None if scale is None else torch.from_numpy(np.array(scale, np.float32))
        self.add = None if add is None or not np.any(add) else torch.from_numpy(np.array(add, np.float32))
        self._cache: dict = {}

    def _weights(self, f: Ffn):
        key = (f.gate.device, f.gate.dtype)
        if key not in self._cache:
            idx = self.idx.to(f.gate.device)
            gu, bias = _paired(f, idx)
            rows = f.down.weight.detach()[:, idx].T.contiguous()  # (n, d_model)
            scale = None if self.scale is None else self.scale.to(*key)[idx]
            const = None if self.add is None else self.add.to(*key) @ f.down.weight.detach().T
            self._cache[key] = (idx, gu, bias, rows, scale, const)
        return self._cache[key]

    def __call__(self, f: Ffn, x: torch.Tensor) -> torch.Tensor:
        idx, gu, bias, rows, scale, const = self._weights(f)
        if one_token(f, x):
            out = np.empty(x.shape[-1], np.float32)
            no_scale = np.zeros(0, np.float32)
            scales = no_scale if scale is None else scale.numpy()
            ffn_kernels.keep_one(x.detach().reshape(-1).numpy(), gu.numpy(), rows.numpy(), scales, out)
            out = f.down_bias(torch.from_numpy(out).reshape(x.shape))
            return out if const is None else out + const
        h = F.linear(x, gu.flatten(0, 1), bias).unflatten(-1, (-1, 2))  # (..., n, 2)
        a = f.act(h[..., 0]) * h[..., 1]
        if scale is not None:
            a = a * scale
        if f.transformed():
            return f.full_down(a, idx, self.add)
        out = f.down_bias(a @ rows)
        return out if const is None else out + const


class Threshold:
    """Activation sparsity with calibrated magnitude thresholds (as in TEAL, core.routing.thresholds):
    gate and up skip the FFN inputs |x_k| < t_x, down skips the neurons |a_i| < tau * (the token's
    max |a|). One token on CUDA runs core.kernels.sparse_gpu, which never reads the skipped weight rows;
    anything else runs the same masks densely in torch."""

    def __init__(self, tau: float, t_x: float = 0.0):
        if not 0 <= tau <= 1 or t_x < 0:
            raise ValueError(f"need 0 <= tau <= 1 and t_x >= 0, got tau={tau}, t_x={t_x}")
        self.tau, self.t_x = tau, t_x

    def __call__(self, f: Ffn, x: torch.Tensor) -> torch.Tensor:
        if gpu_token(f, x):
            out = _gpu_kernels().ffn_one(x, packed(f), self.t_x, self.tau)
            return f.down_bias(out.reshape(x.shape))
        if self.t_x:
            x = x.masked_fill(x.abs() < self.t_x, 0.0)
        a = f.activations(x)
        if self.tau:
            a = a.masked_fill(a.abs() < self.tau * a.abs().amax(dim=-1, keepdim=True), 0.0)
        return f.down(a)


@functools.cache
def _gpu_kernels():
    """core.kernels.sparse_gpu, or None where Triton is not installed."""
    try:
        from core.kernels import sparse_gpu
    except ImportError:
        return None
    return sparse_gpu


def gpu_token(f: Ffn, x: torch.Tensor) -> bool:
    """Whether x is one token the Triton kernels (core.kernels.sparse_gpu) can take: on CUDA with
    Triton installed, a SiLU gate without biases, and no intervention transform on this layer."""
    one = x.numel() == x.shape[-1] and x.device.type == "cuda" and f.gate_bias is None
    return one and f.silu and not f.transformed() and _gpu_kernels() is not None


def packed(f: Ffn):
    """The layer's FFN weights input-major for the sparse kernels, cached for the model's lifetime
    (a second copy of the FFN weights on the device)."""
    weight = f.down.weight
    per = _packed.setdefault(f.down, {})
    key = ("input-major", weight.device, weight.dtype)
    if key not in per:
        per[key] = _gpu_kernels().Packed.of(f.gate, f.up, weight)
    return per[key]


def one_token(f: Ffn, x: torch.Tensor) -> bool:
    """Whether x is one token that the CPU kernels (core.kernels.ffn) can take: float32 on the CPU,
    a SiLU gate without biases, and no intervention transform on this layer in this context."""
    one = x.numel() == x.shape[-1] and x.device.type == "cpu" and x.dtype == torch.float32
    return one and f.silu and f.gate_bias is None and not f.transformed()


def _paired(f: Ffn, idx: torch.Tensor | None = None):
    """Gate and up rows interleaved per neuron, (n, 2, d_model), and their biases (n, 2) or None."""
    pick = (lambda w: w) if idx is None else (lambda w: w.index_select(0, idx))
    gu = torch.stack((pick(f.gate.detach()), pick(f.up.detach())), dim=1).contiguous()
    if f.gate_bias is None:
        return gu, None
    return gu, torch.stack((pick(f.gate_bias.detach()), pick(f.up_bias.detach())), dim=1).flatten()


def from_plan(plan: dict) -> dict[int, LayerFn]:
    """Sparse layer functions for a compiled brick plan ({layer: LayerPlan(scale, add)}): the same
    outputs as core.live.interventions.apply_plan within float tolerance, without the zeroed neurons."""
    return {int(layer): KeepOnly(lp.scale != 0, lp.scale, lp.add) for layer, lp in plan.items()}


def down_rows(f: Ffn) -> torch.Tensor:
    """W_down.T (d_ff, d_model): the down projection laid out so a set of neurons is a set of rows.
    Cached per layer for the model's lifetime (a third of the FFN weights)."""
    weight = f.down.weight
    per = _packed.setdefault(f.down, {})
    key = (weight.device, weight.dtype)
    if key not in per:
        per[key] = weight.detach().T.contiguous()
    return per[key]


def gate_up(f: Ffn, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """a for the neurons `idx` only, (..., len(idx)): their gate and up rows gathered, then matmuls."""
    pick = (lambda b: None) if f.gate_bias is None else (lambda b: b.index_select(0, idx))
    g = F.linear(x, f.gate.index_select(0, idx), pick(f.gate_bias))
    return f.act(g) * F.linear(x, f.up.index_select(0, idx), pick(f.up_bias))
