"""numba kernels for one token (generation) through a SiLU-gated FFN, reading only the weight rows of
the neurons that run: a fixed set packed contiguously (keep-only), or top-k bricks per token."""

import numpy as np
from numba import njit

ORACLE, LEARNED, GATE = 0, 1, 2  # how route_one proposes bricks (its `mode`)
STREAM_ABOVE = 0.5  # route_one computes gate and up for every neuron when it needs more than this share


@njit(cache=True, fastmath=True)
def route_one(x, mode, w_in, w_out, bias, order, starts, gate, up, rows, proposed, k, out):
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
    # Reading most rows one by one is slower than reading all of them in one stream (measured:
    # gathering 70% of the rows costs more than all of them), so then every neuron is computed.
    streamed = np.empty(d_ff if STREAM_ABOVE * d_ff < size else 0, np.float32)
    for i in range(streamed.shape[0]):
        streamed[i] = (silu[i] if mode == GATE else _silu(_dot(gate[i], x))) * _dot(up[i], x)
    p = 0
    for q in range(prop.shape[0]):
        for m in range(starts[prop[q]], starts[prop[q] + 1]):
            i = order[m]
            if streamed.shape[0]:
                act[p] = streamed[i]
            else:
                act[p] = (silu[i] if mode == GATE else _silu(_dot(gate[i], x))) * _dot(up[i], x)
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


@njit(cache=True, fastmath=True)
def keep_one(x, gu, rows, scale, out):
    """One token through a SiLU-gated FFN restricted to a fixed neuron set, packed contiguously
    (gu (n, 2, d_model): gate and up rows per neuron; rows (n, d_model): W_down columns), read as
    one stream: out = sum_i scale_i * silu(gu[i, 0] . x) * (gu[i, 1] . x) * rows[i]."""
    out[:] = 0.0
    for i in range(gu.shape[0]):
        a = _silu(_dot(gu[i, 0], x)) * _dot(gu[i, 1], x)
        if scale.shape[0]:
            a *= scale[i]
        _axpy(a, rows[i], out)
