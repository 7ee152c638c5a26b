"""Triton kernels for one decoded token through a SiLU-gated FFN with activation sparsity (as in TEAL):
inputs under a threshold are skipped, so the weight rows they would multiply are never read. The gate
and up projections (one product) skip FFN inputs |x_k| < t_x; the down projection skips neurons
|a_i| < tau * max|a|. Weights are laid out input-major (W.T, contiguous), so a skipped input is one
skipped contiguous row. `reference` is the masked dense computation the kernels equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, amax_ptr, threshold, k_total, n_total, per_split,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr, RELATIVE: tl.constexpr,
):  # fmt: skip
    """out[n] += sum_k w[k, n] x_k over this program's inputs with |x_k| >= threshold (times max|x|
    read from amax when RELATIVE). Products are summed per (row, column) and reduced across rows once
    at the end; programs splitting one column block's inputs add their sums atomically."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = tl.program_id(1) * per_split
    hi = tl.minimum(lo + per_split, k_total)
    if RELATIVE:
        threshold = threshold * tl.load(amax_ptr)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            xk = tl.load(x_ptr + ks).to(tl.float32)
            mask = (tl.abs(xk) >= threshold)[:, None]  # constant along a row: a skipped row issues no loads
        else:
            xk = tl.load(x_ptr + ks, mask=ks < hi, other=0.0).to(tl.float32)
            mask = ((tl.abs(xk) >= threshold) & (ks < hi))[:, None] & (cols < n_total)[None, :]
        w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * n_total + cols[None, :], mask=mask, other=0.0)
        acc += w.to(tl.float32) * xk[:, None]
    tl.atomic_add(out_ptr + cols, tl.sum(acc, axis=0), mask=cols < n_total)


@triton.jit
def _gather_kernel(
    x_ptr, w_ptr, out_ptr, amax_ptr, scratch_ptr, threshold, k_total, n_total, per_split,
    PER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, RELATIVE: tl.constexpr,
):  # fmt: skip
    """The same sum as _gemv_kernel, but the program first lists its kept inputs (in order) and then
    loops over those alone: its steps shrink with the share kept, where a masked loop keeps its length."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.program_id(1) * per_split + tl.arange(0, PER)
    own = (tl.arange(0, PER) < per_split) & (offs < k_total)
    xv = tl.load(x_ptr + offs, mask=own, other=0.0).to(tl.float32)
    if RELATIVE:
        threshold = threshold * tl.load(amax_ptr)
    keep = own & (tl.abs(xv) >= threshold)
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    n_kept = tl.sum(keep.to(tl.int32), axis=0)
    listed = scratch_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * PER
    tl.store(listed + slot, offs, mask=keep)
    tl.debug_barrier()  # the list is written by all of the program's threads, read by others
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for j in range(0, n_kept, BLOCK_K):
        jj = j + tl.arange(0, BLOCK_K)
        valid = jj < n_kept
        idx = tl.load(listed + jj, mask=valid, other=0)
        xk = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        mask = valid[:, None] & (cols < n_total)[None, :]
        w = tl.load(w_ptr + idx.to(tl.int64)[:, None] * n_total + cols[None, :], mask=mask, other=0.0)
        acc += w.to(tl.float32) * xk[:, None]
    tl.atomic_add(out_ptr + cols, tl.sum(acc, axis=0), mask=cols < n_total)


@triton.jit
def _act_kernel(gu_ptr, a_ptr, amax_ptr, d_ff, BLOCK: tl.constexpr):
    """a = silu(g) * u from the gate/up sums gu = [g, u]; max |a| into amax."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < d_ff
    g = tl.load(gu_ptr + offs, mask=valid, other=0.0)
    u = tl.load(gu_ptr + d_ff + offs, mask=valid, other=0.0)
    a = g * tl.sigmoid(g) * u
    tl.store(a_ptr + offs, a, mask=valid)
    tl.atomic_max(amax_ptr, tl.max(tl.abs(a), axis=0))  # |a| >= 0: float max orders like int max


@dataclass(frozen=True)
class Tiles:
    """Launch shapes of the two products. The defaults were the fastest of benchmarks/sparse_decode.py
    --sweep on an H200 for Llama-3-8B's shape (all inputs and half of them, summed): long runs of each
    kept row (512 columns) keep DRAM reads efficient when rows are skipped; listing the kept neurons
    first paid for the down projection only (27 against 29 us at half, 2026-12-03)."""

    gu_k: int = 16  # inputs a step, gate/up
    gu_n: int = 512  # outputs a program, gate/up
    gu_split: int = 8  # programs sharing one output block's inputs
    gu_warps: int = 4
    down_k: int = 16  # neurons a step, down
    down_n: int = 512
    down_split: int = 64
    down_warps: int = 4
    gu_gather: bool = False  # list the kept inputs first (_gather_kernel) instead of masking rows
    down_gather: bool = True


TILES = Tiles()


@dataclass(frozen=True)
class Packed:
    """One layer's FFN weights input-major: [gate.T | up.T] (d_model, 2 d_ff), down.T (d_ff, d_model)."""

    gate_up_t: torch.Tensor
    down_t: torch.Tensor

    @classmethod
    def of(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> Packed:
        """From nn.Linear weights: gate, up (d_ff, d_model), down (d_model, d_ff)."""
        gate_up = torch.cat((gate.detach(), up.detach())).T.contiguous()
        return cls(gate_up, down.detach().T.contiguous())


def _gemv(x, w, out, amax, threshold: float, relative: bool, k: int, n: int, split: int, warps: int,
          gather: bool = False):  # fmt: skip
    k_total, n_total = w.shape
    per_split = triton.cdiv(triton.cdiv(k_total, split), k) * k
    if gather:
        per = triton.next_power_of_2(per_split)
        grid = (triton.cdiv(n_total, n), triton.cdiv(k_total, per_split))
        scratch = torch.empty(grid[0] * grid[1] * per, dtype=torch.int32, device=x.device)
        _gather_kernel[grid](
            x, w, out, amax, scratch, float(threshold), k_total, n_total, per_split,
            PER=per, BLOCK_K=k, BLOCK_N=n, RELATIVE=relative, num_warps=warps,
        )  # fmt: skip
        return
    even = k_total % per_split == 0 and n_total % n == 0
    grid = (triton.cdiv(n_total, n), triton.cdiv(k_total, per_split))
    _gemv_kernel[grid](
        x, w, out, amax, float(threshold), k_total, n_total, per_split,
        BLOCK_K=k, BLOCK_N=n, EVEN=even, RELATIVE=relative, num_warps=warps,
    )  # fmt: skip


def ffn_one(x: torch.Tensor, w: Packed, t_x: float, tau: float, tiles: Tiles | None = None) -> torch.Tensor:
    """One token x (d_model,) -> (d_model,) in x's dtype: the FFN over inputs |x_k| >= t_x and neurons
    |a_i| >= tau * max|a| (t_x = tau = 0: dense). Accumulates in float32. Tiles: TILES unless given."""
    t = tiles or TILES
    d_model, d_ff = w.down_t.shape[1], w.down_t.shape[0]
    x = x.reshape(-1).contiguous()
    buf = torch.zeros(2 * d_ff + d_model + 1, dtype=torch.float32, device=x.device)  # [g, u], out, max|a|
    gu, out, amax = buf[: 2 * d_ff], buf[2 * d_ff : -1], buf[-1:]
    a = torch.empty(d_ff, dtype=torch.float32, device=x.device)
    _gemv(x, w.gate_up_t, gu, amax, t_x, False, t.gu_k, t.gu_n, t.gu_split, t.gu_warps, t.gu_gather)
    _act_kernel[(triton.cdiv(d_ff, 1024),)](gu, a, amax, d_ff, BLOCK=1024, num_warps=4)
    _gemv(a, w.down_t, out, amax, tau, True, t.down_k, t.down_n, t.down_split, t.down_warps, t.down_gather)
    return out.to(x.dtype)


def reference(x: torch.Tensor, w: Packed, t_x: float, tau: float) -> torch.Tensor:
    """The masked dense computation, in float64: the twin the kernels are tested against."""
    x64 = x.reshape(-1).double()
    xm = torch.where(x64.abs() >= t_x, x64, 0.0)
    g, u = (xm @ w.gate_up_t.double()).chunk(2)
    a = g * torch.sigmoid(g) * u
    a = torch.where(a.abs() >= tau * a.abs().max(), a, 0.0)
    return a @ w.down_t.double()
