"""Triton kernels for one decoded token with activation sparsity (as in TEAL): a projection skips its
inputs under a threshold, so the weight rows they would multiply are never read. Weights are laid out
input-major (W.T, contiguous), so a skipped input is one skipped contiguous row. Two ways to skip:
`tile` programs each own a (rows x columns) tile and load only the kept rows of it; `listed` first lists
the kept inputs per chunk of inputs (one small kernel), then one program per chunk and block of outputs
reads only full blocks of kept rows, so that its work shrinks with the share kept. The FFN (gate and up
skip inputs |x_k| < t_x, down skips neurons |a_i| < tau * max|a|) and any other projection (attention's
q/k/v and o) use them. `reference` and `proj_reference` are the masked dense computations they equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_kernel(
    x_ptr, w_ptr, out_ptr, scale_ptr, threshold, k_total, n_total,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RELATIVE: tl.constexpr,
):  # fmt: skip
    """out[n] += sum_k w[k, n] x_k over this program's BLOCK_K inputs with |x_k| >= threshold (times
    scale[0] when RELATIVE). A row whose input is skipped issues no load; a tile with no kept row ends."""
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    xk = tl.load(x_ptr + ks, mask=ks < k_total, other=0.0).to(tl.float32)
    if RELATIVE:
        threshold = threshold * tl.load(scale_ptr)
    keep = (tl.abs(xk) >= threshold) & (ks < k_total)
    if tl.sum(keep.to(tl.int32), axis=0) > 0:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = w_ptr + ks.to(tl.int64)[:, None] * n_total
        w = tl.load(rows + cols[None, :], mask=keep[:, None] & (cols < n_total)[None, :], other=0.0)
        part = tl.sum(w.to(tl.float32) * xk[:, None], axis=0)
        tl.atomic_add(out_ptr + cols, part, mask=cols < n_total, sem="relaxed")


@triton.jit
def _listed_kernel(
    idx_ptr, val_ptr, count_ptr, w_ptr, out_ptr, n_total,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, AHEAD: tl.constexpr,
):  # fmt: skip
    """out[n] += sum_j w[idx_j, n] val_j over the kept inputs of chunk program_id(1), which _list_kernel
    listed at idx[chunk * CHUNK :][: count[chunk]]: every step reads BLOCK_K kept rows. AHEAD: the next
    step's rows are requested before this step's are used (and the indices two steps ahead), so that
    a program has two blocks of rows in flight instead of waiting for each."""
    chunk = tl.program_id(1)
    lo = chunk * CHUNK
    hi = lo + tl.load(count_ptr + chunk)
    if lo < hi:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = (cols < n_total)[None, :]
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        if AHEAD:
            jj = lo + tl.arange(0, BLOCK_K)
            v = tl.load(val_ptr + jj, mask=jj < hi, other=0.0)
            r = tl.load(idx_ptr + jj, mask=jj < hi, other=0)
            w = tl.load(w_ptr + r.to(tl.int64)[:, None] * n_total + cols[None, :],
                        mask=(jj < hi)[:, None] & inside, other=0.0)  # fmt: skip
            jn = jj + BLOCK_K
            vn = tl.load(val_ptr + jn, mask=jn < hi, other=0.0)
            rn = tl.load(idx_ptr + jn, mask=jn < hi, other=0)
            for j in range(lo, hi, BLOCK_K):
                j2 = j + 2 * BLOCK_K + tl.arange(0, BLOCK_K)
                v2 = tl.load(val_ptr + j2, mask=j2 < hi, other=0.0)
                r2 = tl.load(idx_ptr + j2, mask=j2 < hi, other=0)
                j1 = j + BLOCK_K + tl.arange(0, BLOCK_K)
                wn = tl.load(w_ptr + rn.to(tl.int64)[:, None] * n_total + cols[None, :],
                             mask=(j1 < hi)[:, None] & inside, other=0.0)  # fmt: skip
                acc += w.to(tl.float32) * v[:, None]
                w, v, vn, rn = wn, vn, v2, r2
        else:
            for j in range(lo, hi, BLOCK_K):
                jj = j + tl.arange(0, BLOCK_K)
                valid = jj < hi
                r = tl.load(idx_ptr + jj, mask=valid, other=0)
                v = tl.load(val_ptr + jj, mask=valid, other=0.0)
                w = tl.load(w_ptr + r.to(tl.int64)[:, None] * n_total + cols[None, :],
                            mask=valid[:, None] & inside, other=0.0)  # fmt: skip
                acc += w.to(tl.float32) * v[:, None]
        tl.atomic_add(out_ptr + cols, tl.sum(acc, axis=0), mask=cols < n_total, sem="relaxed")


@triton.jit
def _list_kernel(x_ptr, threshold, k_total, idx_ptr, val_ptr, count_ptr, zero_ptr, n_zero,
                 CHUNK: tl.constexpr):  # fmt: skip
    """Program c lists the inputs |x_k| >= threshold of chunk c (k in [c CHUNK, (c + 1) CHUNK)) in
    order: indices and values (float32) from idx[c CHUNK], their number in count[c]. It also zeroes
    its share of zero_ptr[:n_zero] (the sums the next kernels accumulate into)."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + offs, mask=offs < k_total, other=0.0).to(tl.float32)
    _list_chunk(x, tl.abs(x) >= threshold, offs, c, k_total, idx_ptr, val_ptr, count_ptr, CHUNK)
    per = tl.cdiv(n_zero, tl.num_programs(0))
    for z in range(c * per, tl.minimum(c * per + per, n_zero), CHUNK):
        zs = z + tl.arange(0, CHUNK)
        tl.store(
            zero_ptr + zs, tl.zeros([CHUNK], dtype=tl.float32), mask=zs < tl.minimum(c * per + per, n_zero)
        )


@triton.jit
def _list_chunk(x, keep, offs, c, k_total, idx_ptr, val_ptr, count_ptr, CHUNK: tl.constexpr):
    keep = keep & (offs < k_total)
    slot = c * CHUNK + tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + slot, offs, mask=keep)
    tl.store(val_ptr + slot, x, mask=keep)
    tl.store(count_ptr + c, tl.sum(keep.to(tl.int32), axis=0))


@triton.jit
def _act_list_kernel(gu_ptr, tau, d_ff, idx_ptr, val_ptr, count_ptr, CHUNK: tl.constexpr, ALL: tl.constexpr):
    """a = silu(g) * u from gu = [g, u]; program c lists the neurons |a_i| >= tau * max|a| of its chunk
    (as _list_kernel). Every program finds max|a| over all neurons itself: no second launch."""
    top = 0.0
    if tau > 0:
        for s in range(0, d_ff, ALL):
            offs = s + tl.arange(0, ALL)
            g = tl.load(gu_ptr + offs, mask=offs < d_ff, other=0.0)
            u = tl.load(gu_ptr + d_ff + offs, mask=offs < d_ff, other=0.0)
            top = tl.maximum(top, tl.max(tl.abs(g * tl.sigmoid(g) * u), axis=0))
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    g = tl.load(gu_ptr + offs, mask=offs < d_ff, other=0.0)
    u = tl.load(gu_ptr + d_ff + offs, mask=offs < d_ff, other=0.0)
    a = g * tl.sigmoid(g) * u
    _list_chunk(a, tl.abs(a) >= tau * top, offs, c, d_ff, idx_ptr, val_ptr, count_ptr, CHUNK)


@triton.jit
def _act_kernel(gu_ptr, a_ptr, amax_ptr, d_ff, BLOCK: tl.constexpr):
    """a = silu(g) * u from the gate/up sums gu = [g, u]; max |a| into amax (zero before)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < d_ff
    g = tl.load(gu_ptr + offs, mask=valid, other=0.0)
    u = tl.load(gu_ptr + d_ff + offs, mask=valid, other=0.0)
    a = g * tl.sigmoid(g) * u
    tl.store(a_ptr + offs, a, mask=valid)
    tl.atomic_max(amax_ptr, tl.max(tl.abs(a), axis=0), sem="relaxed")  # |a| >= 0: orders like int max


@dataclass(frozen=True)
class Launch:
    """How one product is launched: `listed` (the kept inputs listed per chunk of `chunk` inputs, one
    program per chunk and block of outputs) or tiles of block_k inputs; block_n outputs a program;
    warps a program. block_k: kept rows a step when listed."""

    listed: bool = False
    block_k: int = 32
    block_n: int = 256
    warps: int = 4
    chunk: int = 256  # listed only
    ahead: bool = True  # listed only: request the next step's rows before using this step's


@dataclass(frozen=True)
class Tiles:
    """Launch shapes per product. The defaults were the fastest of benchmarks/sparse_kernels.py on an
    H200 for Llama-3-8B's shapes (by the time at 40% plus at 50% skipped, 2026-12-03): listing pays for
    gate+up; for down (inside the FFN, where listing the neurons needs max|a| first), q/k/v and o, tiles
    of 64-128 rows by 64 columns were as fast or faster. Reading ahead never won there."""

    gate_up: Launch = Launch(listed=True, block_k=16, block_n=512, warps=4, chunk=512, ahead=False)
    down: Launch = Launch(listed=False, block_k=128, block_n=64, warps=2)
    qkv: Launch = Launch(listed=False, block_k=128, block_n=64, warps=2)
    o: Launch = Launch(listed=False, block_k=128, block_n=64, warps=2)


TILES = Tiles()


@dataclass(frozen=True)
class Packed:
    """One layer's FFN weights input-major: [gate.T | up.T] (d_model, 2 d_ff), down.T (d_ff, d_model)."""

    gate_up_t: torch.Tensor
    down_t: torch.Tensor

    @classmethod
    def of(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> Packed:
        """From nn.Linear weights: gate, up (d_ff, d_model), down (d_model, d_ff)."""
        return cls(input_major(gate, up), input_major(down))


def input_major(*weights: torch.Tensor) -> torch.Tensor:
    """nn.Linear weights (n_i, k) side by side input-major: (k, sum n_i), contiguous."""
    return torch.cat([w.detach() for w in weights]).T.contiguous()


def _tile(x, w, out, scale, threshold: float, relative: bool, launch: Launch) -> None:
    k_total, n_total = w.shape
    grid = (triton.cdiv(n_total, launch.block_n), triton.cdiv(k_total, launch.block_k))
    _tile_kernel[grid](
        x, w, out, scale, float(threshold), k_total, n_total,
        BLOCK_K=launch.block_k, BLOCK_N=launch.block_n, RELATIVE=relative, num_warps=launch.warps,
    )  # fmt: skip


def _listed(listing, w, out, launch: Launch) -> None:
    idx, val, count = listing
    n_total = w.shape[1]
    _listed_kernel[(triton.cdiv(n_total, launch.block_n), count.numel())](
        idx, val, count, w, out, n_total,
        CHUNK=launch.chunk, BLOCK_K=launch.block_k, BLOCK_N=launch.block_n, AHEAD=launch.ahead,
        num_warps=launch.warps,
    )  # fmt: skip


def _listing(k: int, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (indices, values, counts) for k inputs listed per chunk."""
    chunks = triton.cdiv(k, chunk)
    idx = torch.empty(chunks * (chunk + 1), dtype=torch.int32, device=device)
    return (
        idx[: chunks * chunk],
        torch.empty(chunks * chunk, dtype=torch.float32, device=device),
        idx[-chunks:],
    )


def _list(x, threshold: float, zero: torch.Tensor, chunk: int):
    """The kept inputs of x listed per chunk; zero[:] = 0 by the same launch."""
    k = x.numel()
    listing = _listing(k, chunk, x.device)
    _list_kernel[(triton.cdiv(k, chunk),)](x, float(threshold), k, *listing, zero, zero.numel(), CHUNK=chunk,
                                           num_warps=4)  # fmt: skip
    return listing


def project(x: torch.Tensor, w_t: torch.Tensor, threshold: float, launch: Launch) -> torch.Tensor:
    """x (k,) -> (n,) float32: x @ w_t over the inputs |x_k| >= threshold; w_t (k, n) input-major."""
    x = x.reshape(-1).contiguous()
    if launch.listed:
        out = torch.empty(w_t.shape[1], dtype=torch.float32, device=x.device)
        _listed(_list(x, threshold, out, launch.chunk), w_t, out, launch)
    else:
        out = torch.zeros(w_t.shape[1], dtype=torch.float32, device=x.device)
        _tile(x, w_t, out, out, threshold, False, launch)
    return out


def ffn_one(x: torch.Tensor, w: Packed, t_x: float, tau: float, tiles: Tiles | None = None) -> torch.Tensor:
    """One token x (d_model,) -> (d_model,) in x's dtype: the FFN over inputs |x_k| >= t_x and neurons
    |a_i| >= tau * max|a| (t_x = tau = 0: dense). Accumulates in float32. Tiles: TILES unless given."""
    t = tiles or TILES
    d_model, d_ff = w.down_t.shape[1], w.down_t.shape[0]
    x = x.reshape(-1).contiguous()
    buf = torch.empty(2 * d_ff + d_model + 1, dtype=torch.float32, device=x.device)  # [g, u], out, max|a|
    gu, out, amax = buf[: 2 * d_ff], buf[2 * d_ff : -1], buf[-1:]
    if t.gate_up.listed:
        _listed(_list(x, t_x, buf, t.gate_up.chunk), w.gate_up_t, gu, t.gate_up)
    else:
        buf.zero_()
        _tile(x, w.gate_up_t, gu, gu, t_x, False, t.gate_up)
    if t.down.listed:
        listing = _listing(d_ff, t.down.chunk, x.device)
        _act_list_kernel[(triton.cdiv(d_ff, t.down.chunk),)](
            gu, float(tau), d_ff, *listing, CHUNK=t.down.chunk, ALL=4096, num_warps=8
        )
        _listed(listing, w.down_t, out, t.down)
    else:
        a = torch.empty(d_ff, dtype=torch.float32, device=x.device)
        _act_kernel[(triton.cdiv(d_ff, 1024),)](gu, a, amax, d_ff, BLOCK=1024, num_warps=4)
        _tile(a, w.down_t, out, amax, tau, True, t.down)
    return out.to(x.dtype)


def proj_reference(x: torch.Tensor, w_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """The masked dense projection, in float64."""
    x64 = x.reshape(-1).double()
    return torch.where(x64.abs() >= threshold, x64, 0.0) @ w_t.double()


def reference(x: torch.Tensor, w: Packed, t_x: float, tau: float) -> torch.Tensor:
    """The masked dense FFN, in float64: the twin the kernels are tested against."""
    g, u = proj_reference(x, w.gate_up_t, t_x).chunk(2)
    a = g * torch.sigmoid(g) * u
    a = torch.where(a.abs() >= tau * a.abs().max(), a, 0.0)
    return a @ w.down_t.double()
