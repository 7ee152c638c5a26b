"""Token routing inside one FFN layer: per token, keep the k bricks with the most activation mass,
proposed by a learned map, by the gate's own activations (as in CATS) or by the true mass (the
oracle). Prompts run through torch; one generated token on the CPU runs through a numba kernel.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from core.sparse import Ffn, down_rows, gate_up

ORACLE, LEARNED, GATE = 0, 1, 2  # how bricks are proposed (the kernel's `mode`)


class TopBricks:
    """Per token, keep the k bricks of the layer with the most activation mass sum |a|; zero the rest.

    Proposals: with `router` = (w_in (d_model, r), w_out (r, n_bricks), bias (n_bricks,)) the
    predicted mass (x @ w_in) @ w_out + bias; with `gate` the gate mass sum |act(gate_i . x)| (every
    neuron's gate runs, up and down only for proposed ones); with neither every brick (the oracle).
    The `proposed` best bricks are computed; when that is more than k, their true mass picks the k
    (verification). The down projection runs only for the kept neurons. Several tokens (a prompt) are
    computed for the union of their bricks, or densely with a mask when that union covers over
    `dense_above` of the layer; one token on the CPU goes through one numba kernel that reads only
    the weight rows it uses.
    """

    def __init__(
        self, brick_of, k: int, router=None, proposed: int | None = None, dense_above=0.6, gate=False
    ):
        brick_of = np.asarray(brick_of, dtype=np.int64)  # (d_ff,) brick of each neuron
        self.brick_of, self.n_bricks = torch.from_numpy(brick_of), int(brick_of.max()) + 1
        if router is not None and gate:
            raise ValueError("propose by a learned router or by the gate, not both")
        self.mode = GATE if gate else ORACLE if router is None else LEARNED
        self.proposed = self.n_bricks if self.mode == ORACLE else k if proposed is None else proposed
        if not 1 <= k <= self.proposed <= self.n_bricks:
            raise ValueError(f"need 1 <= k ({k}) <= proposed ({self.proposed}) <= bricks ({self.n_bricks})")
        self.k, self.dense_above = k, dense_above
        self.order = np.argsort(brick_of, kind="stable")  # neurons grouped by brick ...
        self.starts = np.searchsorted(brick_of[self.order], np.arange(self.n_bricks + 1))  # ... brick b's
        none = (np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.float32))
        self.router = none if router is None else tuple(np.ascontiguousarray(w, np.float32) for w in router)
        self._weights = {}  # the router on the activation's device and dtype

    def score(self, x: torch.Tensor, f: Ffn | None = None) -> torch.Tensor | None:
        """Proposal scores (..., n_bricks): predicted mass, or gate mass (needs `f`); None for the oracle."""
        if self.mode == GATE:
            gate_mass = f.act(torch.nn.functional.linear(x, f.gate, f.gate_bias)).abs()
            return gate_mass.new_zeros((*x.shape[:-1], self.n_bricks)).index_add_(
                -1, self.brick_of.to(x.device), gate_mass
            )
        if self.mode == ORACLE:
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
            out = np.empty(x.shape[-1], np.float32)
            gate, up = f.gate.detach().numpy(), f.up.detach().numpy()
            args = (self.order, self.starts, gate, up, down_rows(f).numpy(), self.proposed, self.k, out)
            _route_one(x.detach().reshape(-1).numpy(), self.mode, *self.router, *args)
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
        scores = self.score(x, f)
        proposal = None if scores is None else self.top(scores, self.proposed)
        idx = self._neurons(proposal, brick_of)
        a = f.activations(x) if idx is None else gate_up(f, x, idx)  # (..., n_idx)
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
        return f.down_bias(a @ down_rows(f).index_select(0, keep))


@njit(cache=True, fastmath=True)
def _route_one(x, mode, w_in, w_out, bias, order, starts, gate, up, rows, proposed, k, out):
    """One token through a SiLU-gated FFN under top-k brick routing, reading only the weight rows of
    the neurons it computes: out = sum over the kept bricks' neurons i of a_i * rows[i], with
    a_i = silu(gate[i] . x) * (up[i] . x). Bricks are proposed (mode: all of them, the learned map's
    predicted mass, or the gate mass of every neuron) and the `k` with the most true mass are kept."""
    n_bricks, d_ff = starts.shape[0] - 1, gate.shape[0]
    silu = np.empty(d_ff if mode == GATE else 0, np.float32)
    score = np.zeros(n_bricks, np.float32)
    if mode == GATE:  # every gate row, in memory order
        for i in range(d_ff):
            silu[i] = _silu(_dot(gate[i], x))
        for b in range(n_bricks):
            for m in range(starts[b], starts[b + 1]):
                score[b] += abs(silu[order[m]])
    elif mode == LEARNED:
        z = np.zeros(w_in.shape[1], np.float32)
        for t in range(x.shape[0]):
            _axpy(x[t], w_in[t], z)
        score[:] = bias
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
            i = order[m]
            s = silu[i] if mode == GATE else _silu(_dot(gate[i], x))
            act[p] = s * _dot(up[i], x)
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
def _dot(a, b):
    acc = np.float32(0.0)
    for t in range(a.shape[0]):
        acc += a[t] * b[t]
    return acc


@njit(cache=True, fastmath=True, inline="always")
def _silu(g):
    return g / (np.float32(1.0) + np.exp(-g))


@njit(cache=True, fastmath=True, inline="always")
def _axpy(a, x, y):
    """y += a * x, in place without a temporary."""
    for t in range(y.shape[0]):
        y[t] += a * x[t]
