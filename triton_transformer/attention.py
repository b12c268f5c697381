"""Fused attention (FlashAttention-2 style), forward and backward, for (B, H, N, D) tensors.

    S = scale * Q K^T          (N_q x N_k per batch and head; never stored)
    P = softmax(S)             row-wise, masked entries excluded
    O = dropout(P) V

Forward: one program owns a block of BLOCK_M query rows of one (batch, head) and
streams the keys and values through in blocks of BLOCK_N, keeping a running row
max m, a running row sum l and an unnormalised output acc in fp32 registers
(the online softmax of Milakov & Gimelshein, as in FlashAttention). The N x N
scores exist only one (BLOCK_M, BLOCK_N) tile at a time, so memory is linear in
N. Exponentials are base 2 with scale * log2(e) folded into one multiply-add
(``qk * qk_scale - m``). When a backward will follow, the kernel also writes the
row's log-sum-exp L = m + log2(l) (base 2, fp32, B*H*N_q floats): P can then be
recomputed exactly as exp2(S*log2(e) - L) without a second online pass.

Backward in two kernels, each owning the rows it writes (no atomics; FlashAttention-2 adds dQ atomically):
  1. one program per query block loops over the key blocks it sees and
     accumulates dQ = scale * dS K, where  dS = P * (dP - delta),  dP = dO V^T
     and  delta_i = sum_d dO_id O_id  (computed here from O and dO, and stored);
  2. one program per key block loops over the query blocks that see it and
     accumulates dK and dV in registers:  dV = P^T dO,  dK = scale * dS^T Q.
Every tile of P is recomputed twice in the backward (once per kernel); that costs
FLOPs but no memory traffic for an N x N matrix and no atomic adds.

Causal attention (top-left aligned: query i sees keys j <= i, as
``F.scaled_dot_product_attention(is_causal=True)``) skips the key blocks above
the diagonal altogether, and the mask is computed only on the blocks that the
diagonal crosses: each loop runs in two phases, a mask-free phase over whole
blocks and a masked phase over the diagonal and the ragged tail (N need not be a
multiple of the block). Loads in the mask-free phase carry no bounds checks.

Key padding mask: a (B, N_k) bool tensor, True = attend (the seed's convention).
Masked scores are -inf. A query row whose keys are all masked has no softmax;
PyTorch's SDPA returns 0 for such a row (its math backend since torch 2.5; checked
on torch 2.13), and so do we: its output is 0, its stored L is +inf so that every
recomputed P of that row is exactly 0, and its gradients are 0. Nothing of it
leaks into other rows.

Dropout on P happens inside the kernels with the dropout chapter's
``keep_mask(seed, offsets, p)`` (Philox, keyed by the 64-bit seed): element
(b, h, i, j) uses the index it would have in a contiguous (B, H, N_q, N_k) tensor,
``((b * H + h) * N_q + i) * N_k + j`` in int64, so the mask is exactly
``dropout(torch.ones(B, H, N_q, N_k), p, seed=seed) != 0`` and the backward
regenerates it; nothing is stored and no counter wraps (64-bit indices). When N_k
is a multiple of 4, ``keep_mask_2d`` computes the same mask with one Philox call per
four columns; ``keep_tile`` picks between the two for a tile of P.
Kept probabilities are scaled by 1 / (1 - p) (applied to O, dV and dP).

Head dims up to 128 of any size (padded to a power of two >= 16 inside, with masked
loads); bf16/fp16/fp32 on a GPU (fp32 dots follow `torch.get_float32_matmul_precision()`, as
`linear` does: exact fp32 by default, TF32 when set to "high"), fp32/fp16 under the interpreter. Under ``torch.no_grad()`` the forward writes no L and saves nothing.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .dropout import keep_tile, next_seed, normalize_seed, philox_key
from .runtime import (FLOAT_DTYPES, aligned, as_float, as_int, autotune, cdiv, check_tensor, dot_precision,
                      l2_cache_bytes, launch_from_memo, launch_memo, no_double_backward, positive_int,
                      pow2_at_least_16)

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the GPU's native instruction

#: Largest head dimension the kernels accept (the fp32 accumulators live in registers).
MAX_HEAD_DIM = 128
#: Heads and batches run along a CUDA grid's second and third axes, which hold at most 65535 programs.
MAX_GRID_YZ = 65535


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _causal_program(head_group, LONGEST_LAST: tl.constexpr):
    """(block, head, batch) of this program under a causal mask: longest blocks first, `head_group` heads at a time.

    Causal blocks differ in work: the last query block (forward, dQ) attends to every key block and the
    first to one; the first key block (dK/dV) is attended by every query block. The GPU starts programs in
    launch order, the grid's first axis fastest. Read as (block, head, batch), that order starts each head's
    longest block with its head, so the last heads' longest blocks start last and the GPU ends on a few long
    programs with its other SMs idle. Here the launch index is read with the block varying slowest within a
    group of `head_group` (batch, head) pairs, the groups one after another: a group's longest blocks start
    first, of each of its heads, and its shortest fill the group's end (longest first, the classic rule for
    handing out jobs of unequal length). A group of every head leaves the GPU the fewest long programs to end
    on; a smaller one keeps the programs running together on fewer heads, whose K and V then stay in L2
    (`_head_group` picks). `LONGEST_LAST`: the highest block has the most work.
    """
    n_blocks = tl.num_programs(0).to(tl.int64)
    heads = tl.num_programs(1).to(tl.int64)
    n_bh = heads * tl.num_programs(2).to(tl.int64)
    # int64: blocks x heads x batches may pass 2**31 (the grid allows 65535 x 65535 heads and batches)
    launched = tl.program_id(0).to(tl.int64) + n_blocks * (tl.program_id(1).to(tl.int64)
                                                           + heads * tl.program_id(2).to(tl.int64))
    group_size = n_blocks * 0 + head_group  # int64, and a tensor even where Triton passes a 1 as a constant
    group = launched // (n_blocks * group_size)
    in_group = launched - group * (n_blocks * group_size)
    group_heads = tl.minimum(n_bh - group * group_size, group_size)  # the last group may be short
    block = in_group // group_heads
    bh = group * group_size + (in_group - block * group_heads)
    if LONGEST_LAST:
        block = n_blocks - 1 - block
    return block.to(tl.int32), (bh % heads).to(tl.int32), (bh // heads).to(tl.int32)


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile, bounds-checking rows and/or columns only when asked (masks cost instructions)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, cols, n_cols, CHECK_COLS: tl.constexpr):
    if CHECK_COLS:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
    else:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, km_ptrs, stride_kn, stride_vn, stride_mn,
               lo, hi, offs_m, offs_n, offs_d, N_K, D, qk_scale, seed, row_base, dropout_p,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr, EVEN_D: tl.constexpr,
               PRECISION: tl.constexpr):
    """Stream key/value blocks [lo, hi) through the online softmax of one query block.

    MASKED=False is the hot phase: whole blocks, all visible, no bounds checks.
    MASKED=True covers the blocks crossed by the causal diagonal and the ragged tail.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_kn, cols, N_K, offs_d, D, MASKED, not EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            visible = cols[None, :] < N_K
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= cols[None, :])
            qk = tl.where(visible, qk, float("-inf"))
        if HAS_MASK:
            if MASKED:
                km = tl.load(km_ptrs + cols * stride_mn, mask=cols < N_K, other=0)
            else:
                km = tl.load(km_ptrs + cols * stride_mn)
            qk = tl.where(km[None, :] != 0, qk, float("-inf"))
        # Running max in the log2 domain. qk_scale > 0, so max(qk) * qk_scale = max(qk * qk_scale).
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if HAS_MASK:
            # A row that has seen only masked keys so far has m = -inf; subtracting it would give
            # -inf - (-inf) = NaN. Subtract 0 instead: its p and alpha are then exactly 0.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new  # every row sees key 0 in its first block: m is finite from the start
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])  # one FMA + exp2 per score
        alpha = tl.math.exp2(m_i - m_sub)                   # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)                    # the normaliser counts dropped entries too
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = keep_tile(seed, row_base, offs_m, start_n, N_K, dropout_p, BLOCK_N, DROP_GROUPED)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_ptrs + start_n * stride_vn, cols, N_K, offs_d, D, MASKED, not EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def _exact_fp32(*tiles):
    """Which configs exact-fp32 attention tries: (BLOCK_M, BLOCK_N, warps, stages) among `tiles`.

    The smallest config, and a mid-sized one with 8 warps, the fastest to compile of its size
    (`runtime.exact_fp32_pruner` says why fp32 needs its own short list).
    """
    return lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in tiles


def _fwd_configs():
    # First config: what the interpreter runs, and small enough for a T4 (64 KB shared memory).
    # BLOCK_M must be a multiple of BLOCK_N (the causal diagonal then starts on a key-block edge).
    cfg = [(32, 32, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 4, 4),
           (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cfg]


# The autotuner re-tunes for every new value of its key. Keyed on the exact N_q and N_k it would re-tune
# at every step of generation (N_k grows by one); the kernels take their powers of two as extra arguments.
_KEY = ["N_Q_KEY", "N_K_KEY", "BLOCK_D", "CAUSAL", "HAS_MASK", "DROPOUT"]

#: Problems with fewer multiply-adds than this (B*H*N_q*N_k*D) run the first config of each list instead
#: of the autotuner: a decoding step or a test shape is over before tuning it could pay back.
AUTOTUNE_MIN_MACS = 1 << 26

#: A decoding step's forward (N_q up to 16 rows, no causal triangle): one program per head walks every key
#: block in turn, so the wider the block the fewer serial iterations. Measured on the H100 (chapter 7's
#: model, one token over a 1024-key cache): the first config's 32-key blocks took 41 us a layer.
#: 64 keys and 3 stages hold 48 KB of K and V tiles in shared memory, within a T4's 64 KB.
DECODE_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=3)
DECODE_ROWS = 16


@triton.jit(do_not_specialize=["seed", "head_group"])
def _attn_fwd_kernel(Q, K, V, O, L, KM,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                     stride_mb, stride_mn,
                     H, N_Q, N_K, D, qk_scale, seed, seed_base_ptr, dropout_p, inv_keep, head_group,
                     N_Q_KEY, N_K_KEY,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr,
                     SEED_BASE: tl.constexpr,
                     STORE_L: tl.constexpr,
                     BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seed = philox_key(seed, seed_base_ptr, SEED_BASE)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if CAUSAL:  # causal work grows with the row: start the longest programs first
        pid_m, h, b = _causal_program(head_group, True)
    bh = b.to(tl.int64) * H + h  # int64: B * H may pass 2**31 (the grid allows 65535 x 65535)
    # int64 bases: B*H*N*D passes 2**31 elements for long sequences
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    Q += b64 * stride_qb + h64 * stride_qh
    K += b64 * stride_kb + h64 * stride_kh
    V += b64 * stride_vb + h64 * stride_vh
    O += b64 * stride_ob + h64 * stride_oh
    KM += b64 * stride_mb

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, N_Q, offs_d, D, True, not EVEN_D)
    k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]
    km_ptrs = KM  # the loops add (start_n + offs_n) * stride_mn

    row_base = bh * N_Q  # dropout: P's row index in a contiguous (B*H*N_q, N_k) tensor

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Key blocks [0, full_hi) are whole and entirely visible to every row of this block;
    # [full_hi, hi) holds the diagonal (causal) and the ragged tail. Blocks past hi are never touched.
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, N_K)
        full_hi = tl.minimum(start_m, (N_K // BLOCK_N) * BLOCK_N)
    else:
        hi = N_K
        full_hi = (N_K // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, km_ptrs, stride_kn, stride_vn, stride_mn,
                               0, full_hi, offs_m, offs_n, offs_d, N_K, D, qk_scale, seed, row_base, dropout_p,
                               BLOCK_N, False, CAUSAL, HAS_MASK, DROPOUT, DROP_GROUPED, EVEN_D, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, km_ptrs, stride_kn, stride_vn, stride_mn,
                               full_hi, hi, offs_m, offs_n, offs_d, N_K, D, qk_scale, seed, row_base, dropout_p,
                               BLOCK_N, True, CAUSAL, HAS_MASK, DROPOUT, DROP_GROUPED, EVEN_D, PRECISION)

    if HAS_MASK:
        empty = l_i == 0.0  # every key of the row is masked: output 0, like PyTorch's SDPA
        l_safe = tl.where(empty, 1.0, l_i)
    else:
        l_safe = l_i
    o = acc * (inv_keep / l_safe)[:, None]
    _store_tile(O + offs_m[:, None] * stride_on + offs_d[None, :], o.to(O.dtype.element_ty),
                offs_m, N_Q, offs_d, D, not EVEN_D)
    if STORE_L:
        lse = m_i + tl.math.log2(l_safe)
        if HAS_MASK:
            lse = tl.where(empty, float("inf"), lse)  # exp2(s - inf) = 0: the backward sees P = 0 in this row
        tl.store(L + bh * N_Q + offs_m, lse, mask=offs_m < N_Q)


_FWD_EXACT_FP32 = _exact_fp32((32, 32, 4, 2), (128, 64, 8, 3))
_attn_fwd = autotune(_fwd_configs(), key=_KEY, exact_fp32=_FWD_EXACT_FP32)(_attn_fwd_kernel)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, L, DELTA, stride_qn, stride_don,
                    lo, hi, start_n, offs_n, offs_m0, offs_d, N_Q, N_K, D, qk_scale, seed, row_base, dropout_p, inv_keep,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr, EVEN_D: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi). Tiles are transposed: (keys, queries).

    Query rows past N_q load as q = 0, dO = 0, L = 0, delta = 0 and so add exactly 0: only
    the causal mask needs a `where`. Padding-masked keys are zeroed once, after the loop.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(q_ptrs + start_m * stride_qn, offs_m, N_Q, offs_d, D, MASKED, not EVEN_D)
        if MASKED:
            lse = tl.load(L + offs_m, mask=offs_m < N_Q, other=0.0)
        else:
            lse = tl.load(L + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])  # P recomputed from the saved log-sum-exp
        if MASKED:
            if CAUSAL:
                pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        do = _load_tile(do_ptrs + start_m * stride_don, offs_m, N_Q, offs_d, D, MASKED, not EVEN_D)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            # the mask comes out (queries, keys); transposed through int8 (bool tiles in shared memory are fragile)
            keep = keep_tile(seed, row_base, offs_m, start_n, N_K, dropout_p, BLOCK_N, DROP_GROUPED)
            keep = tl.trans(keep.to(tl.int8)) != 0
            dv = tl.dot(tl.where(keep, pT * inv_keep, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)  # dP of the undropped P
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        if MASKED:
            delta = tl.load(DELTA + offs_m, mask=offs_m < N_Q, other=0.0)
        else:
            delta = tl.load(DELTA + offs_m)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


def _dkdv_configs():
    # (BLOCK_M, BLOCK_N, warps, stages): BLOCK_N (keys, held) must be a multiple of BLOCK_M (queries, streamed).
    # dK and dV stay in registers (2 * BLOCK_N * D fp32): at D = 128 a 128-key block needs 8 warps.
    cfg = [(32, 32, 4, 2), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3), (32, 128, 4, 5),
           (32, 128, 8, 3), (32, 128, 8, 4), (64, 128, 8, 3), (64, 128, 4, 3), (64, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cfg]


@triton.jit(do_not_specialize=["seed", "head_group"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, L, DELTA, KM,
                          stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                          stride_dkb, stride_dkh, stride_dkn, stride_mb, stride_mn,
                          H, N_Q, N_K, D, qk_scale, sm_scale, seed, seed_base_ptr, dropout_p, inv_keep, head_group,
                          N_Q_KEY, N_K_KEY,
                          CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr,
                          SEED_BASE: tl.constexpr,
                          BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seed = philox_key(seed, seed_base_ptr, SEED_BASE)
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if CAUSAL:  # low key blocks have the most work: start them first, of every head of a group
        pid_n, h, b = _causal_program(head_group, False)
    bh = b.to(tl.int64) * H + h  # int64: B * H may pass 2**31 (the grid allows 65535 x 65535)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    Q += b64 * stride_qb + h64 * stride_qh
    K += b64 * stride_kb + h64 * stride_kh
    V += b64 * stride_vb + h64 * stride_vh
    DO += b64 * stride_dob + h64 * stride_doh
    DK += b64 * stride_dkb + h64 * stride_dkh  # dK and dV are allocated with one layout
    DV += b64 * stride_dkb + h64 * stride_dkh
    L += bh * N_Q
    DELTA += bh * N_Q

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # Key rows past N_k load as 0; their dK, dV rows are computed but never stored.
    k = _load_tile(K + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, N_K, offs_d, D, True, not EVEN_D)
    v = _load_tile(V + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, N_K, offs_d, D, True, not EVEN_D)
    q_ptrs = Q + offs_m0[:, None] * stride_qn + offs_d[None, :]
    do_ptrs = DO + offs_m0[:, None] * stride_don + offs_d[None, :]
    row_base = bh * N_Q

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:
        # Queries before start_n never see these keys: skipped. The BLOCK_N // BLOCK_M query
        # blocks on the diagonal take the causal mask; the ones after it are mask-free.
        diag_hi = tl.minimum(start_n + BLOCK_N, N_Q)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, L, DELTA, stride_qn, stride_don,
                                 start_n, diag_hi, start_n, offs_n, offs_m0, offs_d, N_Q, N_K, D, qk_scale, seed, row_base,
                                 dropout_p, inv_keep, BLOCK_M, BLOCK_N, True, CAUSAL, DROPOUT, DROP_GROUPED, EVEN_D,
                                 PRECISION)
        full_lo = start_n + BLOCK_N
    else:
        full_lo = 0
    full_hi = tl.maximum(full_lo, (N_Q // BLOCK_M) * BLOCK_M)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, L, DELTA, stride_qn, stride_don,
                             full_lo, full_hi, start_n, offs_n, offs_m0, offs_d, N_Q, N_K, D, qk_scale, seed, row_base,
                             dropout_p, inv_keep, BLOCK_M, BLOCK_N, False, CAUSAL, DROPOUT, DROP_GROUPED, EVEN_D,
                             PRECISION)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, L, DELTA, stride_qn, stride_don,
                             full_hi, N_Q, start_n, offs_n, offs_m0, offs_d, N_Q, N_K, D, qk_scale, seed, row_base,
                             dropout_p, inv_keep, BLOCK_M, BLOCK_N, True, CAUSAL, DROPOUT, DROP_GROUPED, EVEN_D,
                             PRECISION)
    if HAS_MASK:
        # A masked key's P column was never zeroed in the loop (it only touched its own rows of
        # dK and dV, possibly with inf/NaN): its gradients are exactly 0.
        km = tl.load(KM + b64 * stride_mb + offs_n * stride_mn, mask=offs_n < N_K, other=0)
        dk = tl.where(km[:, None] != 0, dk, 0.0)
        dv = tl.where(km[:, None] != 0, dv, 0.0)
    dk = dk * sm_scale  # S = scale * Q K^T
    dkv_offs = offs_n[:, None] * stride_dkn + offs_d[None, :]
    _store_tile(DK + dkv_offs, dk.to(DK.dtype.element_ty), offs_n, N_K, offs_d, D, not EVEN_D)
    _store_tile(DV + dkv_offs, dv.to(DV.dtype.element_ty), offs_n, N_K, offs_d, D, not EVEN_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, km_ptrs, stride_kn, stride_vn, stride_mn,
                  lo, hi, offs_m, offs_n, offs_d, N_K, D, qk_scale, seed, row_base, dropout_p, inv_keep,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                  DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr, EVEN_D: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_kn, cols, N_K, offs_d, D, MASKED, not EVEN_D)
        v = _load_tile(v_ptrs + start_n * stride_vn, cols, N_K, offs_d, D, MASKED, not EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        # Zero P where it must be 0 *before* it meets a dot: exp2 of a masked score can be inf.
        if MASKED:
            visible = cols[None, :] < N_K
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= cols[None, :])
            p = tl.where(visible, p, 0.0)
        if HAS_MASK:
            if MASKED:
                km = tl.load(km_ptrs + cols * stride_mn, mask=cols < N_K, other=0)
            else:
                km = tl.load(km_ptrs + cols * stride_mn)
            p = tl.where(km[None, :] != 0, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = keep_tile(seed, row_base, offs_m, start_n, N_K, dropout_p, BLOCK_N, DROP_GROUPED)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


def _dq_configs():
    # BLOCK_M (queries, held) must be a multiple of BLOCK_N (keys, streamed).
    cfg = [(32, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 32, 4, 5),
           (128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in cfg]


@triton.jit(do_not_specialize=["seed", "head_group"])
def _attn_bwd_dq_kernel(Q, K, V, O, DO, DQ, L, DELTA, KM,
                        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                        stride_dqb, stride_dqh, stride_dqn, stride_ob, stride_oh, stride_on, stride_mb, stride_mn,
                        H, N_Q, N_K, D, qk_scale, sm_scale, seed, seed_base_ptr, dropout_p, inv_keep, head_group,
                        N_Q_KEY, N_K_KEY,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr,
                        SEED_BASE: tl.constexpr,
                        BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seed = philox_key(seed, seed_base_ptr, SEED_BASE)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if CAUSAL:
        pid_m, h, b = _causal_program(head_group, True)
    bh = b.to(tl.int64) * H + h  # int64: B * H may pass 2**31 (the grid allows 65535 x 65535)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    Q += b64 * stride_qb + h64 * stride_qh
    K += b64 * stride_kb + h64 * stride_kh
    V += b64 * stride_vb + h64 * stride_vh
    DO += b64 * stride_dob + h64 * stride_doh
    DQ += b64 * stride_dqb + h64 * stride_dqh
    O += b64 * stride_ob + h64 * stride_oh
    KM += b64 * stride_mb

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + offs_m[:, None] * stride_qn + offs_d[None, :], offs_m, N_Q, offs_d, D, True, not EVEN_D)
    do = _load_tile(DO + offs_m[:, None] * stride_don + offs_d[None, :], offs_m, N_Q, offs_d, D, True, not EVEN_D)
    lse = tl.load(L + bh * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    # delta_i = sum_d dO_id O_id (= sum_j P_ij dP_ij), the row term of dS = P * (dP - delta). This kernel
    # runs first and stores it for the dK/dV kernel: no separate pre-processing launch.
    o = _load_tile(O + offs_m[:, None] * stride_on + offs_d[None, :], offs_m, N_Q, offs_d, D, True, not EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * N_Q + offs_m, delta, mask=offs_m < N_Q)
    k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]
    km_ptrs = KM  # the loops add (start_n + offs_n) * stride_mn
    row_base = bh * N_Q

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, N_K)
        full_hi = tl.minimum(start_m, (N_K // BLOCK_N) * BLOCK_N)
    else:
        hi = N_K
        full_hi = (N_K // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, km_ptrs, stride_kn, stride_vn, stride_mn,
                       0, full_hi, offs_m, offs_n, offs_d, N_K, D, qk_scale, seed, row_base, dropout_p, inv_keep,
                       BLOCK_N, False, CAUSAL, HAS_MASK, DROPOUT, DROP_GROUPED, EVEN_D, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, km_ptrs, stride_kn, stride_vn, stride_mn,
                       full_hi, hi, offs_m, offs_n, offs_d, N_K, D, qk_scale, seed, row_base, dropout_p, inv_keep,
                       BLOCK_N, True, CAUSAL, HAS_MASK, DROPOUT, DROP_GROUPED, EVEN_D, PRECISION)
    dq = dq * sm_scale
    _store_tile(DQ + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                offs_m, N_Q, offs_d, D, not EVEN_D)


_DKDV_EXACT_FP32 = _exact_fp32((32, 32, 4, 2), (32, 128, 8, 3))
_DQ_EXACT_FP32 = _exact_fp32((32, 32, 4, 2), (128, 32, 8, 3))
_attn_bwd_dkdv = autotune(_dkdv_configs(), key=_KEY, exact_fp32=_DKDV_EXACT_FP32)(_attn_bwd_dkdv_kernel)
_attn_bwd_dq = autotune(_dq_configs(), key=_KEY, exact_fp32=_DQ_EXACT_FP32)(_attn_bwd_dq_kernel)



# ----------------------------------------------------------------------------- launchers

def _mask_args(mask, q):
    """Pointer and strides of the key padding mask (a dummy pointer when there is none)."""
    if mask is None:
        return q, 0, 0
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, m.stride(0), m.stride(1)


def _launch(kernel, grid, args, consts, config, macs, memo_key=None):
    """Launch the autotuned kernel, or the plain one with a given config (tests run every config this way).

    A problem of fewer than AUTOTUNE_MIN_MACS multiply-adds takes the first config of the list untuned.
    Both go through `runtime.launch_memo`: after the first call a launch skips Triton's per-call argument
    binding, which at N = 1024 cost more host time than the kernels take on the GPU, and a call whose
    `memo_key` (`_memo_key`) was seen before also skips working out what Triton specialises the kernel on.
    """
    if memo_key is not None and launch_from_memo(_MEMO, memo_key, args) is not None:
        return  # a launch like an earlier one's: nothing below needs working out again
    if config is None and macs < AUTOTUNE_MIN_MACS:
        config = kernel.configs[0]
    if config is None:
        return launch_memo(_MEMO, memo_key, kernel, grid, *args, **consts)
    return launch_memo(_MEMO, memo_key, kernel.fn, grid, *args, **consts, **config.kwargs,
                       num_warps=config.num_warps, num_stages=config.num_stages)


#: What the kernels' launches compiled to, per `_memo_key` (`runtime.launch_memo`).
_MEMO: dict = {}


def _memo_key(kernel, seed, tensors, facts):
    """`launch_memo`'s key for a launch of `kernel`, or None when a tensor does not start on a 16-byte boundary.

    Triton specialises the kernels on their tensors' dtypes and alignment, their integers and the seed's width
    (the seed is not specialised otherwise). The caller's `facts` hold the integers (sizes, strides), the options
    and q's dtype, which every tensor shares but the log-sum-exp and delta (always float32), the mask (always a
    uint8 view) and the seed base (always int64); `tensors` are the ones whose alignment can vary.
    """
    if not aligned(*tensors):
        return None
    return kernel, -2**31 <= seed < 2**31, AUTOTUNE_MIN_MACS, DECODE_ROWS, facts


def _head_group(q: torch.Tensor, n_rows: int) -> int:
    """(batch, head) pairs whose causal programs start together (`_causal_program`): at most as many heads as fit
    their two streamed tensors (K and V of `n_rows` rows in the forward and the dQ kernel, Q and dO in dK/dV) in
    half the GPU's L2, all of them where they fit, in groups as even as they can be. Measured on the H100 (bf16,
    causal, GPU time, `benchmarks/experiments/attn_group.py`): forward+backward at (4, 16, 4096, 128) 2551-2632 us
    with groups of 4 to 16 heads against 2705-2800 with one group of all 64; at (4, 16, 4096, 64) 1426-1440 with 16
    against 1458-1475; at (8, 12, 1024, 64), where all 96 heads' K and V take 24 MB, one group of all was fastest
    (183-190 against 197-219 with groups of 1 to 32). The even groups picked at 4096 tokens, 22, 22 and 20 heads
    and 11 heads, took 1424-1446 and 2617-2625 us. At the model's (16, 8, 1024, 64) two groups of 64 took
    250-251 against 262-263 with 100 and a short last group of 28, and 257 with one group of all; at
    (16, 12, 1024, 64) 366 with groups of 64 and 369-370 with two of 96, against 375 with 100 and 92 and 399 with
    one group of all.
    """
    n_bh = q.shape[0] * q.shape[1]
    per_head = 2 * n_rows * q.shape[3] * q.element_size()
    fit = max(1, min(n_bh, l2_cache_bytes(q.device) // 2 // max(per_head, 1)))
    # as few groups as hold at most `fit` pairs each, made as even as they can be: a short last group would
    # end the launch on a few heads' programs
    return cdiv(n_bh, cdiv(n_bh, fit))


#: The kernels add a 64-bit base per (batch, head) and offsets within that head in 32 bits, which keeps the
#: loops' address arithmetic cheap: one head's rows must span fewer than 2**31 elements.
_MAX_HEAD_SPAN = 2**31


def _span_fits(n_rows: int, row_stride: int, d: int) -> bool:
    """Whether one (batch, head) slice of `n_rows` rows of `d` elements (unit stride along them), `row_stride`
    apart, spans fewer than _MAX_HEAD_SPAN elements from its first element to its last."""
    return (n_rows - 1) * row_stride + d < _MAX_HEAD_SPAN


def _head_fits(t: torch.Tensor) -> bool:
    """`_span_fits` for a (B, H, N, D) view with unit stride on D."""
    return _span_fits(t.shape[2], t.stride(2), t.shape[3])


def _new_like(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of t's shape, dtype and device (torch.empty_like, the cheaper call, when t is
    contiguous itself)."""
    if t.is_contiguous():
        return torch.empty_like(t)
    return torch.empty(t.shape, device=t.device, dtype=t.dtype)


def _fit_offsets(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy when its rows are spread too far apart for 32-bit offsets within a head
    (a head sliced out of a wide packed tensor at a long length); an error when even that is too long."""
    if _head_fits(t):
        return t
    t = t.contiguous()
    if not _head_fits(t):
        raise ValueError(f"attention: {name} has {t.shape[2]} rows of {t.shape[3]} per head: one head spans "
                         f"2**31 elements or more, beyond the kernels' 32-bit offsets within a head")
    return t


def _fit_out(t: torch.Tensor | None) -> torch.Tensor | None:
    """An output view the kernels can address, or None (write a new tensor, copied into the view after)."""
    return t if t is None or _head_fits(t) else None


def attention_forward(q, k, v, mask=None, causal=False, dropout_p=0.0, scale=None, seed=0, need_lse=True,
                      config=None, out=None, seed_base=None):
    """O (B, H, N_q, D) and, when `need_lse`, the base-2 log-sum-exp L (B*H, N_q) fp32 of every row.

    O is a new contiguous tensor, or `out`: any (B, H, N_q, D) view with unit stride along D. With
    `seed_base` (a one-element int64 tensor) the dropout key is ``seed ^ seed_base`` (`dropout.replayable_seeds`).
    """
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    if not (_span_fits(N_Q, sq[2], D) and _span_fits(N_K, max(sk[2], sv[2]), D)):  # rows spread very far apart
        q, k, v = (_fit_offsets(name, t) for name, t in (("q", q), ("k", k), ("v", v)))
        sq, sk, sv = q.stride(), k.stride(), v.stride()
    o = _fit_out(out)
    o = _new_like(q) if o is None else o
    lse = torch.empty((B * H, N_Q), device=q.device, dtype=torch.float32) if need_lse else o
    km, smb, smn = _mask_args(mask, q)
    grid = lambda meta: (cdiv(N_Q, meta["BLOCK_M"]), H, B)  # noqa: E731
    block_d = pow2_at_least_16(D)  # tl.dot needs every dimension >= 16
    strides = (*sq[:3], *sk[:3], *sv[:3], *o.stride()[:3], smb, smn)
    args = (q, k, v, o, lse, km, *strides, H, N_Q, N_K, D, scale * LOG2E, seed,
            lse if seed_base is None else seed_base, float(dropout_p), 1.0 / (1.0 - dropout_p), _head_group(q, N_K),
            pow2_at_least_16(N_Q), pow2_at_least_16(N_K))
    consts = dict(CAUSAL=bool(causal), HAS_MASK=mask is not None, DROPOUT=dropout_p > 0, DROP_GROUPED=N_K % 4 == 0,
                  SEED_BASE=seed_base is not None, STORE_L=need_lse,
                  BLOCK_D=block_d, EVEN_D=block_d == D, PRECISION=dot_precision(q.dtype))
    # launches like an earlier call's come straight from the memo (q's dtype, the shapes and every stride in key)
    key = None if config is not None else _memo_key(
        "fwd", seed, (q, k, v, o, km) if seed_base is None else (q, k, v, o, km, seed_base),
        (q.get_device(), q.dtype, q.shape, N_K, strides, tuple(consts.values())))
    if config is None and N_Q <= DECODE_ROWS and not causal:
        config = DECODE_CONFIG
    _launch(_attn_fwd, grid, args, consts, config, B * H * N_Q * N_K * D, key)
    if out is not None and o is not out:
        o = out.copy_(o)
    return o, (lse if need_lse else None)


def attention_backward(do, q, k, v, o, lse, mask=None, causal=False, dropout_p=0.0, scale=None, seed=0,
                       configs=(None, None), grads=None, seed_base=None):
    """dQ, dK, dV from dO and what the forward saved (q, k, v, o and the log-sum-exp).

    They are new contiguous tensors, or the (dq, dk, dv) views `grads`, unit stride along D,
    dk and dv with the same strides (e.g. three slices of one packed qkv gradient).
    """
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    sdo = do.stride()
    if sdo[3] != 1:
        do = do.contiguous()
        sdo = do.stride()
    sq, sk, sv, so = q.stride(), k.stride(), v.stride(), o.stride()
    if not (_span_fits(N_Q, max(sq[2], so[2], sdo[2]), D) and _span_fits(N_K, max(sk[2], sv[2]), D)):
        q, k, v, o, do = (_fit_offsets(name, t) for name, t in (("q", q), ("k", k), ("v", v), ("o", o), ("dO", do)))
        sq, sk, sv, so, sdo = q.stride(), k.stride(), v.stride(), o.stride(), do.stride()
    block_d = pow2_at_least_16(D)  # tl.dot needs every dimension >= 16
    even_d = block_d == D
    delta = torch.empty_like(lse)
    if grads is not None and any(_fit_out(g) is None for g in grads):
        views, grads = grads, None  # computed apart, copied into the views at the end
    else:
        views = None
    if grads is None:
        dq, dk = _new_like(q), _new_like(k)
        dv = torch.empty_like(dk)
    else:
        dq, dk, dv = grads
    km, smb, smn = _mask_args(mask, q)
    consts = dict(CAUSAL=bool(causal), HAS_MASK=mask is not None, DROPOUT=dropout_p > 0, DROP_GROUPED=N_K % 4 == 0,
                  SEED_BASE=seed_base is not None, BLOCK_D=block_d, EVEN_D=even_d, PRECISION=dot_precision(q.dtype))
    common = (H, N_Q, N_K, D, scale * LOG2E, scale, seed, lse if seed_base is None else seed_base, float(dropout_p),
              1.0 / (1.0 - dropout_p), _head_group(q, max(N_Q, N_K)), pow2_at_least_16(N_Q), pow2_at_least_16(N_K))
    macs = B * H * N_Q * N_K * D
    strides_in = (*sq[:3], *sk[:3], *sv[:3], *sdo[:3])
    sdq, sdk = dq.stride()[:3], dk.stride()[:3]
    strides_out = (*sdq, *so[:3], *sdk, *dv.stride()[:3], smb, smn)
    tensors = (q, k, v, o, do, dq, dk, dv, km) if seed_base is None else (q, k, v, o, do, dq, dk, dv, km, seed_base)
    facts = (q.get_device(), q.dtype, q.shape, N_K, strides_in, strides_out, tuple(consts.values()))
    key = _memo_key("bwd", seed, tensors, facts)  # one key for both launches, each adding its name
    # dQ first: it also computes delta, which the dK/dV kernel reads. Both are free of atomics.
    _launch(_attn_bwd_dq, lambda meta: (cdiv(N_Q, meta["BLOCK_M"]), H, B),
            (q, k, v, o, do, dq, lse, delta, km, *strides_in, *sdq, *so[:3], smb, smn, *common),
            consts, configs[1], macs, None if configs[1] is not None else key and (key, "dq"))
    _launch(_attn_bwd_dkdv, lambda meta: (cdiv(N_K, meta["BLOCK_N"]), H, B),
            (q, k, v, do, dk, dv, lse, delta, km, *strides_in, *sdk, smb, smn, *common),
            consts, configs[0], macs, None if configs[0] is not None else key and (key, "dkdv"))
    if views is not None:
        dq, dk, dv = (view.copy_(g) for view, g in zip(views, (dq, dk, dv)))
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Fused attention. Saves q, k, v, o and the row log-sum-exp (B*H*N_q floats), never an N x N matrix."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, dropout_p, scale, seed, seed_base=None):
        o, lse = attention_forward(q, k, v, mask, causal, dropout_p, scale, seed, need_lse=True, seed_base=seed_base)
        ctx.save_for_backward(q, k, v, o, lse, mask, seed_base)
        ctx.causal, ctx.dropout_p, ctx.scale, ctx.seed = causal, dropout_p, scale, seed
        return o

    @staticmethod
    @no_double_backward
    def backward(ctx, do):
        q, k, v, o, lse, mask, seed_base = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, mask, ctx.causal, ctx.dropout_p, ctx.scale, ctx.seed,
                                        seed_base=seed_base)
        return dq, dk, dv, None, None, None, None, None, None


def _philox_key(dropout_p: float, seed: int | None, x: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The dropout's key as the kernels take it, (seed, seed base): as `dropout` draws it (`dropout.next_seed`)."""
    if seed is not None:
        seed = as_int("attention: seed", seed)
    if dropout_p == 0:  # no mask: nothing to draw, and a replayable block's salts stay in step
        return normalize_seed(seed or 0), None
    return next_seed(seed, x)


def _check_inputs(q, k, v, mask, dropout_p) -> float:
    """Clear errors for attention's inputs; returns dropout_p as a Python float (a numpy float would reach the
    kernels' arguments, which take Python scalars)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(f"attention: {name}", t, dtypes=FLOAT_DTYPES, ndim=4, device=q.device, dot=True)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, N_Q, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"attention: q has shape {tuple(q.shape)} (B, H, N, D) but k has {tuple(k.shape)}; "
                         f"k and v must be ({B}, {H}, N_k, {D})")
    if v.shape != k.shape:
        raise ValueError(f"attention: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; they must match")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"attention: head dimension {D} is not supported (1 to {MAX_HEAD_DIM})")
    if B > MAX_GRID_YZ or H > MAX_GRID_YZ:
        raise ValueError(f"attention: {B} batches x {H} heads; the kernels' grid takes at most {MAX_GRID_YZ} of "
                         f"each (fold batches into fewer, longer ones, or split the call)")
    if mask is not None:
        check_tensor("attention: mask", mask, ndim=2, device=q.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"attention: mask must be a bool tensor (True = attend), got {mask.dtype}")
        if tuple(mask.shape) != (B, k.shape[2]):
            raise ValueError(f"attention: mask has shape {tuple(mask.shape)}; a key padding mask must be "
                             f"(batch, keys) = ({B}, {k.shape[2]})")
    dropout_p = as_float("attention: dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False, dropout_p: float = 0.0, scale: float | None = None, *,
              seed: int | None = None) -> torch.Tensor:
    """softmax(scale * q k^T + masks) v for (B, H, N, D) tensors, fused: no N x N matrix in memory.

    Like ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)``:

    * ``mask``: optional (B, N_k) bool key padding mask, True = attend. Query rows whose keys are all
      masked come out as 0, with zero gradients (as PyTorch's SDPA does).
    * ``causal``: query i attends to keys j <= i (top-left aligned when N_q != N_k).
    * ``dropout_p``: dropout on the attention probabilities (applied whenever > 0, as SDPA does).
      ``seed`` fixes the dropout mask; by default it is drawn from torch's CPU generator, so
      ``torch.manual_seed`` makes a call reproducible.
    * ``scale``: defaults to 1 / sqrt(D).

    k and v may have a different length N_k from q's N_q. Returns a contiguous (B, H, N_q, D) tensor.
    """
    dropout_p = _check_inputs(q, k, v, mask, dropout_p)
    B, H, N_Q, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else as_float("attention: scale", scale)
    if N_Q == 0 or B * H == 0 or k.shape[2] == 0:
        # Nothing to compute; no keys means every row is "fully masked", and SDPA returns zeros. The
        # zero terms keep q, k and v in the autograd graph: zero gradients of their shapes, as SDPA's.
        return q * 0.0 + (k.sum() + v.sum()) * 0.0
    if scale < 0:  # the kernels' running max needs scale > 0: (-s) q.k = s (-q).k
        q, scale = -q, -scale
    elif scale == 0:  # every score is 0: attention is a plain average of v (over the unmasked keys)
        q, scale = q * 0.0, 1.0
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    seed, seed_base = _philox_key(dropout_p, seed, q)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return AttentionFunction.apply(q, k, v, mask, bool(causal), float(dropout_p), scale, seed, seed_base)
    o, _ = attention_forward(q, k, v, mask, causal, dropout_p, scale, seed, need_lse=False, seed_base=seed_base)
    return o


# ----------------------------------------------------------------------------- packed q | k | v


def split_heads(qkv: torch.Tensor, heads: int):
    """Three (B, H, N, D) views of a packed (B, N, 3 * H * D) tensor: no copy.

    Unbinding dim 2 means that autograd's backward of the views stacks dq, dk, dv straight into
    qkv's contiguous layout (the model's path for a KV cache and for PyTorch attention uses this).
    """
    B, N, C = qkv.shape
    return tuple(t.transpose(1, 2) for t in qkv.view(B, N, 3, heads, C // (3 * heads)).unbind(2))


class PackedAttentionFunction(torch.autograd.Function):
    """Attention on the packed output of one qkv projection, with no copy in either direction.

    Splitting (B, N, 3*H*D) into heads and back costs PyTorch a copy of every gradient
    (the backward of ``unbind`` stacks dq, dk, dv) and one of the output each way (heads
    back to (B, N, H*D)). Here the kernels take strides instead: the forward writes O
    straight into (B, N, H, D), the backward writes dq, dk, dv straight into one tensor
    laid out like qkv.
    """

    @staticmethod
    def forward(ctx, qkv, heads, mask, causal, dropout_p, scale, seed, seed_base=None):
        q, k, v = split_heads(qkv, heads)
        B, H, N, D = q.shape
        out = qkv.new_empty((B, N, H, D))
        _, lse = attention_forward(q, k, v, mask, causal, dropout_p, scale, seed, need_lse=True,
                                   out=out.transpose(1, 2), seed_base=seed_base)
        ctx.save_for_backward(qkv, out, lse, mask, seed_base)
        ctx.heads, ctx.causal, ctx.dropout_p, ctx.scale, ctx.seed = heads, causal, dropout_p, scale, seed
        return out.view(B, N, H * D)

    @staticmethod
    @no_double_backward
    def backward(ctx, dout):
        qkv, out, lse, mask, seed_base = ctx.saved_tensors
        B, N, H, D = out.shape
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        attention_backward(dout.reshape(B, N, H, D).transpose(1, 2), *split_heads(qkv, H), out.transpose(1, 2),
                           lse, mask, ctx.causal, ctx.dropout_p, ctx.scale, ctx.seed, grads=split_heads(dqkv, H),
                           seed_base=seed_base)
        return dqkv, None, None, None, None, None, None, None


def attention_qkv(qkv: torch.Tensor, heads: int, mask: torch.Tensor | None = None, causal: bool = False,
                  dropout_p: float = 0.0, scale: float | None = None, *, seed: int | None = None) -> torch.Tensor:
    """`attention` on a packed projection: (B, N, 3 * heads * D) in, (B, N, heads * D) out.

    The last dimension of ``qkv`` holds q, then k, then v, each ``heads`` heads of D
    (what ``nn.Linear(dim, 3 * heads * D)`` produces); the output has the heads side by
    side, ready for the output projection. Same options as `attention`. The result
    equals ``attention(q, k, v, ...).transpose(1, 2).reshape(B, N, heads * D)`` on the
    split heads, without the copies that splitting and merging them cost.
    """
    check_tensor("attention_qkv: qkv", qkv, dtypes=FLOAT_DTYPES, ndim=3, dot=True)
    scale = None if scale is None else as_float("attention_qkv: scale", scale)
    n_heads = positive_int(heads)
    if n_heads is None or qkv.shape[-1] % (3 * n_heads):
        raise ValueError(f"attention_qkv: the last dimension of qkv ({qkv.shape[-1]}) must be 3 * heads * head_dim "
                         f"with heads a positive int, got heads={heads!r}")
    heads = n_heads
    qkv = qkv.contiguous()  # (a no-op for a projection's output)
    q, k, v = split_heads(qkv, heads)
    dropout_p = _check_inputs(q, k, v, mask, dropout_p)
    B, H, N, D = q.shape
    if N == 0 or B == 0 or (scale is not None and scale <= 0):  # the general function's special cases
        o = attention(q, k, v, mask, causal, dropout_p, scale, seed=seed)
        return o.transpose(1, 2).reshape(B, N, H * D)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    seed, seed_base = _philox_key(dropout_p, seed, qkv)
    if torch.is_grad_enabled() and qkv.requires_grad:
        return PackedAttentionFunction.apply(qkv, heads, mask, bool(causal), float(dropout_p), scale, seed, seed_base)
    out = qkv.new_empty((B, N, H, D))
    attention_forward(q, k, v, mask, causal, dropout_p, scale, seed, need_lse=False, out=out.transpose(1, 2),
                      seed_base=seed_base)
    return out.view(B, N, H * D)
