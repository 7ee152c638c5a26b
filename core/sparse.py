"""Sparse FFN execution: compute a gated MLP only for the neurons a configuration or a router keeps,
so skipped neurons save real time. Context-local and thread-safe like core.interventions: while any
sparse context is active, each MLP's forward is a dispatcher that runs the calling context's layer
function (or the dense forward); the last context to exit restores the model's own forward.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from core import interventions, models
from core.errors import BricklabError

_active: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bricklab_sparse", default=None)
_lock = threading.Lock()
_installed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [users, mlps]
_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # down module -> {(device, dtype): ...}


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
        """Whether the calling context also transforms this layer's activation (core.interventions):
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
        raise BricklabError(
            f"Sparse execution needs a gated MLP; '{model.config.model_type}' has a plain one.",
            "Use a Llama-like model, or apply the configuration with masks (core.interventions).",
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


def _dispatcher(mlp, layer_ffn: Ffn):
    dense = mlp.forward  # the bound forward in use (the class's, or e.g. accelerate's wrapper)

    def forward(x, *args, **kwargs):
        table = _active.get()
        fn = table.get(id(mlp)) if table else None
        return dense(x, *args, **kwargs) if fn is None else fn(layer_ffn, x)

    forward.bricklab_dense = dense
    return forward


def _acquire(model) -> None:
    with _lock:
        entry = _installed.get(model)
        if entry is None:
            mlps = [_mlp(model, layer) for layer in range(len(models.blocks(model)))]
            ffns = [ffn(model, layer) for layer in range(len(mlps))]  # may raise: nothing patched yet
            own = [vars(mlp).get("forward") for mlp in mlps]  # an instance forward set by someone else
            for mlp, layer_ffn in zip(mlps, ffns, strict=True):
                mlp.forward = _dispatcher(mlp, layer_ffn)  # an instance attribute, not a hook
            entry = _installed[model] = [0, mlps, own]
        entry[0] += 1


def _release(model) -> None:
    with _lock:
        entry = _installed[model]
        entry[0] -= 1
        if entry[0] == 0:
            for mlp, own in zip(entry[1], entry[2], strict=True):
                del mlp.forward
                if own is not None:
                    mlp.forward = own
            del _installed[model]


def patched_count(model) -> int:
    """MLPs whose forward is currently bricklab's dispatcher (0 outside every sparse context)."""
    return sum(hasattr(vars(m).get("forward"), "bricklab_dense") for m in model.modules())


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
    mine = dict(_active.get() or {}) | {id(_mlp(model, layer)): fn for layer, fn in per_layer.items()}
    _acquire(model)
    token = _active.set(mine)
    try:
        yield
    finally:
        _active.reset(token)
        _release(model)


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
            self._cache[key] = (idx, gu.flatten(0, 1), bias, rows, scale, const)
        return self._cache[key]

    def __call__(self, f: Ffn, x: torch.Tensor) -> torch.Tensor:
        idx, gu, bias, rows, scale, const = self._weights(f)
        h = F.linear(x, gu, bias).unflatten(-1, (-1, 2))  # (..., n, 2)
        a = f.act(h[..., 0]) * h[..., 1]
        if scale is not None:
            a = a * scale
        if f.transformed():
            return f.full_down(a, idx, self.add)
        out = f.down_bias(a @ rows)
        return out if const is None else out + const


def _paired(f: Ffn, idx: torch.Tensor | None = None):
    """Gate and up rows interleaved per neuron, (n, 2, d_model), and their biases (n, 2) or None."""
    pick = (lambda w: w) if idx is None else (lambda w: w.index_select(0, idx))
    gu = torch.stack((pick(f.gate.detach()), pick(f.up.detach())), dim=1).contiguous()
    if f.gate_bias is None:
        return gu, None
    return gu, torch.stack((pick(f.gate_bias.detach()), pick(f.up_bias.detach())), dim=1).flatten()


def from_plan(plan: dict) -> dict[int, LayerFn]:
    """Sparse layer functions for a compiled brick plan ({layer: LayerPlan(scale, add)}): the same
    outputs as core.interventions.apply_plan within float tolerance, without the zeroed neurons."""
    return {int(layer): KeepOnly(lp.scale != 0, lp.scale, lp.add) for layer, lp in plan.items()}


def _packed_weights(f: Ffn):
    """(gate/up rows interleaved (d_ff, 2, d), their biases (d_ff, 2) or None, W_down.T (d_ff, d)):
    a copy of the layer's FFN weights laid out so a set of neurons is one index_select away.
    Cached per layer for the model's lifetime (about the size of the FFN weights)."""
    weight = f.down.weight
    per = _packed.setdefault(f.down, {})
    key = (weight.device, weight.dtype)
    if key not in per:
        gu, bias = _paired(f)
        per[key] = (gu, None if bias is None else bias.view(-1, 2), weight.detach().T.contiguous())
    return per[key]


class TopBricks:
    """Per token, keep the k bricks of the layer with the most activation mass sum |a|; zero the rest.

    With `router` = (w_in (d_model, r), w_out (r, n_bricks), bias (n_bricks,)), the predicted mass
    (x @ w_in) @ w_out + bias proposes `proposed` >= k bricks per token and only their neurons are
    computed; when it proposes more than k, their true mass picks the k (verification). Without a
    router every neuron's gate and up run and the true mass picks (the oracle); the down projection
    still runs only for the kept neurons. Several tokens (a prompt) are computed for the union of
    their bricks, or densely with a mask when that union covers over `dense_above` of the layer;
    one token on the CPU (generation) goes through one numba kernel that reads only the rows it uses.
    """

    def __init__(self, brick_of, k: int, router=None, proposed: int | None = None, dense_above: float = 0.6):
        brick_of = np.asarray(brick_of, dtype=np.int64)  # (d_ff,) brick of each neuron
        self.brick_of, self.n_bricks = torch.from_numpy(brick_of), int(brick_of.max()) + 1
        self.proposed = k if proposed is None or router is None else proposed
        if not 1 <= k <= self.proposed <= self.n_bricks:
            raise ValueError(f"need 1 <= k ({k}) <= proposed ({self.proposed}) <= bricks ({self.n_bricks})")
        self.k, self.dense_above = k, dense_above
        self.order = np.argsort(brick_of, kind="stable")  # neurons grouped by brick ...
        self.starts = np.searchsorted(brick_of[self.order], np.arange(self.n_bricks + 1))  # ... brick b's
        none = (np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.float32))
        self.router = none if router is None else tuple(np.ascontiguousarray(w, np.float32) for w in router)
        self._weights = {}  # the router on the activation's device and dtype

    def score(self, x: torch.Tensor) -> torch.Tensor | None:
        """Predicted mass (..., n_bricks), or None for the oracle."""
        if not self.router[0].size:
            return None
        key = (x.device, x.dtype)
        if key not in self._weights:
            self._weights[key] = [torch.from_numpy(w).to(*key) for w in self.router]
        w_in, w_out, bias = self._weights[key]
        return torch.addmm(bias, x.reshape(-1, x.shape[-1]) @ w_in, w_out).reshape(*x.shape[:-1], -1)

    @staticmethod
    def top(values: torch.Tensor, k: int) -> torch.Tensor:
        """bool (..., n_bricks): the k largest per token."""
        picked = values.topk(k, dim=-1, sorted=False).indices
        return torch.zeros_like(values, dtype=torch.bool).scatter_(-1, picked, True)

    def __call__(self, f: Ffn, x: torch.Tensor) -> torch.Tensor:
        one = x.numel() == x.shape[-1] and x.device.type == "cpu" and x.dtype == torch.float32
        if one and f.silu and f.gate_bias is None and not f.transformed():
            gu, _, rows = _packed_weights(f)
            out = np.empty(x.shape[-1], np.float32)
            args = (self.order, self.starts, gu.numpy(), rows.numpy(), self.proposed, self.k, out)
            _route_one(x.detach().reshape(-1).numpy(), *self.router, *args)
            return f.down_bias(torch.from_numpy(out).reshape(x.shape))
        return self.dense_or_union(f, x)

    def _neurons(self, chosen: torch.Tensor | None, brick_of: torch.Tensor) -> torch.Tensor | None:
        """Sorted neuron indices of the bricks any token chose; None for all (or most) of them."""
        if chosen is None:
            return None
        union = chosen.reshape(-1, self.n_bricks).any(dim=0)[brick_of]  # (d_ff,)
        return None if union.sum() > self.dense_above * len(brick_of) else union.nonzero().squeeze(-1)

    def dense_or_union(self, f: Ffn, x: torch.Tensor) -> torch.Tensor:
        """The torch path (any number of tokens, any device; the twin of the one-token kernel)."""
        brick_of = self.brick_of.to(x.device)
        scores = self.score(x)
        proposal = None if scores is None else self.top(scores, self.proposed)
        idx = self._neurons(proposal, brick_of)
        a = f.activations(x) if idx is None else _gate_up(f, x, idx)  # (..., n_idx)
        own = brick_of if idx is None else brick_of[idx]
        chosen = proposal
        if proposal is None or self.proposed > self.k:
            mass = a.new_zeros((*a.shape[:-1], self.n_bricks)).index_add_(-1, own, a.abs())
            chosen = self.top(mass if proposal is None else mass.masked_fill(~proposal, -1.0), self.k)
        a = a * chosen[..., own]
        keep = self._neurons(chosen, brick_of)
        if keep is None:
            return f.down(a) if idx is None else f.full_down(a, idx)
        a = a[..., keep if idx is None else torch.searchsorted(idx, keep)]
        if f.transformed():
            return f.full_down(a, keep)
        return f.down_bias(a @ _packed_weights(f)[2].index_select(0, keep))


def _gate_up(f: Ffn, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """a for the neurons `idx` only, (..., len(idx)): their weight rows gathered, then one matmul."""
    gu, bias, _ = _packed_weights(f)
    h = F.linear(x, gu.index_select(0, idx).flatten(0, 1), None if bias is None else bias[idx].flatten())
    h = h.unflatten(-1, (-1, 2))  # (..., n, 2)
    return f.act(h[..., 0]) * h[..., 1]


@njit(cache=True, fastmath=True)
def _route_one(x, w_in, w_out, bias, order, starts, gu, rows, proposed, k, out):
    """One token through a SiLU-gated FFN under top-k brick routing, reading only the weight rows of
    the neurons it computes: out = sum over the kept bricks' neurons i of a_i * rows[i], with
    a_i = silu(gu[i, 0] . x) * (gu[i, 1] . x). Bricks are proposed by the router's predicted mass
    (all of them when w_in is empty: the oracle) and the `k` with the most true mass are kept."""
    n_bricks = starts.shape[0] - 1
    if w_in.shape[0] == 0:
        prop = np.arange(n_bricks)
    else:
        z = np.zeros(w_in.shape[1], np.float32)
        for t in range(x.shape[0]):
            _axpy(x[t], w_in[t], z)
        score = bias.copy()
        for j in range(z.shape[0]):
            _axpy(z[j], w_out[j], score)
        prop = np.arange(n_bricks)
        if proposed < n_bricks:  # sorted, so that weight rows are read in memory order
            prop = np.sort(np.argpartition(-score, proposed - 1)[:proposed])
    size = 0
    for b in prop:
        size += starts[b + 1] - starts[b]
    act, mass = np.empty(size, np.float32), np.zeros(prop.shape[0], np.float32)
    p = 0
    for q in range(prop.shape[0]):
        for m in range(starts[prop[q]], starts[prop[q] + 1]):
            row = gu[order[m]]
            g, u = np.float32(0.0), np.float32(0.0)
            for t in range(x.shape[0]):
                g += row[0, t] * x[t]
                u += row[1, t] * x[t]
            act[p] = g / (np.float32(1.0) + np.exp(-g)) * u
            mass[q] += abs(act[p])
            p += 1
    kept = np.ones(prop.shape[0], np.bool_)
    if k < prop.shape[0]:
        kept[:] = False
        kept[np.argpartition(-mass, k - 1)[:k]] = True
    out[:] = 0.0
    p = 0
    for q in range(prop.shape[0]):
        for m in range(starts[prop[q]], starts[prop[q] + 1]):
            if kept[q]:
                _axpy(act[p], rows[order[m]], out)
            p += 1


@njit(cache=True, fastmath=True, inline="always")
def _axpy(a, x, y):
    """y += a * x, in place without a temporary."""
    for t in range(y.shape[0]):
        y[t] += a * x[t]
