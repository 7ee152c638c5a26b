"""Brick coherence: how much more a brick's neurons fire together than with the rest of their layers.

Over the run's tokens (its token sample, core.bricks.firing: every token today), C_ij counts the
tokens where neurons i and j both fire (i, j in any layers: every layer's firing bits cover the same
tokens) and n_ij = C_ij / sqrt(C_ii C_jj) (0 for a neuron that never fires) is their normalised
co-activation (the cosine of their firing vectors). For a brick B spanning layers L:
    inside(B)    = mean of n_ij over ordered pairs i != j of B
    outside(B)   = mean of n_ij over i in B and j in layers L but not in B
    coherence(B) = inside(B) / outside(B); None when B has one neuron, L has no other neuron, or
                   outside(B) = 0.
With w_j = C_jj ** -0.5 and per token u_t = sum of w over B's neurons firing at t (v_t: over all of
L's), sum_{i,j in B} n_ij = sum_t u_t^2 and sum_{i in B, j in L} n_ij = sum_t u_t v_t, so the means
need two passes over the packed bits, not an (|L| d_ff)^2 matrix; coherence_numpy is the slow twin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from core.bricks.firing import RunFiring
from core.errors import BricklabError
from core.kernels import coact as kernels
from core.store import Store

Neurons = Mapping[int, tuple[int, ...]]  # layer -> indices, as in core.configuration.Brick


@dataclass(frozen=True)
class Coherence:
    inside: float | None  # mean n_ij within the brick
    outside: float | None  # mean n_ij between the brick and the rest of its layers
    score: float | None  # inside / outside


class Firing:
    """A run's firing bits, read one layer at a time and kept, with each neuron's 1/sqrt(count)."""

    def __init__(self, read: Callable[[int], np.ndarray], n_layers: int, d_ff: int):
        self._read, self.n_layers, self.d_ff = read, n_layers, d_ff
        self._layers: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def of_run(cls, store: Store, run_id: str | None) -> Firing:
        """The run's token sample (core.bricks.firing): every token of the run where it holds them all."""
        run = store.require_run(run_id)
        return cls(RunFiring(store, run).sample, run.n_layers, run.d_ff)

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(token-major bits (n_tokens, words), w (d_ff,) float64 = count ** -0.5, 0 if silent)."""
        if layer not in self._layers:
            bits = np.ascontiguousarray(self._read(layer), dtype=np.uint64)
            counts = _column_sums(bits, np.ones(len(bits)), self.d_ff)
            w = np.divide(1.0, np.sqrt(counts), out=np.zeros_like(counts), where=counts > 0)
            self._layers[layer] = bits, w
        return self._layers[layer]

    @property
    def n_tokens(self) -> int:
        bits, _ = next(iter(self._layers.values())) if self._layers else self.layer(0)
        return len(bits)  # every layer covers the same tokens

    def check(self, neurons: Neurons, name: str) -> None:
        for layer, indices in neurons.items():
            if layer >= self.n_layers or (indices and max(indices) >= self.d_ff):
                raise BricklabError(
                    f"Brick {name!r} has neurons outside this run's {self.n_layers} x {self.d_ff} layers.",
                    "Edit bricks made for the model of this run.",
                )


# --- kernels over packed bits: one pass over the set bits, no (n, n) matrix ----------------------


@intrinsic
def _trailing_zeros(typingctx, x):
    """Index of the lowest set bit of a non-zero uint64, as LLVM's cttz (one TZCNT)."""
    if not (isinstance(x, types.Integer) and x.bitwidth == 64 and not x.signed):
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(x), codegen


@njit(cache=True)
def _row_sums_kernel(token_bits, weights):
    """out[t] = sum_j weights[j] * bit j of token t; weights cover every bit of a word.

    Visits only the set bits (about a tenth): a serial sum over all 64 is ~6x slower."""
    n_tokens, n_words = token_bits.shape
    out = np.zeros(n_tokens)
    for t in range(n_tokens):
        s = 0.0
        for w in range(n_words):
            word = token_bits[t, w]
            while word:
                s += weights[64 * w + np.int64(_trailing_zeros(word))]
                word &= word - np.uint64(1)  # clear the lowest set bit
        out[t] = s
    return out


@njit(cache=True)
def _column_sums_kernel(token_bits, values):
    """out[j] = sum_t values[t] * bit j of token t, for every bit of a word."""
    n_tokens, n_words = token_bits.shape
    out = np.zeros(64 * n_words)
    for t in range(n_tokens):
        v = values[t]
        if v == 0:
            continue
        for w in range(n_words):
            word = token_bits[t, w]
            for b in range(64):
                if (word >> np.uint64(b)) & np.uint64(1):
                    out[64 * w + b] += v
    return out


def _row_sums(bits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    padded = np.zeros(64 * bits.shape[1])
    padded[: len(weights)] = weights
    return _row_sums_kernel(bits, padded)


def _column_sums(bits: np.ndarray, values: np.ndarray, n_neurons: int) -> np.ndarray:
    return _column_sums_kernel(bits, np.ascontiguousarray(values, dtype=np.float64))[:n_neurons]


# --- coherence and affinity --------------------------------------------------------------------


def _members(firing: Firing, neurons: Neurons) -> tuple[np.ndarray, int]:
    """(u (n_tokens,): sum of w over the brick's neurons firing at each token, members that fire)."""
    u, firing_members = np.zeros(firing.n_tokens), 0
    for layer, indices in neurons.items():
        bits, w = firing.layer(layer)
        mine = np.zeros(firing.d_ff)
        mine[list(indices)] = w[list(indices)]
        u += _row_sums(bits, mine)
        firing_members += int(np.count_nonzero(mine))
    return u, firing_members


def coherence(firing: Firing, neurons: Neurons) -> Coherence:
    """The brick's inside and outside mean normalised co-activation and their ratio."""
    u, firing_members = _members(firing, neurons)
    v = sum(_row_sums(*firing.layer(layer)) for layer in neurons)
    size = sum(len(i) for i in neurons.values())
    others = len(neurons) * firing.d_ff - size
    uu = float(u @ u)
    inside = (uu - firing_members) / (size * (size - 1)) if size > 1 else None
    outside = (float(u @ v) - uu) / (size * others) if others > 0 else None
    score = inside / outside if inside is not None and outside else None
    return Coherence(inside, outside, score)


def affinity(firing: Firing, neurons: Neurons, layers: list[int]) -> dict[int, np.ndarray]:
    """Per layer, (d_ff,) float64: sum over the brick's other neurons i of n_ij, for every neuron j."""
    u, _ = _members(firing, neurons)
    out = {}
    for layer in layers:
        bits, w = firing.layer(layer)
        sums = w * _column_sums(bits, u, firing.d_ff)
        own = list(neurons.get(layer, ()))
        sums[own] -= w[own] > 0  # a member's n_jj = 1 is not an affinity
        out[layer] = sums
    return out


def member_counts(firing: Firing, neurons: Neurons) -> np.ndarray:
    """int32 (size, size) co-activation counts among the brick's neurons, in (layer, index) order."""
    rows = [
        kernels.transpose_bits(firing.layer(layer)[0], firing.d_ff)[list(indices)]
        for layer, indices in sorted(neurons.items())
    ]
    neuron_bits = np.ascontiguousarray(np.concatenate(rows))
    return kernels.coactivation_counts(neuron_bits, len(neuron_bits), neuron_major=True)


# --- numpy twins: slow and obviously correct; the tests hold the fast paths to them -------------


def _normalised_numpy(fired: np.ndarray) -> np.ndarray:
    c = fired.T.astype(np.float64) @ fired.astype(np.float64)
    d = np.sqrt(np.diag(c))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.outer(d, d) > 0, c / np.outer(d, d), 0.0)


def _stacked_numpy(bits: Mapping[int, np.ndarray], neurons: Neurons, d_ff: int, layers=None):
    layers = sorted(layers or neurons)
    fired = np.concatenate([kernels.unpack_bits(bits[layer], d_ff) for layer in layers], axis=1)
    member = np.zeros(fired.shape[1], bool)
    for k, layer in enumerate(layers):
        member[k * d_ff + np.asarray(neurons.get(layer, ()), dtype=np.int64)] = True
    return _normalised_numpy(fired), member, layers


def coherence_numpy(bits: Mapping[int, np.ndarray], neurons: Neurons, d_ff: int) -> Coherence:
    n, member, _ = _stacked_numpy(bits, neurons, d_ff)
    inner = n[np.ix_(member, member)]
    off_diagonal = ~np.eye(len(inner), dtype=bool)
    inside = float(inner[off_diagonal].mean()) if off_diagonal.any() else None
    cross = n[np.ix_(member, ~member)]
    outside = float(cross.mean()) if cross.size else None
    score = inside / outside if inside is not None and outside else None
    return Coherence(inside, outside, score)


def affinity_numpy(bits: Mapping[int, np.ndarray], neurons: Neurons, d_ff: int, layers: list[int]):
    """affinity(): layers must include the brick's."""
    n, member, layers = _stacked_numpy(bits, neurons, d_ff, layers)
    np.fill_diagonal(n, 0.0)
    sums = n[member].sum(axis=0)
    return {layer: sums[k * d_ff : (k + 1) * d_ff] for k, layer in enumerate(layers)}
