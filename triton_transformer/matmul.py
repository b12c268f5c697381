"""Linear layers in Triton: y = act(x @ W^T + b), forward and backward, for every projection of the GPT.

    forward    z = x W^T + b            y = act(z)
    backward   dz = dy * act'(z)        dx = dz W        dW = dz^T x        db = sum_rows dz

All three matmuls are the same kernel, C = A @ B (+ bias, activation), which takes
A and B with arbitrary strides. The forward passes B = W^T, the backward passes
A = dz with B = W, and A = dz^T with B = x: transposes are just swapped strides,
so nothing is copied, and dW sums over every row of x (all leading dimensions
flattened) inside the kernel's K loop, without a batch-sized temporary.

A GEMM is compute bound: an (M, K) x (K, N) product does 2MNK flops on
2(MK + KN + MN) bytes, hundreds of flops per byte at the sizes of a GPT. The
kernel's job is to keep the tensor cores fed: tiles of A and B staged through
shared memory (software pipelined, `num_stages` deep), fp32 accumulation in
registers, tiles visited in groups of GROUP_M rows so that programs running at
the same time share their A and B tiles in L2. What is *not* compute bound is
everything around the GEMM, which is why bias and activation are applied to the
fp32 accumulator before the single store (the epilogue), instead of as separate
passes over the (M, N) output.

Two kernels compute the tiles:

* `_matmul_kernel` loads tiles through pointers and masks. It runs everywhere:
  the interpreter, a T4, an A100, any strides.
* `_matmul_tma_kernel` (Hopper and newer, fp16/bf16) loads tiles with the Tensor
  Memory Accelerator through host-side tensor descriptors (tails are zero-filled
  by the hardware, no masks), stores them through descriptors too (asynchronous,
  in two half-width boxes) and is persistent: one program per SM walks over
  the tiles, so the epilogue of one tile overlaps the loads of the next.

Both are autotuned for large problems; small ones (the launches of a test, or of
generation with a tiny batch) take a fixed config and skip the autotuner.

Backward. For gelu the forward also stores the pre-activation z (one extra
(M, N) write) so the backward never recomputes x W^T (a whole GEMM). For relu
and relu^2 the derivative is recovered from the output y itself (y > 0, and
2 sqrt(y)), and y is kept alive by the next layer anyway: no extra bytes (fp16
relu^2 excepted: y = z^2 leaves fp16's range where z passes 256 and flushes to 0
below ~2e-4, so there z is stored as for gelu). One
elementwise kernel then forms dz = dy * act'(.) and, in the same pass,
per-block column sums for db (reduced by a second tiny kernel: deterministic,
no atomics). When the output tiles of dW are too few to fill the GPU (dW is
(out, in) however many rows were reduced), the K loop is split over several
programs whose fp32 partial sums are added by that same small reduction kernel.

`feed_forward` runs two projections with the activation between them as one
autograd node. Its backward needs no elementwise kernel: the GEMM that forms the
gradient at the activation's output multiplies by act' in its epilogue
(`matmul(..., grad_of=...)`), and both bias gradients come from the dW GEMMs' row sums.
A dropout between the projections happens in the first GEMM's epilogue too
(`dropout.keep_tile`, the mask `dropout` would draw), and for relu and relu^2 the
dropped activation's zeros carry the mask into that backward GEMM (`_grad_at_input`).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl

from . import runtime
from .dropout import dropout as tt_dropout, keep_tile, next_seed, philox_key, probability
from .runtime import FLOAT_DTYPES, cdiv, check_tensor, launch_memo, no_double_backward

try:  # host-side TMA descriptors (Triton >= 3.4); without them the pointer kernel does everything
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

#: Activation names accepted by `linear`, and the code the kernels switch on at compile time.
ACTIVATIONS = {None: 0, "relu": 1, "relu_squared": 2, "gelu": 3}
RELU, RELU_SQUARED, GELU = 1, 2, 3
#: Not an activation of the forward: the code under which the backward forms relu^2's derivative from z.
RELU_SQUARED_OF_Z = 4

# gelu (tanh form) = 0.5 z (1 + tanh(u)) = z * sigmoid(2u), with u = sqrt(2/pi) (z + 0.044715 z^3).
# 2u = z * (GELU_K1 + GELU_K2 z^2). Written with sigmoid where it must run in the interpreter (libdevice's
# tanh fails there) or be exact to fp32.
GELU_K1 = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))
GELU_K2 = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi) * 0.044715)
#: Compiled kernels may use the GPU's one-instruction tanh (tanh.approx.f32, sm_75 or newer: the T4,
#: A100 and H100 this book targets; a V100's ptxas refuses it) where the result is stored in 16 bits; the
#: interpreter cannot run inline PTX.
FAST_TANH = tl.constexpr(not runtime.INTERPRET and runtime.capability(runtime.DEVICE) >= (7, 5))

# ---------------------------------------------------------------- knobs (tests and the chapter change them)

#: Use the TMA kernel: "auto" (Hopper or newer, fp16/bf16, TMA-compatible strides), True (force it
#: wherever the strides allow, any dtype: used to test it under the interpreter), or False.
TMA = {"0": False, "1": True}.get(os.environ.get("TT_MATMUL_TMA", ""), "auto")
#: The TMA kernel stores its outputs with TMA too (asynchronous, overlapping the next tile) where rows allow.
TMA_STORE = True
#: Problems with fewer multiply-adds than this take SMALL_CONFIG instead of the autotuner.
AUTOTUNE_MIN_MACS = 1 << 26
#: How `_split_k` weighs a split's fp32 partials: tensor-core flops per byte of memory traffic. The H100
#: sustains ~650 TFLOP/s of bf16 GEMM and ~2.9 TB/s of HBM, 224; 300 charges the partials a third more,
#: as measured with a cold L2 (chapter 4: 3 splits beat 5 at GPT-2's feed-forward there, not with a warm one).
FLOPS_PER_BYTE = 300
#: Split the K loop in this many parts; None picks by the heuristic in `_split_k`.
SPLIT_K = None

# ---------------------------------------------------------------- configs

# The first config of each list is the one the interpreter runs (runtime.autotune keeps only it)
# and fits a T4's 64 KB of shared memory. The autotuner skips configs too big for the GPU at hand.
_POINTER_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=2, num_warps=4),
    # T4 / Ampere sized
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
    # Hopper sized
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    # one stage deeper: the best of 17 configs for dW = dz^T x at a GPT's projections (probe dwcfg, H100)
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
]

#: What small problems run, without autotuning. (The interpreter's cost is per program and per
#: operation, not per element: larger tiles make the CPU tests faster.)
SMALL_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_stages=3, num_warps=4)
#: Small products of at most 16 rows in 16 bits, as generation runs every projection (one token at a time).
#: SMALL_CONFIG's 64-column tiles give a 512-wide projection 8 programs, each walking all of K; narrow
#: tiles with a long K step give it 32, each taking two steps. Measured on the H100 (bf16, a CUDA graph of
#: 50 calls, `benchmarks/experiments/skinny.py`): the seed model's five projections at M = 1 took 16.6 us
#: against 26.3 (the 2048-deep one 5.4 against 10.7). 16-bit only: fp32 tiles of this shape would not
#: fit three stages in a T4's 64 KB of shared memory.
SKINNY_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, GROUP_M=1, num_stages=3, num_warps=4)


def _set_tma_block_shapes(nargs):
    """Autotuner pre-hook: a TMA descriptor's box is the tile of the config being tried."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bk, bm] if nargs["A_T"] else [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_T"] else [bk, bn]
    if nargs["TMA_STORE"]:  # outputs are stored in two half-width boxes
        for name in ("c_desc", "z_desc"):
            nargs[name].block_shape = [bm, bn // 2]


def _tma_config(bm, bn, bk, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps, pre_hook=_set_tma_block_shapes)


_TMA_CONFIGS = [
    _tma_config(64, 64, 32, 3, 4),  # interpreter / smallest; never the winner on an H100
    _tma_config(128, 256, 64, 3, 8),
    _tma_config(128, 256, 64, 4, 8),
    _tma_config(256, 128, 64, 3, 8),
    _tma_config(128, 128, 64, 4, 8),
    _tma_config(128, 128, 64, 4, 4),
    _tma_config(128, 128, 128, 3, 8),
    _tma_config(64, 256, 64, 4, 4),
    _tma_config(128, 64, 64, 4, 4),
]

# The autotuner re-tunes for every new value of its key. Keying on the exact M, N, K would re-tune
# for every batch size (generation changes M at each step); we key on their powers of two instead.
_TUNE_KEY = ["M_KEY", "N_KEY", "K_KEY", "LAYOUT", "HAS_BIAS", "ACTIVATION", "STORE_Z", "ACT_GRAD", "SPLIT_K", "DROPOUT",
             "S_DROPPED"]

# ---------------------------------------------------------------- shared pieces of the kernels


@triton.jit
def _sigmoid(x):
    # exp of -|x| only, so it never overflows (1 / (1 + exp(-x)) would, harmlessly, for x << 0)
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tanh_approx(x):
    """tanh in one SFU instruction (max relative error about 2**-11, far below a bf16 ulp of 2**-8)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr, LOW_PRECISION_OUT: tl.constexpr = False):
    """act(z) in fp32: 0 identity, 1 relu, 2 relu^2 (Primer), 3 gelu (tanh form, via sigmoid).

    The epilogue's gelu runs once per output element, between the GEMM's tiles: with a 16-bit output
    (LOW_PRECISION_OUT) a compiled kernel takes tanh.approx, one instruction where the sigmoid form
    needs an exponential and two divisions.
    """
    # relu keeps a NaN, as torch.relu does (the GPU's max instruction alone would return the 0)
    if ACTIVATION == 1:
        y = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 2:
        r = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        y = r * r
    elif ACTIVATION == 3:
        if LOW_PRECISION_OUT and FAST_TANH:
            y = 0.5 * z * (1.0 + _tanh_approx(0.5 * z * (GELU_K1 + GELU_K2 * z * z)))
        else:
            y = z * _sigmoid(z * (GELU_K1 + GELU_K2 * z * z))
    else:
        y = z
    return y


@triton.jit
def _activation_grad(s, ACTIVATION: tl.constexpr):
    """act'(z) from what the forward saved (`_grad_source`): the output y for relu and relu^2, z for gelu.

    relu:   y > 0  <=>  z > 0, so act' = [y > 0]; written [not y <= 0] so that a NaN passes the gradient on
            as torch's relu backward does
    relu^2: act'(z) = 2 relu(z) = 2 sqrt(y), NaN where y is (code 4: 2 relu(z), from z itself)
    gelu:   y = z s(z) with s = sigmoid(z (K1 + K2 z^2)), so act' = s + z s (1 - s) (K1 + 3 K2 z^2).
            The sigmoid form even for a 16-bit result, where the forward's epilogue takes tanh.approx: the
            tanh form, (1 + t) / 2 + z (1 - t^2) u' / 2 with t = tanh(u), cancels as t nears -1 (z below -2,
            where act' is small): tanh.approx's error bound, 2**-11 of t, is 20% of act'(-3) = -0.0116.
            Measured (`benchmarks/experiments/act_bwd.py`), it would have saved 3% of this memory-bound pass.
    """
    if ACTIVATION == 1:
        g = tl.where(s <= 0.0, 0.0, 1.0)
    elif ACTIVATION == 2:
        g = 2.0 * tl.sqrt(tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL))
    elif ACTIVATION == 4:
        g = 2.0 * tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 3:
        sig = _sigmoid(s * (GELU_K1 + GELU_K2 * s * s))
        g = sig + s * sig * (1.0 - sig) * (GELU_K1 + 3.0 * GELU_K2 * s * s)
    else:
        g = tl.full(s.shape, 1.0, tl.float32)
    return g


@triton.jit
def _grad_at_input(s, ACT_GRAD: tl.constexpr, S_DROPPED: tl.constexpr, c):
    """The factor that takes a gradient at an activation's output to its input: act'(z), from s (`_activation_grad`).

    S_DROPPED: the output was dropped too, d = act(z) * keep * c with c = 1 / (1 - p), and s is d itself
    (relu and relu^2 only). With g(y) = act'(z) written as a function of the output y = act(z) ([y > 0]
    for relu, 2 sqrt(y) for relu^2), dd/dz = keep * c * act'(z) = c * g(d / c): where an element was
    dropped, d = 0 and g(0) = 0 carries the mask, which the backward never regenerates. Written
    without the division: c [d > 0] for relu, c * 2 sqrt(d / c) = 2 sqrt(c d) for relu^2. (A dropped
    element whose activation was inf or NaN is stored as NaN, and relu passes its gradient on, where
    linear, dropout, linear would give 0; the row's output is NaN either way.)
    """
    if S_DROPPED:
        if ACT_GRAD == 1:
            g = tl.where(s <= 0.0, 0.0, c)
        else:
            g = 2.0 * tl.sqrt(tl.maximum(s * c, 0.0, propagate_nan=tl.PropagateNan.ALL))
    else:
        g = _activation_grad(s, ACT_GRAD)
    return g


@triton.jit
def _dropped(y, seed, row0, rows, col0, N, dropout_p, drop_scale, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    """y * keep * drop_scale for the output tile at (row0 + rows, col0 + [0, BLOCK_N)) of an (M, N) matrix: the mask
    `dropout` draws for a contiguous (M, N) tensor with this seed. A dropped inf or NaN stays NaN, as there."""
    keep = keep_tile(seed, row0.to(tl.int64), rows, col0, N, dropout_p, BLOCK_N, GROUPED)
    return y * tl.where(keep, drop_scale, 0.0)


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index -> (row tile, column tile), walking GROUP_M row tiles down each column before moving right.

    Programs that run at the same time then read GROUP_M row panels of A and a few column
    panels of B, which stay in L2, instead of one row panel and *every* column panel of B.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_rows
    pid_n = (tile % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, pid_m, pid_n, split, M, N, c_ptr, stride_cm, stride_cs, bias_ptr, z_ptr, stride_zm,
              seed, dropout_p, drop_scale,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr, ACT_GRAD: tl.constexpr,
              DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr, S_DROPPED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bias, optional store of the pre-activation, activation, dropout and the one store of the tile.

    All of it happens on the fp32 accumulator in registers: fused, the bias and the activation
    cost no memory traffic; unfused, each would read and write the whole (M, N) output again.
    ACT_GRAD (an activation code) multiplies the tile by act'(s) instead, s read from z_ptr: a
    product that is the gradient at an activation's output leaves as the gradient at its input.
    DROPOUT drops the activated tile (`_dropped`, scaled by drop_scale); S_DROPPED says that s is such a
    dropped output, drop_scale its scale (`_grad_at_input`). Outputs have unit column stride (we allocate
    them); row offsets are int64 so that M * N may exceed 2**31 (logits of a large batch over a 50K vocabulary).
    """
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mask = ((row0 + rm) < M)[:, None] & ((col0 + rn) < N)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col0 + rn, mask=(col0 + rn) < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    z_tile = z_ptr + row0.to(tl.int64) * stride_zm + col0 + rm[:, None] * stride_zm + rn[None, :]
    if STORE_Z:
        tl.store(z_tile, acc.to(z_ptr.dtype.element_ty), mask=mask)
    if ACT_GRAD != 0:
        acc = acc * _grad_at_input(tl.load(z_tile, mask=mask, other=0.0).to(tl.float32), ACT_GRAD, S_DROPPED,
                                   drop_scale)
    y = _activation(acc, ACTIVATION, c_ptr.dtype.element_ty != tl.float32)
    if DROPOUT:
        y = _dropped(y, seed, row0, rm, col0, N, dropout_p, drop_scale, BLOCK_N, DROP_GROUPED)
    c_tile = c_ptr + split.to(tl.int64) * stride_cs + row0.to(tl.int64) * stride_cm + col0
    tl.store(c_tile + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- the GEMM kernels


def _exact_fp32(config) -> bool:
    """The pointer configs exact fp32 tries (`runtime.exact_fp32_pruner`): tiles of at most 8192 outputs with
    BLOCK_K = 32, 9 s of compiling for an H100 instead of 92 for the whole list."""
    return config.kwargs["BLOCK_K"] == 32 and config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 8192


@runtime.autotune(configs=_POINTER_CONFIGS, key=_TUNE_KEY + ["ROW_SUM"], exact_fp32=_exact_fp32)
@triton.jit(do_not_specialize=["seed"])
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, z_ptr, row_sum_ptr,
                   M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cs, stride_zm,
                   M_KEY, N_KEY, K_KEY, LAYOUT,  # autotuning key only (see _TUNE_KEY)
                   seed, seed_base_ptr, dropout_p, drop_scale,  # dropout of the output (see _epilogue)
                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr,
                   ACT_GRAD: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                   ROW_SUM: tl.constexpr, DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr, SEED_BASE: tl.constexpr,
                   S_DROPPED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[split] = act(A @ B + bias) over the K tiles of this split; A (M, K) and B (K, N) of any strides.

    Grid: (output tiles, SPLIT_K). A stride equal to 1 is specialised by Triton at compile time,
    so a row-major A and a transposed A (dz^T in the dW matmul) each get vectorised loads.
    ROW_SUM: the programs also add up the rows of the A tiles they load, and those of the first
    column of tiles store row_sum[split, m] = sum_k A[m, k] over the split's K range. In dW = dz^T x
    that is the bias gradient db = sum_rows dz, for a narrow extra product on tiles already on chip
    instead of another pass over dz.
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = split * tiles_per_split
    k_last = tl.minimum(k_first + tiles_per_split, k_tiles)

    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = (pid_m * BLOCK_M + rm) < M
    mask_n = (pid_n * BLOCK_N + rn) < N
    # 64-bit base of this program's tiles, small 32-bit offsets inside them
    a_ptrs = (a_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_am + (k_first * BLOCK_K).to(tl.int64) * stride_ak
              + rm[:, None] * stride_am + rk[None, :] * stride_ak)
    b_ptrs = (b_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_bn + (k_first * BLOCK_K).to(tl.int64) * stride_bk
              + rk[:, None] * stride_bk + rn[None, :] * stride_bn)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ROW_SUM:
        # Row sums as a second, narrow product A @ ones: the tile of A stays an operand of the tensor
        # cores only (summing it in registers took it out of the loads' software pipeline: 1.8x slower).
        # Every column of row_sums holds the same sum; 16 is the narrowest tile tl.dot takes.
        ones = tl.full((BLOCK_K, 16), 1.0, a_ptr.dtype.element_ty)
        row_sums = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    for kt in range(k_first, k_last):
        # Rows past M and columns past N load 0 (their results are never stored); so do
        # K past the end, where a 0 contributes nothing to the sum. EVEN_K drops that mask.
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if ROW_SUM:
            row_sums = tl.dot(a, ones, row_sums, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if ROW_SUM:
        if pid_n == 0:
            rows = pid_m * BLOCK_M + rm
            first = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, row_sums, 0.0), axis=1)
            tl.store(row_sum_ptr + split * M + rows, first, mask=rows < M)

    _epilogue(acc, pid_m, pid_n, split, M, N, c_ptr, stride_cm, stride_cs, bias_ptr, z_ptr, stride_zm,
              philox_key(seed, seed_base_ptr, SEED_BASE), dropout_p, drop_scale,
              HAS_BIAS, ACTIVATION, STORE_Z, ACT_GRAD, DROPOUT, DROP_GROUPED, S_DROPPED, BLOCK_M, BLOCK_N)


@triton.jit
def _epilogue_tma(acc, off_m, off_n, N, c_desc, bias_ptr, z_desc, seed, dropout_p, drop_scale,
                  HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr, ACT_GRAD: tl.constexpr,
                  DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr, S_DROPPED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The epilogue with TMA stores, in two half-width sub-tiles.

    A TMA store is asynchronous: the tile is copied to shared memory and the TMA unit writes it
    out while the program goes on to the loads of its next tile. With a short K loop (K = 768:
    twelve 64-wide steps) the store of a 128 x 256 tile weighs as much as a quarter of the loop,
    so overlapping it matters; halves need half the shared memory, which the pipeline's stages keep.
    The TMA unit also clips the boxes at the matrix's edges: no masks. With ACT_GRAD, s comes in
    through z_desc in the same two boxes (zeros past the edges). DROPOUT and S_DROPPED as in `_epilogue`:
    each half-width box gets the mask of its own columns.
    """
    if HAS_BIAS:
        cols = off_n + tl.arange(0, BLOCK_N)
        acc = acc + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
    left, right = tl.split(halves)  # columns [0, BLOCK_N / 2) and [BLOCK_N / 2, BLOCK_N)
    if STORE_Z:
        z_desc.store([off_m, off_n], left.to(z_desc.dtype))
        z_desc.store([off_m, off_n + BLOCK_N // 2], right.to(z_desc.dtype))
    if ACT_GRAD != 0:
        # Loaded here, where the waits stall the program: about 40 us of a 160 us dh GEMM at a GPT-2
        # feed-forward (16384 x 3072), against 108 us for the elementwise pass it replaces. Loading s
        # with pointers before the K loop, to overlap it, held a whole tile in registers: 264 us.
        left = left * _grad_at_input(z_desc.load([off_m, off_n]).to(tl.float32), ACT_GRAD, S_DROPPED, drop_scale)
        right = right * _grad_at_input(z_desc.load([off_m, off_n + BLOCK_N // 2]).to(tl.float32), ACT_GRAD,
                                       S_DROPPED, drop_scale)
    low_precision = c_desc.dtype != tl.float32
    left = _activation(left, ACTIVATION, low_precision)
    right = _activation(right, ACTIVATION, low_precision)
    if DROPOUT:
        rows = tl.arange(0, BLOCK_M)
        left = _dropped(left, seed, off_m, rows, off_n, N, dropout_p, drop_scale, BLOCK_N // 2, DROP_GROUPED)
        right = _dropped(right, seed, off_m, rows, off_n + BLOCK_N // 2, N, dropout_p, drop_scale, BLOCK_N // 2,
                         DROP_GROUPED)
    c_desc.store([off_m, off_n], left.to(c_desc.dtype))
    c_desc.store([off_m, off_n + BLOCK_N // 2], right.to(c_desc.dtype))


@runtime.autotune(configs=_TMA_CONFIGS, key=_TUNE_KEY + ["TMA_STORE"])
@triton.jit(do_not_specialize=["seed"])
def _matmul_tma_kernel(a_desc, b_desc, c_ptr, bias_ptr, z_ptr, c_desc, z_desc,
                       M, N, K,
                       stride_cm, stride_cs, stride_zm,
                       M_KEY, N_KEY, K_KEY, LAYOUT,  # autotuning key only
                       seed, seed_base_ptr, dropout_p, drop_scale,  # dropout of the output (see _epilogue)
                       A_T: tl.constexpr, B_T: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr,
                       ACT_GRAD: tl.constexpr, SPLIT_K: tl.constexpr, NUM_SMS: tl.constexpr, PRECISION: tl.constexpr,
                       TMA_STORE: tl.constexpr, DROPOUT: tl.constexpr, DROP_GROUPED: tl.constexpr,
                       SEED_BASE: tl.constexpr, S_DROPPED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The same product with TMA loads, persistent: NUM_SMS programs stride over (split, tile) work items.

    A descriptor describes a row-major matrix. A_T means the descriptor holds A^T (shape (K, M),
    e.g. dz when A = dz^T), so its tile is loaded as (BLOCK_K, BLOCK_M) and transposed in place,
    which costs nothing: the tensor cores read either orientation from shared memory.
    Likewise B_T: the descriptor holds B^T (shape (N, K), e.g. the weight W when B = W^T).
    Out-of-bounds parts of a box are filled with zeros by the TMA unit: no masks.
    TMA_STORE: the outputs go out through the descriptors c_desc and z_desc too (`_epilogue_tma`);
    otherwise (split-K partials, rows not 16-byte aligned) through c_ptr and z_ptr.
    """
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    seed = philox_key(seed, seed_base_ptr, SEED_BASE)
    for work in tl.range(tl.program_id(0), num_tiles * SPLIT_K, NUM_SMS, flatten=True):
        split = work // num_tiles  # split-major: programs running together share the same K range
        pid_m, pid_n = _tile_coords(work % num_tiles, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # The same trip count for every work item keeps the two loops flattenable into one
        # software pipeline; boxes of the last split that start past K just load zeros.
        for kk in range(0, tiles_per_split):
            off_k = (split * tiles_per_split + kk) * BLOCK_K
            if A_T:
                a = a_desc.load([off_k, off_m]).T
            else:
                a = a_desc.load([off_m, off_k])
            if B_T:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if TMA_STORE:
            _epilogue_tma(acc, off_m, off_n, N, c_desc, bias_ptr, z_desc, seed, dropout_p, drop_scale, HAS_BIAS,
                          ACTIVATION, STORE_Z, ACT_GRAD, DROPOUT, DROP_GROUPED, S_DROPPED, BLOCK_M, BLOCK_N)
        else:
            _epilogue(acc, pid_m, pid_n, split, M, N, c_ptr, stride_cm, stride_cs, bias_ptr, z_ptr, stride_zm,
                      seed, dropout_p, drop_scale, HAS_BIAS, ACTIVATION, STORE_Z, ACT_GRAD, DROPOUT, DROP_GROUPED,
                      S_DROPPED, BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------- backward helpers and reductions


@triton.jit
def _act_bwd_kernel(dy_ptr, s_ptr, dz_ptr, part_ptr, M, N, rows_per_prog,
                    stride_dym, stride_dyn, stride_sm, stride_dzm,
                    ACTIVATION: tl.constexpr, STORE_DZ: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz = dy * act'(s) for a (rows_per_prog, BLOCK_N) strip, plus the strip's column sums for db.

    One pass: dy and s are read once, dz written once, and the bias gradient needs no
    extra read of dz. The partial sums (one row per program row) are added by
    `_sum_rows_kernel` in a fixed order, so db is deterministic (no atomics).
    """
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_first = pid_r * rows_per_prog
    for r0 in range(row_first, tl.minimum(row_first + rows_per_prog, M), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & mask_n[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dz = tl.load(dy_ptr + rows64 * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION != 0:
            s = tl.load(s_ptr + rows64 * stride_sm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dz = dz * _activation_grad(s, ACTIVATION)
        if STORE_DZ:
            tl.store(dz_ptr + rows64 * stride_dzm + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc += dz  # masked lanes hold 0 * act'(0) = 0
    if HAS_BIAS:
        tl.store(part_ptr + pid_r.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=mask_n)


@triton.jit
def _sum_rows_kernel(x_ptr, out_ptr, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[j] = sum_r x[r, j] for a contiguous fp32 (R, N): the bias gradient's partial sums, or split-K partials."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(x_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :],
                       mask=(rows < R)[:, None] & mask_n[None, :], other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


# ---------------------------------------------------------------- launchers

def _split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """How many programs share the K loop of one output tile: the split that ends in the fullest waves.

    dW = dz^T x has a small (out, in) output but reduces over every row of the batch:
    (3072, 768) over 16384 rows is only 72 tiles of 128 x 256 (the tile the autotuner picks
    for it on the H100) for 132 SMs, so 60 SMs would idle. Splitting K in s parts makes
    s * tiles work items of K / s rows each, which run in ceil(s * tiles / SMs) waves; the
    time is about waves / s in units of one whole-K tile. The price: each split writes an
    fp32 partial (M, N), which `_sum_rows_kernel` reads back, 8 M N bytes against the
    product's 2 M N K flops. Pick the s in 1..8 with the least of both.
    """
    if SPLIT_K is not None:
        return max(1, int(SPLIT_K))
    if device.type != "cuda" or K < 4096:
        return 1
    sms = runtime.num_sms(device)
    tiles = cdiv(M, 128) * cdiv(N, 256)
    if tiles >= 2 * sms:  # two waves or more: a partial last wave idles the GPU for at most a third of the time
        return 1
    # One split's partials in the same unit: 8 M N bytes at HBM speed over one tile's 2 * 128 * 256 * K
    # flops at one SM's share of the tensor cores.
    partial = 4 * tiles * FLOPS_PER_BYTE / (K * sms)
    return min(range(1, min(8, K // 2048) + 1),  # K >= 4096 here: at least 2
               key=lambda s: cdiv(s * tiles, sms) / s + (partial * s if s > 1 else 0.0))


def _tma_operand(t: torch.Tensor):
    """(descriptor over t or t^T, transposed?) when t can feed TMA: one unit stride, 16-byte aligned rest."""
    if TensorDescriptor is None or t.data_ptr() % 16:
        return None
    size = t.element_size()
    rows, cols = t.shape
    if t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and rows > 0 and cols > 0:
        return TensorDescriptor(t, [rows, cols], [t.stride(0), 1], [1, 1]), False
    if t.stride(0) == 1 and (t.stride(1) * size) % 16 == 0 and rows > 0 and cols > 0:
        return TensorDescriptor(t, [cols, rows], [t.stride(1), 1], [1, 1]), True
    return None


def _tma_output(t: torch.Tensor):
    """A TMA descriptor over an output we allocated (row-major), or None where its rows are not 16-byte aligned."""
    desc = _tma_operand(t)
    return desc[0] if desc is not None and not desc[1] else None


def _tma_wanted(dtype: torch.dtype, device: torch.device) -> bool:
    if TMA is True:
        return True
    if TMA is False or TensorDescriptor is None or device.type != "cuda" or dtype == torch.float32:
        return False
    return runtime.capability(device) >= (9, 0)


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: int = 0,
           store_z: bool = False, out_dtype: torch.dtype | None = None,
           row_sum: torch.Tensor | None = None,
           grad_of: tuple[int, torch.Tensor] | None = None, s_dropped: float | None = None,
           dropout: tuple[float, int, torch.Tensor | None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(a @ b + bias), z or None) for 2-D `a` (M, K) and `b` (K, N) of any strides, in a's dtype.

    The building block of `linear` (no autograd here, no input checks: `linear` does those).
    With `store_z` the pre-activation z = a @ b + bias is returned too. `out_dtype` (e.g. fp32 for
    the gradient of an fp32 weight) changes the dtype the fp32 accumulator is stored in. A `row_sum`
    tensor of M elements receives a.sum(1) (the bias gradient, when a = dz^T), computed by the
    pointer kernel from the tiles of `a` it loads anyway. ``grad_of=(activation, s)``, with s what
    the forward saved for that activation (see `_activation_grad`), returns (a @ b) * act'(s): when
    a @ b is the gradient at an activation's output, the gradient at its input, in the same pass.
    ``dropout=(p, seed, seed_base)`` drops the activated output as `dropout.dropout` would with that key
    (the mask of a contiguous (M, N) tensor). ``s_dropped=1 / (1 - p)`` says that the s of `grad_of` is such
    a dropped relu or relu^2 output, whose zeros carry the mask (`_grad_at_input`).

    What to launch (kernel, split, TMA or pointers, descriptors, grid) is worked out once per kind of call
    (`_Plan`) and remembered under a key of the call's shapes, strides, dtypes and options; the launches
    themselves go through `runtime.launch_memo`. A repeated call (every projection of every training step)
    then costs its allocations and launches, not the decisions: on the H100 machines 28-34% less host time
    per call (`benchmarks/experiments/linear_host.py`).
    """
    M, K = a.shape
    N = b.shape[1]
    act_grad, s = grad_of if grad_of is not None else (0, None)
    if s is not None and s.stride(1) != 1:  # read where z would be written: same shape, unit column stride
        s = s.contiguous()
    if s_dropped is not None and act_grad not in (RELU, RELU_SQUARED):
        raise ValueError(f"matmul: s_dropped needs relu or relu^2's output as s (grad_of code {act_grad})")
    p, seed, seed_base = dropout if dropout is not None else (0.0, 0, None)
    # Everything `_Plan` decides from, and everything Triton specialises the kernels on (launch_memo's
    # contract): sizes and strides, dtypes, which options are on, each tensor's 16-byte alignment, whether
    # the seed fits in 32 bits, and the module's knobs (tests and the chapter change them).
    misaligned = (a.data_ptr() & 15, b.data_ptr() & 15, bias.data_ptr() & 15 if bias is not None else 0,
                  s.data_ptr() & 15 if s is not None else 0, row_sum.data_ptr() & 15 if row_sum is not None else 0,
                  seed_base.data_ptr() & 15 if seed_base is not None else 0)
    aligned = not any(misaligned)
    key = (a.get_device(), M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), a.dtype, b.dtype,
           (bias.dtype, bias.stride(0)) if bias is not None else None, activation, store_z, out_dtype,
           (row_sum.dtype, row_sum.is_contiguous()) if row_sum is not None else None,
           (act_grad, s.dtype, s.stride(0)) if s is not None else act_grad, s_dropped is None, dropout is None,
           seed_base is None, -2**31 <= seed < 2**31, misaligned, runtime.dot_precision(a.dtype),
           TMA, TMA_STORE, SPLIT_K, AUTOTUNE_MIN_MACS, FLOPS_PER_BYTE)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= runtime.MEMO_SIZE:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(a, b, bias, activation, store_z, out_dtype, row_sum, s, act_grad,
                                   s_dropped, dropout, seed_base)
    c = torch.empty((M, N), dtype=plan.c_dtype, device=a.device)
    z = torch.empty((M, N), dtype=a.dtype, device=a.device) if store_z else None
    if M == 0 or N == 0:
        if row_sum is not None:  # no output tile to sum in (e.g. dW of a layer with no input features)
            row_sum.copy_(a.sum(1, dtype=torch.float32))
        return c, z
    split = plan.split
    out = c if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=a.device)
    # one fp32 partial row sum per split, added up below; written in place when there is one, in fp32
    sums = None
    if row_sum is not None:
        sums = row_sum if plan.sums_in_place else torch.empty((split, M), dtype=torch.float32, device=a.device)
    bias_arg = c if bias is None else bias if plan.bias_contiguous else bias.contiguous()  # read with unit stride
    zs = z if z is not None else s
    z_arg = zs if zs is not None else c
    drop_scale = 1.0 / (1.0 - p) if dropout is not None else (s_dropped or 1.0)
    drop_args = (seed, seed_base if seed_base is not None else c, float(p), float(drop_scale))
    stride_cs = out.stride(0) if split > 1 else 0
    stride_zm = zs.stride(0) if zs is not None else 0
    memo_key = key if aligned else None  # launch_memo wants aligned tensors (its docstring says why)
    if plan.tma:
        try:
            # The first launch per key goes through the autotuner, whose pre-hook sets each descriptor's
            # box to the winning tile; later ones take the cached path, where Triton's launcher builds the
            # TMA descriptors from the compiled kernel's own block sizes.
            c_desc = _rebased(plan.c_desc, c) if plan.c_desc is not None else c  # any argument of a fixed type
            z_desc = _rebased(plan.z_desc, zs) if plan.z_desc is not None else c_desc
            launch_memo(_TMA_MEMO, memo_key, plan.kernel, plan.grid, _rebased(plan.a_desc, a),
                        _rebased(plan.b_desc, b), out, bias_arg, z_arg, c_desc, z_desc, M, N, K, N, stride_cs,
                        stride_zm, *plan.tune_keys, plan.layout, *drop_args, **plan.meta)
        except Exception as err:  # a Triton without working TMA support: say so once, then use pointers
            if TMA is True:
                raise
            warnings.warn(f"triton_transformer.matmul: the TMA kernel failed ({type(err).__name__}: "
                          f"{str(err)[:200]}); using the pointer kernel from now on")
            globals()["TMA"] = False
            return matmul(a, b, bias, activation, store_z, out_dtype, row_sum, grad_of, s_dropped, dropout)
    else:
        launch_memo(_POINTER_MEMO, memo_key, plan.kernel, plan.grid, a, b, out, bias_arg, z_arg,
                    sums if sums is not None else c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                    N, stride_cs, stride_zm, *plan.tune_keys, plan.layout, *drop_args, **plan.meta)
    if split > 1:
        _sum_rows(out.view(split, M * N), c.view(-1), memo_key and (memo_key, "split"))
    if sums is not None and sums is not row_sum:
        _sum_rows(sums, row_sum, memo_key and (memo_key, "row sums"))
    return c, z


#: `matmul`'s plans and compiled launches, per call key (`runtime.launch_memo`).
_PLANS: dict = {}
_TMA_MEMO: dict = {}
_POINTER_MEMO: dict = {}
_SUM_MEMO: dict = {}


class _Plan:
    """How `matmul` runs one kind of call: what follows from its key alone, worked out at its first call.

    split: programs per output tile's K loop (split-K, plain products only). tma: the TMA kernel, with
    descriptor templates over a, b and the outputs (`_rebased` puts each call's tensors in them), or the
    pointer kernel (autotuned for big problems, a fixed config for small ones). meta: the constexprs.
    """

    __slots__ = ("c_dtype", "split", "sums_in_place", "bias_contiguous", "tma", "a_desc", "b_desc", "c_desc",
                 "z_desc", "kernel", "grid", "tune_keys", "layout", "meta")

    def __init__(self, a, b, bias, activation, store_z, out_dtype, row_sum, s, act_grad, s_dropped, dropout,
                 seed_base):
        M, K = a.shape
        N = b.shape[1]
        self.c_dtype = out_dtype or a.dtype
        # split-K only for plain products (dW): bias and activation need the full sum
        split = 1 if (bias is not None or activation or store_z or s is not None or dropout) \
            else _split_k(M, N, K, a.device)
        self.split = split = min(split, max(1, cdiv(K, 32)))
        self.sums_in_place = (row_sum is not None and split == 1 and row_sum.dtype == torch.float32
                              and row_sum.is_contiguous())
        self.bias_contiguous = bias is None or bias.stride(0) == 1
        self.meta = dict(HAS_BIAS=bias is not None, ACTIVATION=activation, STORE_Z=store_z, ACT_GRAD=act_grad,
                         SPLIT_K=split, PRECISION=runtime.dot_precision(a.dtype), DROPOUT=dropout is not None,
                         DROP_GROUPED=N % 4 == 0, SEED_BASE=seed_base is not None, S_DROPPED=s_dropped is not None)
        self.tune_keys = (runtime.pow2_at_least_16(M), runtime.pow2_at_least_16(N), runtime.pow2_at_least_16(K))
        big = M * N * K >= AUTOTUNE_MIN_MACS
        # dW = dz^T x reads A column-major (a.stride(0) == 1): measured on the H100, the TMA kernel was 1.1x
        # to 4x slower there than the pointer kernel with its split-K, so "auto" leaves dW to the pointers.
        a_columns = a.stride(0) == 1 and a.stride(1) != 1
        tma = ((big and K > 0 and not a_columns and _tma_wanted(a.dtype, a.device)) or (TMA is True and K > 0)) \
            and row_sum is None  # the row sums live in the pointer kernel only
        desc_a = _tma_operand(a) if tma else None
        desc_b = _tma_operand(b) if desc_a is not None else None
        self.tma = desc_a is not None and desc_b is not None
        self.a_desc = self.b_desc = self.c_desc = self.z_desc = None
        if self.tma:
            (a_desc, a_t), (b_desc, b_t) = desc_a, desc_b
            self.a_desc, self.b_desc = _rebased(a_desc, None), _rebased(b_desc, None)  # templates hold no tensor
            sms = runtime.num_sms(a.device)
            self.grid = lambda meta: (min(sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]) * split),)
            # TMA stores need 16-byte aligned rows (of c and of z or s), and one (M, N) matrix: not split-K's
            # partials. c and z are allocated by every call, row-major.
            c_desc = _output_template(M, N, self.c_dtype, a.device) if split == 1 and TMA_STORE else None
            z_desc = None
            if c_desc is not None:
                z_desc = _output_template(M, N, a.dtype, a.device) if store_z else \
                    _tma_output(s) if s is not None else None
            tma_store = c_desc is not None and ((not store_z and s is None) or z_desc is not None)
            if tma_store:
                self.c_desc = c_desc
                self.z_desc = _rebased(z_desc, None) if z_desc is not None else None
            self.layout = 2 * a_t + b_t
            self.meta.update(A_T=a_t, B_T=b_t, NUM_SMS=sms, TMA_STORE=tma_store)
            self.kernel = _matmul_tma_kernel
        else:
            self.layout = 2 * int(a.stride(0) == 1) + int(b.stride(1) != 1)
            if big:
                self.kernel = _matmul_kernel
                self.grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), split)
                # every BLOCK_K of the configs divides 128, so K % 128 == 0 means no K tail in any config
                self.meta.update(EVEN_K=K % 128 == 0, ROW_SUM=row_sum is not None)
            else:
                cfg = SKINNY_CONFIG if M <= 16 and a.element_size() == 2 else SMALL_CONFIG
                self.kernel = _matmul_kernel.fn
                self.grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), split)
                self.meta.update(EVEN_K=K % cfg["BLOCK_K"] == 0, ROW_SUM=row_sum is not None, **cfg)


def _output_template(M: int, N: int, dtype: torch.dtype, device: torch.device):
    """A descriptor template (no tensor in it, `_rebased`) over a row-major (M, N) output in `dtype`, or None
    where its rows are not 16-byte aligned. Built on a small stand-in: the constructor checks the base's
    alignment and dtype, which every allocation of the real output has."""
    if TensorDescriptor is None or (N * dtype.itemsize) % 16:  # (M, N > 0: a TMA plan's operands are not empty)
        return None
    return _rebased(TensorDescriptor(torch.empty(8, dtype=dtype, device=device), [M, N], [N, 1], [1, 1]), None)


def _rebased(desc, t):
    """TMA descriptor `desc` over tensor `t` instead (same shape, strides and dtype; 16-byte aligned), without
    the constructor's checks (microseconds a descriptor, three or four a call): the plan checked them."""
    copy = object.__new__(type(desc))
    copy.__dict__.update(desc.__dict__)
    copy.base = t
    return copy


def _sum_rows(x: torch.Tensor, out: torch.Tensor, key=None) -> None:
    """out = x.sum(0) for a contiguous fp32 (R, N), deterministic, cast to out's dtype. `key`: `runtime.launch_memo`'s."""
    R, N = x.shape
    block_n = 256 if runtime.INTERPRET else 1024
    launch_memo(_SUM_MEMO, key, _sum_rows_kernel, (cdiv(N, block_n),), x, out, R, N, BLOCK_R=8, BLOCK_N=block_n,
                num_warps=4)


def activation_backward(dy: torch.Tensor, saved: torch.Tensor | None, activation: int, bias_grad: bool,
                        bias_dtype: torch.dtype | None = None):
    """(dz, db): dz = dy * act'(saved) (dy itself when there is no activation) and db = dz.sum(0) if asked."""
    M, N = dy.shape
    if activation == 0 and not bias_grad:
        return dy, None
    if dy.stride(1) * (N - 1) >= 2**31:
        # The kernel's column offsets are 32-bit (64-bit ones would cost its vectorised loads). A gradient
        # whose columns lie 2**31 elements apart or more (one that arrives transposed, past 2**31 elements)
        # is read from a contiguous copy instead.
        dy = dy.contiguous()
    dz = torch.empty((M, N), dtype=dy.dtype, device=dy.device) if activation else dy
    # the partial sums' reduction writes every column of db: zeros (a fill kernel) only when there are no rows
    alloc_db = torch.zeros if M == 0 else torch.empty
    db = alloc_db(N, dtype=bias_dtype or dy.dtype, device=dy.device) if bias_grad else None
    if M == 0 or N == 0:
        return dz, db
    block_m, block_n = (32, 64) if runtime.INTERPRET else (32, 128)
    col_progs = cdiv(N, block_n)
    # enough row strips for ~4 programs per SM, each strip a whole number of BLOCK_M rows
    row_progs = max(1, min(cdiv(M, block_m), 4 * runtime.num_sms(dy.device) // col_progs))
    rows_per_prog = cdiv(cdiv(M, row_progs), block_m) * block_m
    row_progs = cdiv(M, rows_per_prog)
    part = torch.empty((row_progs, N), dtype=torch.float32, device=dy.device) if bias_grad else dz
    s = saved if saved is not None else dy
    runtime.launch(
        _act_bwd_kernel, (row_progs, col_progs),
        dy, s, dz, part, M, N, rows_per_prog, dy.stride(0), dy.stride(1), s.stride(0), dz.stride(0),
        ACTIVATION=activation, STORE_DZ=activation != 0, HAS_BIAS=bias_grad,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    if bias_grad:
        _sum_rows(part, db)
    return dz, db


# ---------------------------------------------------------------- autograd and the public function


def _unflatten(y2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (rows, out) result given x's leading dimensions (outside the Function: see `runtime.shaped`)."""
    return runtime.shaped(y2, x.shape[:-1] + y2.shape[-1:])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as a 2-D (rows, K) view; copies only if the leading dimensions cannot be flattened."""
    # the row count spelled out: reshape(-1, 0) is ambiguous for a dimension of size 0 (no input features)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _param_grads(dz: torch.Tensor, x2: torch.Tensor, need_w: bool, need_b: bool, weight_dtype: torch.dtype,
                 bias_dtype: torch.dtype | None):
    """(dW, db) of a projection whose pre-activation gradient is dz: dW = dz^T x over all rows, db = sum_rows dz.

    The dW matmul reads all of dz anyway (as A = dz^T): its row sums are the bias gradient, with no
    pass of their own over dz. Only a frozen weight with a trained bias needs that pass.
    """
    if need_w:
        db = torch.empty(dz.shape[1], dtype=bias_dtype, device=dz.device) if need_b else None
        return matmul(dz.t(), x2, out_dtype=weight_dtype, row_sum=db)[0], db
    return None, (activation_backward(dz, None, 0, True, bias_dtype)[1] if need_b else None)


def _grad_source(activation: int, dtype: torch.dtype) -> tuple[bool, int]:
    """(store z?, the code `_activation_grad` takes) for a forward with `activation` computed in `dtype`.

    gelu' needs z. relu' and relu^2' are recovered from the output y, which the next layer keeps anyway,
    except relu^2 in fp16: y = z^2 is inf for z above 256 and 0 (or a coarse subnormal) below ~2e-4, where
    2 sqrt(y) would give inf or 0 for PyTorch's finite 2z. There z is stored and act' = 2 relu(z).
    """
    if activation == GELU:
        return True, GELU
    if activation == RELU_SQUARED and dtype == torch.float16:
        return True, RELU_SQUARED_OF_Z
    return False, activation


class LinearFunction(torch.autograd.Function):
    """y = act(x W^T + b). Saves x only if W needs a gradient, W only if x does, and z for gelu (`_grad_source`).

    An fp32 weight with 16-bit x (mixed precision) is cast here, once; dW is written straight in fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation: int):
        need_x, need_w, _ = ctx.needs_input_grad[:3]
        x2 = _rows(x)
        w = _as_dtype_of(weight, x)
        keep_z, ctx.grad_code = _grad_source(activation, x2.dtype)
        y2, z2 = matmul(x2, w.t(), bias, activation, store_z=keep_z)
        saved = z2 if keep_z else (y2 if activation else None)
        ctx.save_for_backward(x2 if need_w else None, w if need_x else None, saved)
        ctx.activation = activation
        ctx.x_shape = x.shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y2  # (rows, out): `linear` gives it x's leading dimensions (see `_unflatten`)

    @staticmethod
    @no_double_backward
    def backward(ctx, dy):
        x2, weight, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy2 = _rows(dy)
        # With an activation, the pass that forms dz sums its columns for db on the way; without one,
        # dz = dy and db comes with dW (`_param_grads`).
        act = ctx.activation
        dz, db = activation_backward(dy2, saved, ctx.grad_code, need_b and act != 0, ctx.bias_dtype)
        dx = matmul(dz, weight)[0].view(ctx.x_shape) if need_x else None  # dx = dz W
        dw, db_plain = _param_grads(dz, x2, need_w, need_b and act == 0, ctx.weight_dtype, ctx.bias_dtype)
        return dx, dw, db if act else db_plain, None


class FeedForwardFunction(torch.autograd.Function):
    """y = act(x W1^T + b1) W2^T + b2, two linears whose backward never writes the gradient at h = act(z).

    As two `LinearFunction`s the backward writes dh = dy W2 (rows x hidden, the widest activation of
    a block), reads it back with the saved h to form dz = dh * act'(.), and writes dz. Here the
    GEMM that produces dh multiplies by act' in its epilogue (`matmul(..., grad_of=...)`) and writes
    dz directly: one (rows x hidden) write and one read fewer per step, and no elementwise kernel.

    With ``dropout=(p, seed, seed_base)`` (relu and relu^2 from their output only: `fused_dropout`) h is the
    dropped activation, masked in the first GEMM's epilogue; its zeros carry the mask into the backward's
    act' (`_grad_at_input`), so the backward never regenerates it and needs no seed.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation: int, dropout=None):
        need_x, need_w1, need_b1 = ctx.needs_input_grad[:3]
        x2 = _rows(x)
        w1c, w2c = _as_dtype_of(w1, x), _as_dtype_of(w2, x)
        keep_z, ctx.grad_code = _grad_source(activation, x2.dtype)
        h, z = matmul(x2, w1c.t(), b1, activation, store_z=keep_z, dropout=dropout)
        ctx.s_dropped = 1.0 / (1.0 - dropout[0]) if dropout is not None else None  # the backward needs no seed
        y2, _ = matmul(h, w2c.t(), b2)
        # h feeds dW2 = dy^T h and, for relu and relu^2, act' too; gelu' needs z (`_grad_source`). W2 is needed for any
        # gradient of the first layer; x only for dW1, W1 only for dx.
        ctx.save_for_backward(x2 if need_w1 else None, w1c if need_x else None, h,
                              w2c if (need_x or need_w1 or need_b1) else None, z)
        ctx.activation = activation
        ctx.x_shape = x.shape
        ctx.dtypes = [t.dtype if t is not None else None for t in (w1, b1, w2, b2)]
        return y2  # (rows, out), as LinearFunction's

    @staticmethod
    @no_double_backward
    def backward(ctx, dy):
        x2, w1, h, w2, z = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.dtypes
        dy2 = _rows(dy)
        dx = dw1 = db1 = None
        dw2, db2 = _param_grads(dy2, h, need_w2, need_b2, w2_dtype, b2_dtype)
        if need_x or need_w1 or need_b1:
            act = ctx.activation
            dz = matmul(dy2, w2, grad_of=(ctx.grad_code, z if z is not None else h) if act else None,
                        s_dropped=ctx.s_dropped)[0]  # (dy W2) act', and the mask with its scale if h was dropped
            if need_x:
                dx = matmul(dz, w1)[0].view(ctx.x_shape)
            dw1, db1 = _param_grads(dz, x2, need_w1, need_b1, w1_dtype, b1_dtype)
        return dx, dw1, db1, dw2, db2, None, None


def _as_dtype_of(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


def _mixed_ok(param: torch.Tensor, x: torch.Tensor) -> bool:
    """A parameter's dtype is x's, or fp32 with 16-bit x (an fp32 master copy under mixed precision)."""
    return param.dtype == x.dtype or (param.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16))


def _check_activation(fn: str, activation) -> int:
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: unknown activation {activation!r}; choose one of "
                         f"{', '.join(repr(a) for a in ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def _check_layer(fn: str, x: torch.Tensor, features: int | None, what: str, weight: torch.Tensor,
                 bias: torch.Tensor | None, w: str = "weight", b: str = "bias") -> None:
    """Clear errors for one projection of `features` inputs (None: x's last dimension; or a hidden width)."""
    check_tensor(f"{fn} input x", x, dtypes=FLOAT_DTYPES, dot=True)
    check_tensor(f"{fn} {w}", weight, dtypes=FLOAT_DTYPES, device=x.device, ndim=2)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least 1 dimension (..., in_features), got a scalar")
    features = x.shape[-1] if features is None else features
    if not _mixed_ok(weight, x):
        raise TypeError(f"{fn}: {w} has dtype {str(weight.dtype)[6:]} but x has dtype {str(x.dtype)[6:]}; "
                        "cast one of them (as with F.linear, both must match)")
    if features != weight.shape[1]:
        where = f" in its last dimension (shape {tuple(x.shape)})" if what == "x" else ""
        raise ValueError(f"{fn}: {what} has {features} features{where} but {w} of shape {tuple(weight.shape)} "
                         f"= (out_features, in_features) expects {weight.shape[1]}")
    if bias is not None:
        check_tensor(f"{fn} {b}", bias, dtypes=FLOAT_DTYPES, device=x.device, ndim=1)
        if not _mixed_ok(bias, x):
            raise TypeError(f"{fn}: {b} has dtype {str(bias.dtype)[6:]} but x has dtype {str(x.dtype)[6:]}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{fn}: {b} has {bias.shape[0]} elements but {w} has {weight.shape[0]} "
                             "output features")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias), like ``F.linear`` followed by an activation, fused, with a Triton backward.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None;
    activation: None, "relu", "relu_squared" (Primer's squared ReLU) or "gelu" (tanh approximation,
    ``F.gelu(approximate="tanh")``). Computed with fp32 accumulation, returned in x's dtype.

    Mixed precision: with fp16/bf16 x, weight and bias may be fp32 (the model's parameters under
    autocast). The product runs in x's dtype as autocast's would (the weight cast once, inside), the
    bias is added in fp32 in the epilogue, and both gradients come back in fp32 from the kernels that
    compute them: autocast's four cast kernels per projection (weight and bias, forward and backward)
    are not needed.
    """
    act = _check_activation("linear", activation)
    _check_layer("linear", x, None, "x", weight, bias)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _unflatten(LinearFunction.apply(x, weight, bias, act), x)
    # no gradient wanted: nothing is saved, no pre-activation is stored
    y2, _ = matmul(_rows(x), _as_dtype_of(weight, x).t(), bias, act)
    return _unflatten(y2, x)


def fused_dropout(activation: int, dtype: torch.dtype, p: float) -> bool:
    """Whether `feed_forward` drops its hidden layer inside the first GEMM (else: `linear`, `dropout`, `linear`).

    The fused backward reads the mask from the dropped output's zeros, which needs an activation whose
    derivative comes from its output and is 0 where the output is (relu, relu^2), stored as the output
    (`_grad_source`: not relu^2 in fp16, which keeps z); p = 1 leaves no output to scale back.
    """
    return 0.0 < p < 1.0 and activation in (RELU, RELU_SQUARED) and not _grad_source(activation, dtype)[0]


def feed_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None, activation: str | None = "relu_squared", dropout_p: float = 0.0,
                 seed: int | None = None) -> torch.Tensor:
    """``linear(dropout(linear(x, w1, b1, activation), dropout_p, seed=seed), w2, b2)``, fused.

    The same values and gradients as those calls, up to rounding (`FeedForwardFunction` says what it saves
    in memory traffic; `_grad_at_input` names the one exception, a dropped inf or NaN). w1: (hidden,
    in_features), w2: (out_features, hidden). The backward multiplies by act' inside a GEMM. A transformer
    block's feed-forward: with relu or relu^2 the dropout (`dropout_p` > 0, the mask of `dropout.dropout`
    with `seed`, or a drawn one) happens in the first GEMM's epilogue too (`fused_dropout` says when);
    otherwise the three calls run as they are.
    """
    act = _check_activation("feed_forward", activation)
    _check_layer("feed_forward", x, None, "x", w1, b1, "w1", "b1")
    _check_layer("feed_forward", x, w1.shape[0], "the hidden layer (w1's out_features)", w2, b2, "w2", "b2")
    p = probability("feed_forward: dropout_p", dropout_p)
    if p > 0 and not fused_dropout(act, x.dtype, p):
        return linear(tt_dropout(linear(x, w1, b1, activation), p, seed=seed), w2, b2)
    dropout = (p, *next_seed(seed, x)) if p > 0 else None
    tensors = [t for t in (x, w1, b1, w2, b2) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _unflatten(FeedForwardFunction.apply(x, w1, b1, w2, b2, act, dropout), x)
    h, _ = matmul(_rows(x), _as_dtype_of(w1, x).t(), b1, act, dropout=dropout)
    y2, _ = matmul(h, _as_dtype_of(w2, x).t(), b2)
    return _unflatten(y2, x)
