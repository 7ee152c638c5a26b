"""Per-token selection of firing neurons on CUDA (Triton), for capture: the exact top-k neurons of each
own token as packed bits (ties to the lower index), firing counts and the sparsity histograms, reading
each activation row once. core.kernels.reduce_gpu holds the per-prompt reductions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HIST_SLOTS = (
    128  # histogram bins in the kernel: a power of two, at least hist_bins (core.capture.reduce checks)
)


@triton.jit
def _select_pack_kernel(
    a_ptr, rows_ptr, norm_ptr, bits_ptr, count_ptr, hist_ptr,
    n_rows, d, stride, k, n_words, hist_stride, bins, bins_f,
    USE_OUTPUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, BLOCK)
    valid = cols < d
    norm = tl.load(norm_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    fired_total = tl.zeros([BLOCK], dtype=tl.int32)
    hist_abs = tl.zeros([SLOTS], dtype=tl.int32)
    hist_out = tl.zeros([SLOTS], dtype=tl.int32)
    shifts = tl.arange(0, 32)
    for i in range(ROWS):
        r = tl.program_id(0) * ROWS + i
        if r < n_rows:
            src = tl.load(rows_ptr + r)
            a = tl.abs(tl.load(a_ptr + src * stride + cols, mask=valid, other=0.0).to(tl.float32))
            # the score as bf16 bits, rounded to nearest even as torch's bf16 product is; non-negative
            # bf16 bit patterns order as their values, so the k-th largest is found bit by bit
            wide = (a * norm).to(tl.int32, bitcast=True)
            out_key = (wide + 0x7FFF + ((wide >> 16) & 1)) >> 16
            out = (out_key << 16).to(tl.float32, bitcast=True)
            key = out_key if USE_OUTPUT else a.to(tl.int32, bitcast=True) >> 16
            key = tl.where(valid, key, -1)
            t = _kth_key(key, k)
            above = key > t
            tied = (key == t).to(tl.int32)
            need = k - tl.sum(above.to(tl.int32), axis=0)
            fired = (above | ((tied != 0) & (tl.cumsum(tied, axis=0) <= need))).to(tl.int32)
            fired_total += fired
            words = tl.sum(tl.reshape(fired, [BLOCK // 32, 32]) << shifts[None, :], axis=1)
            w = tl.arange(0, BLOCK // 32)
            tl.store(bits_ptr + r * n_words + w, words, mask=w < n_words)
            if r % hist_stride == 0:
                hist_abs += _row_histogram(a, valid, bins, bins_f, SLOTS)
                hist_out += _row_histogram(out.to(tl.float32), valid, bins, bins_f, SLOTS)
    tl.atomic_add(count_ptr + cols, fired_total, mask=valid)
    slots = tl.arange(0, SLOTS)
    tl.atomic_add(hist_ptr + slots, hist_abs, mask=slots < bins)
    tl.atomic_add(hist_ptr + SLOTS + slots, hist_out, mask=slots < bins)


@triton.jit
def _kth_key(key, k):
    """The largest t with at least k keys >= t (keys in [0, 2^15)), one bit a step.

    One bit a step: two bits a step, with three counts packed in one int64 reduction, is slower.
    """
    t = 0
    for bit in tl.static_range(14, -1, -1):
        cand = t | (1 << bit)
        t = tl.where(tl.sum((key >= cand).to(tl.int32), axis=0) >= k, cand, t)
    return t


@triton.jit
def _row_histogram(values, valid, bins, bins_f, SLOTS: tl.constexpr):
    """Counts of values / row max in `bins` equal bins over [0, 1]; the peak goes to the last bin."""
    peak = tl.maximum(tl.max(tl.where(valid, values, 0.0), axis=0), 1e-30)
    scale = tl.div_rn(tl.zeros_like(peak) + 1.0, peak) * bins_f  # as torch's `bins / peak`: 1 / peak * bins
    idx = tl.minimum((values * scale).to(tl.int32), bins - 1)
    return tl.histogram(idx, SLOTS, mask=valid)


# Neuron pairs: a bf16 row read as int32 words holds neurons 2j (low half) and 2j+1 (high half) in word j,
# and so do the 15-bit magnitude keys computed from it. One add counts both halves against a candidate
# (SWAR: each half plus 0x8000 - c carries into its own top bit exactly when key >= c), halving the
# registers a row needs, and R rows share each block-wide reduction of the cut-off search.
LOW: tl.constexpr = tl.constexpr(0x7FFF)
HIGH: tl.constexpr = tl.constexpr(0x7FFF0000)
SIGNS: tl.constexpr = tl.constexpr(0x7FFF7FFF)


@triton.jit
def _select_pairs_kernel(
    w_ptr, rows_ptr, norm_ptr, bits_ptr, count_ptr, hist_ptr,
    n_rows, d2, stride2, k, n_words, hist_stride, bins, bins_f,
    USE_OUTPUT: tl.constexpr, ROWS: tl.constexpr, R: tl.constexpr, BLOCK2: tl.constexpr,
    SLOTS: tl.constexpr, HIST_ROW: tl.constexpr, COUNT: tl.constexpr, RELOAD_NORM: tl.constexpr,
    NEAR: tl.constexpr, HIST_JOIN: tl.constexpr, HIST_REUSE: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, BLOCK2)
    valid = cols < d2
    norm = tl.load(norm_ptr + cols, mask=valid, other=0).to(tl.uint32, bitcast=True)
    fired_total = tl.zeros([R, BLOCK2], dtype=tl.uint32)  # per pair: low count | high count << 16
    hist_abs = tl.zeros([SLOTS], dtype=tl.int32)
    hist_out = tl.zeros([SLOTS], dtype=tl.int32)
    shifts = (2 * tl.arange(0, 16)).to(tl.uint32)
    w = tl.arange(0, BLOCK2 // 16)
    offset = tl.zeros([R], dtype=tl.int32)  # the last row's cut-off minus its mean key
    for i in range(ROWS // R):
        first = tl.program_id(0) * ROWS + i * R
        r = first + tl.arange(0, R)
        live = r < n_rows
        src = tl.load(rows_ptr + r, mask=live, other=0).to(tl.int64)
        m = live[:, None] & valid[None, :]
        row_ptr = w_ptr + src[:, None] * stride2 + cols[None, :]
        if RELOAD_NORM:  # from L1 each row: 16 registers a thread fewer
            row_norm = tl.load(norm_ptr + cols, mask=valid, other=0).to(tl.uint32, bitcast=True)
        else:
            row_norm = norm
        key = _pair_keys(tl.load(row_ptr, mask=m, other=0), row_norm[None, :], USE_OUTPUT)
        if NEAR > 0:  # one row at a time: the cut-off searched first near the last row's, by mean key
            tl.static_assert(R == 1)
            total = tl.sum(tl.sum((key & LOW) + (key >> 16), axis=1), axis=0).to(tl.int32)  # < 2^31
            mean = total // (2 * d2)
            t, n_above = _kth_pair_key_near(key, k, mean + offset, NEAR)
            offset = t.to(tl.int32) - mean
        else:
            t, n_above = _kth_pair_key(key, k, R)
        fire_lo, fire_hi = _fire_pairs(key, t, k - n_above, m)
        if COUNT:  # else count_bits counts from the words: 16 more registers a thread spill
            fired_total += fire_lo | (fire_hi << 16)
        pairs = tl.reshape(fire_lo | (fire_hi << 1), [R, BLOCK2 // 16, 16])
        words = tl.sum(pairs << shifts[None, None, :], axis=2).to(tl.int32, bitcast=True)
        out = bits_ptr + r[:, None].to(tl.int64) * n_words + w[None, :]
        tl.store(out, words, mask=live[:, None] & (w < n_words)[None, :])
        hist_first = (first + hist_stride - 1) // hist_stride * hist_stride
        if hist_first < tl.minimum(first + R, n_rows):  # this tile holds a sampled row
            sampled = (live & (r % hist_stride == 0))[:, None] & valid[None, :]
            raw = tl.load(row_ptr, mask=sampled, other=0)  # again: a row kept live spills registers
            hist_abs += _pair_histogram(
                _pair_keys(raw, row_norm, False), sampled, bins, bins_f, R, BLOCK2, SLOTS, HIST_JOIN
            )
            out_keys = key if (USE_OUTPUT and HIST_REUSE) else _pair_keys(raw, row_norm, True)
            hist_out += _pair_histogram(out_keys, sampled, bins, bins_f, R, BLOCK2, SLOTS, HIST_JOIN)
    if COUNT:
        fired = tl.sum(fired_total, axis=0)
        tl.atomic_add(count_ptr + 2 * cols, (fired & LOW).to(tl.int32), mask=valid)
        tl.atomic_add(count_ptr + 2 * cols + 1, (fired >> 16).to(tl.int32), mask=valid)
    slots = tl.arange(0, SLOTS)
    tl.atomic_add(hist_ptr + slots, hist_abs, mask=slots < bins)
    tl.atomic_add(hist_ptr + HIST_ROW + slots, hist_out, mask=slots < bins)


@triton.jit
def _pair_keys(raw, norm, USE_OUTPUT: tl.constexpr):
    """Packed 15-bit keys of both halves: |a|, or |a| * norm rounded to bf16 (nearest even, as torch's
    bf16 product)."""
    absw = raw.to(tl.uint32, bitcast=True) & SIGNS
    if not USE_OUTPUT:
        return absw
    lo = ((absw << 16).to(tl.float32, bitcast=True) * (norm << 16).to(tl.float32, bitcast=True)).to(
        tl.uint32, bitcast=True
    )
    hi = (
        ((absw >> 16) << 16).to(tl.float32, bitcast=True) * ((norm >> 16) << 16).to(tl.float32, bitcast=True)
    ).to(tl.uint32, bitcast=True)
    lo = ((lo + 0x7FFF + ((lo >> 16) & 1)) >> 16) & LOW  # the mask keeps a NaN out of its neighbour
    hi = ((hi + 0x7FFF + ((hi >> 16) & 1)) >> 16) & LOW
    return lo | (hi << 16)


@triton.jit
def _count_pairs(key, c):
    """Per row, how many halves of `key` (R, B) are >= c (R,), c in [1, 0x8000]."""
    x = key + ((0x8000 - c) * 0x10001)[:, None]
    total = tl.sum((x >> 15) & 0x10001, axis=1)
    return (total & 0xFFFF) + (total >> 16)


@triton.jit
def _kth_pair_key(key, k, R: tl.constexpr):
    """Per row, the largest t with at least k halves >= t, one bit a step, and how many are > t.

    The last candidate turned down is t + 1 (t's lowest clear bit set, the bits below it still clear),
    so its count is the count above t: no reduction of its own.
    """
    t = tl.zeros([R], dtype=tl.uint32)
    n_above = tl.zeros([R], dtype=tl.uint32)  # t = 0x7FFF: none is above
    for bit in tl.static_range(14, -1, -1):
        cand = t | (1 << bit)
        n = _count_pairs(key, cand)
        t = tl.where(n >= k, cand, t)
        n_above = tl.where(n >= k, n_above, n)
    return t, n_above


@triton.jit
def _kth_pair_key_near(key, k, guess, NEAR: tl.constexpr):
    """_kth_pair_key for one row, searching first the 2^NEAR keys from guess - 2^(NEAR - 1).

    A row's mean key (its log-magnitude) plus the last row's cut-off minus its mean key predicts the
    cut-off, nearly always within a 128-key window on a real model (benchmarks/select_window.py
    measures how often). Then 2 + NEAR block reductions (the mean's among them) find it, not
    15; otherwise the full search follows: 17, or 18 + NEAR, in all. Exact either way: the window is
    checked, never trusted.
    """
    width: tl.constexpr = 1 << NEAR
    lo = tl.minimum(tl.maximum(guess - width // 2, 0), 0x8000 - width).to(tl.uint32)
    n_lo = _count_pairs(key, lo)
    if tl.max(n_lo, axis=0) >= k:  # the cut-off is at least lo
        t = lo
        n_above = tl.zeros_like(lo)
        rejected = tl.zeros_like(lo)
        for bit in tl.static_range(NEAR - 1, -1, -1):
            cand = t + (1 << bit)
            n = _count_pairs(key, cand)
            t = tl.where(n >= k, cand, t)
            n_above = tl.where(n >= k, n_above, n)
            rejected = tl.where(n >= k, rejected, 1)
        if tl.max(rejected, axis=0) == 0:  # t is the window's top: is the cut-off above it?
            n_top = _count_pairs(key, lo + width)
            if tl.max(n_top, axis=0) >= k:
                t, n_above = _kth_pair_key(key, k, 1)
            else:
                n_above = n_top
    else:
        t, n_above = _kth_pair_key(key, k, 1)
    return t, n_above


@triton.jit
def _fire_pairs(key, t, need, valid):
    """(low, high) 0/1 per pair: every half above t, and the first `need` ties at t (by index)."""
    above = key + ((0x7FFF - t) * 0x10001)[:, None]  # top bit set: half > t
    above_lo, above_hi = (above >> 15) & 1, (above >> 31) & 1
    tied_lo = ((key & LOW) == t[:, None]) & valid
    tied_hi = ((key >> 16) == t[:, None]) & valid
    tied_lo, tied_hi = tied_lo.to(tl.uint32), tied_hi.to(tl.uint32)
    rank_hi = tl.cumsum(tied_lo + tied_hi, axis=1)  # ties up to and including the high half
    fire_lo = above_lo | (tied_lo & (rank_hi - tied_hi <= need[:, None]).to(tl.uint32))
    fire_hi = above_hi | (tied_hi & (rank_hi <= need[:, None]).to(tl.uint32))
    return fire_lo, fire_hi


@triton.jit
def _pair_histogram(
    keys, sampled, bins, bins_f, R: tl.constexpr, BLOCK2: tl.constexpr, SLOTS: tl.constexpr,
    JOIN: tl.constexpr,
):  # fmt: skip
    """As _row_histogram for the sampled rows of packed keys; others go to slot SLOTS - 1, never read."""
    lo = ((keys & LOW) << 16).to(tl.float32, bitcast=True)
    hi = (keys & HIGH).to(tl.float32, bitcast=True)
    peak = tl.max(tl.maximum(tl.where(sampled, lo, 0.0), tl.where(sampled, hi, 0.0)), axis=1)
    peak = tl.maximum(peak, 1e-30)
    scale = (tl.div_rn(tl.zeros_like(peak) + 1.0, peak) * bins_f)[:, None]
    idx_lo = tl.where(sampled, tl.minimum((lo * scale).to(tl.int32), bins - 1), SLOTS - 1)
    idx_hi = tl.where(sampled, tl.minimum((hi * scale).to(tl.int32), bins - 1), SLOTS - 1)
    if JOIN:  # both halves in one histogram
        return tl.histogram(tl.reshape(tl.join(idx_lo, idx_hi), [2 * R * BLOCK2], can_reorder=True), SLOTS)
    return tl.histogram(tl.reshape(idx_lo, [R * BLOCK2], can_reorder=True), SLOTS) + tl.histogram(
        tl.reshape(idx_hi, [R * BLOCK2], can_reorder=True), SLOTS
    )


@triton.jit
def _count_bits_kernel(
    bits_ptr, count_ptr, n_rows, n_words, d, bits_layer, count_layer,
    STEPS: tl.constexpr, RB: tl.constexpr, WB: tl.constexpr,
):  # fmt: skip
    """Adds each neuron's set bits over rows into counts: a (STEPS * RB rows, WB words) block of one
    layer (axis 2) a program."""
    bits_ptr += tl.program_id(2).to(tl.int64) * bits_layer
    count_ptr += tl.program_id(2) * count_layer
    words = tl.program_id(1) * WB + tl.arange(0, WB)
    bit = tl.arange(0, 32).to(tl.uint32)
    total = tl.zeros([WB, 32], dtype=tl.int32)
    for step in range(STEPS):
        rows = (tl.program_id(0) * STEPS + step) * RB + tl.arange(0, RB)
        m = (rows < n_rows)[:, None] & (words < n_words)[None, :]
        x = tl.load(bits_ptr + rows.to(tl.int64)[:, None] * n_words + words[None, :], mask=m, other=0)
        x = x.to(tl.uint32, bitcast=True)
        total += tl.sum(((x[:, :, None] >> bit[None, None, :]) & 1).to(tl.int32), axis=0)
    neuron = words[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.atomic_add(count_ptr + neuron, total, mask=neuron < d)


# The paired kernel's settings: the fastest that benchmarks/gpu_capture.py --kernels found, which also
# times the alternatives (two rows a reduction, 32 warps or 64 registers spill registers)
PAIRS = {
    "per_program": 64,
    "rows_at_once": 1,
    "warps": 16,
    "count": False,
    "reload_norm": True,
    "maxnreg": None,
    "near": 7,  # search a 2^7-key window first (0: the full search always)
    "hist_join": True,  # both halves of a sampled row in one histogram call
    "hist_reuse": True,  # the output histogram from the selection's keys, not recomputed
}


def select_pack(
    a, rows, norm, k, counts, hist, hist_stride, bins, use_output, out=None, pairs=None, count_after=True,
    **tune,
) -> torch.Tensor:  # fmt: skip
    """(N, 2W) int32 firing words of the own-token rows `rows` of `a` (n, d); adds into counts and hist.

    counts is an int32 (d,) vector, hist an int32 (2, HIST_SLOTS) pair (|a|, output magnitude); `out`
    a contiguous (N, 2W) int32 buffer to fill. Rows of even width read as neuron pairs (the paired
    kernel, `tune` overrides PAIRS); others, or pairs=False, take the one-neuron-a-lane kernel. With
    count_after=False the paired kernel leaves the counts to the caller (count_bits of many layers).
    """
    n, d = len(rows), a.shape[1]
    n_words = 2 * ((d + 63) // 64)
    bits = torch.empty((n, n_words), dtype=torch.int32, device=a.device) if out is None else out
    if pairs is None:
        pairs = _pairable(a, norm) and bins < HIST_SLOTS
    if n == 0:
        return bits
    if pairs:
        cfg = {**PAIRS, **tune}
        words, norm_words = a.view(torch.int32), norm.contiguous().view(torch.int32)
        block2 = max(32, triton.next_power_of_2(d // 2))
        _select_pairs_kernel[(triton.cdiv(n, cfg["per_program"]),)](
            words, rows, norm_words, bits, counts, hist, n, d // 2, words.stride(0), k, n_words, hist_stride,
            bins, float(bins), USE_OUTPUT=use_output, ROWS=cfg["per_program"], R=cfg["rows_at_once"],
            BLOCK2=block2, SLOTS=HIST_SLOTS, HIST_ROW=HIST_SLOTS, COUNT=cfg["count"],
            RELOAD_NORM=cfg["reload_norm"], NEAR=cfg["near"] if cfg["rows_at_once"] == 1 else 0,
            HIST_JOIN=cfg["hist_join"], HIST_REUSE=cfg["hist_reuse"],
            num_warps=cfg["warps"],
            **({"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] else {}),
        )  # fmt: skip
        if not cfg["count"] and count_after:
            count_bits(bits, counts, d)
        return bits
    block = max(32, triton.next_power_of_2(d))
    _select_pack_kernel[(triton.cdiv(n, 32),)](
        a, rows, norm, bits, counts, hist, n, d, a.stride(0), k, n_words, hist_stride, bins, float(bins),
        USE_OUTPUT=use_output, ROWS=32, BLOCK=block, SLOTS=HIST_SLOTS, num_warps=16,
    )  # fmt: skip
    return bits


def count_bits(bits, counts, d: int, steps=32, rows=8, words=32) -> None:
    """Add each neuron's firing count over the (N, 2W) words `bits` into counts (d,) int32; or over
    the (L, N, 2W) words of L layers into (L, d) counts at once (one launch instead of one a layer).
    Both contiguous."""
    layers = bits.shape[0] if bits.dim() == 3 else 1
    n, n_words = bits.shape[-2:]
    grid = (triton.cdiv(n, steps * rows), triton.cdiv(n_words, words), layers)
    _count_bits_kernel[grid](
        bits, counts, n, n_words, d, n * n_words, counts.shape[-1],
        STEPS=steps, RB=rows, WB=words, num_warps=4,
    )  # fmt: skip


def _pairable(a, norm) -> bool:
    """Whether `a`'s rows and `norm` read as int32 words: even width, 4-byte aligned rows."""
    aligned = a.stride(1) == 1 and a.stride(0) % 2 == 0 and a.data_ptr() % 4 == 0
    return a.shape[1] % 2 == 0 and aligned and norm.data_ptr() % 4 == 0
