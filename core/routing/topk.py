"""Token routing inside one FFN layer: per token, keep the k bricks with the most activation mass,
proposed by a learned map, by the gate's own activations (as in CATS) or by the true mass (the
oracle). Prompts run through torch; one generated token on the CPU runs through a numba kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from core.kernels.ffn import GATE, LEARNED, ORACLE, route_one
from core.live.sparse import Ffn, down_rows, gate_up, one_token


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
        if one_token(f, x):
            out = np.empty(x.shape[-1], np.float32)
            gate, up = f.gate.detach().numpy(), f.up.detach().numpy()
            args = (self.order, self.starts, gate, up, down_rows(f).numpy(), self.proposed, self.k, out)
            route_one(x.detach().reshape(-1).numpy(), self.mode, *self.router, *args)
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
