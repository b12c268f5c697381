"""Layer normalization over the trailing dimensions, forward and backward.

For a row x of N elements (the normalized dimensions flattened), with
weight w and bias b:

    mean = sum_j x_j / N          rstd = 1 / sqrt(sum_j (x_j - mean)^2 / N + eps)
    xhat_j = (x_j - mean) * rstd  y_j  = xhat_j * w_j + b_j

and, with g = dy * w (the gradient that reaches xhat):

    dx_j = rstd * (g_j - mean_k(g_k) - xhat_j * mean_k(g_k * xhat_k))
    dw_j = sum over rows of dy_j * xhat_j       db_j = sum over rows of dy_j

Layer norm is memory bound: the forward reads x and writes y, the backward reads
x and dy and writes dx. Everything else is small: the weight and bias (N
values each) and, when gradients are needed, the row statistics mean and rstd
(8 bytes a row) that the forward stores so that the backward need not compute
them again. Under ``torch.no_grad()`` or when nothing requires a gradient the
forward stores nothing at all.

dweight and dbias are sums over all rows. Instead of atomics (whose order, and
so whose rounding, changes from run to run) each backward program owns a
contiguous chunk of rows, accumulates its part of the sums in fp32 registers and
writes one row of a [programs, N] buffer; a second small kernel adds those rows
column by column in a fixed order. Two backward runs give bit-identical
gradients.

The seed's backward computed dgamma from the layer's *output* instead of xhat,
which agrees only while gamma == 1 and beta == 0 (chapter 2 shows a gradient
check catching it).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import runtime
from .runtime import (FLOAT_DTYPES, aligned, cdiv, check_tensor, launch_memo, next_power_of_2, no_double_backward,
                      shaped)

#: Longest row held in registers as one block; longer rows loop over LOOP_BLOCK-wide chunks.
MAX_FUSED_BLOCK = 16384
#: Chunk width of the looping path for long rows.
LOOP_BLOCK = 4096
#: Backward programs are sized so that about this many warps per SM are resident.
BWD_WARPS_PER_SM = 16
#: Under the interpreter: a few backward programs, enough to exercise the partial-sum reduction.
INTERPRET_BWD_PROGRAMS = 3


# ---------------------------------------------------------------- forward


@triton.jit
def _layer_norm_fwd_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, r_ptr, h_ptr, rb_ptr,
                           x_row_stride, y_row_stride, r_row_stride, h_row_stride, n_rows, n_cols, eps,
                           ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_STATS: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, HAS_RBIAS: tl.constexpr):
    # A program normalizes ROWS rows at once as a [ROWS, BLOCK_N] tile: short rows
    # (512, 768 columns) would otherwise give each program too little to keep in flight.
    # int64 row indices: rows * stride can pass 2**31 elements on big activations.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rows[:, None] * x_row_stride
    y_rows = y_ptr + rows[:, None] * y_row_stride
    # With a residual: h = x + r is what gets normalized, and is written out for the next residual add.
    # HAS_RBIAS: r is a projection's output before its bias, h = x + (r + rbias).
    r_rows = r_ptr + rows[:, None] * r_row_stride
    h_rows = h_ptr + rows[:, None] * h_row_stride

    if SINGLE_BLOCK:
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        # The whole row stays in registers: x is read once, y written once.
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            # rounded to h's dtype before normalizing, exactly as `layer_norm(x + r)` would see it
            r = tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RBIAS:
                r += tl.load(rb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            h = (x + r).to(h_ptr.dtype.element_ty)
            tl.store(h_rows + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        # Statistics in fp32, variance from centred values (not E[x^2] - mean^2, which
        # cancels catastrophically when |mean| >> std). Padding lanes must not count.
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Rows too long for registers: one pass for the mean, one for the variance, one
        # to write. The extra reads mostly hit L2, and such rows are rare in a GPT.
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < n_cols)[None, :]
            x = tl.load(x_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_RBIAS:
                    r += tl.load(rb_ptr + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)[None, :]
                h = (x + r).to(h_ptr.dtype.element_ty)
                tl.store(h_rows + start + cols[None, :], h, mask=mask)
                x = h.to(tl.float32)
            acc += x
        mean = tl.sum(acc, axis=1) / n_cols
        if HAS_RESIDUAL:
            tl.debug_barrier()  # the passes below read back h, written by other threads of this program
            x_rows = h_rows
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < n_cols)[None, :]
            x = tl.load(x_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += xc * xc
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            col_mask = start + cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_W:
                y = y * tl.load(w_ptr + start + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y = y + tl.load(b_ptr + start + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_rows + start + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    if STORE_STATS:
        # 8 bytes a row, against 2N bytes of x the backward would otherwise re-reduce.
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)


def _default_tile(block_n: int, single: bool) -> tuple[int, int]:
    """(ROWS, num_warps): a tile of ~2048 values, 16 a thread; long rows loop one row at a time on 8 warps."""
    if not single:
        return 1, 8
    if runtime.INTERPRET:
        # The interpreter pays per program, not per element: fewer, bigger tiles.
        return max(1, min(64, 32768 // block_n)), 4
    rows = max(1, min(16, 2048 // block_n))
    return rows, min(32, max(4, rows * block_n // 512))


def _fwd_configs(block_n: int, single: bool) -> list:
    """Tiles of ROWS x BLOCK_N with 4 to 32 values a thread; the first is the default (and the interpreter's)."""
    default_rows, default_warps = _default_tile(block_n, single)
    configs = [triton.Config({"ROWS": default_rows}, num_warps=default_warps)]
    if not single:
        return configs
    for rows in (1, 2, 4, 8, 16):
        tile = rows * block_n
        if rows > 1 and tile > 8192:
            break
        for warps in (2, 4, 8, 16, 32):
            per_thread = tile // (32 * warps)
            if 4 <= per_thread <= 32 and (rows, warps) != (default_rows, default_warps):
                configs.append(triton.Config({"ROWS": rows}, num_warps=warps))
    return configs


@functools.lru_cache(maxsize=None)
def _fwd_kernel_for(block_n: int, single: bool):
    """The forward kernel autotuned over the tiles that suit this block width (one config under the interpreter).

    The forward may be autotuned freely: each row is computed by one program whatever
    the tile, so the choice changes speed, never which values are summed together.
    """
    key = ["n_cols", "HAS_W", "HAS_B", "STORE_STATS", "HAS_RESIDUAL", "HAS_RBIAS"]
    return runtime.autotune(_fwd_configs(block_n, single), key=key)(_layer_norm_fwd_kernel)


def _block_n(n_cols: int) -> tuple[int, bool]:
    """Block width and whether the row fits in one block."""
    block = next_power_of_2(n_cols)
    if block <= MAX_FUSED_BLOCK:
        return block, True
    return LOOP_BLOCK, False


def layer_norm_forward(x2: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       store_stats: bool, out_dtype: torch.dtype | None = None,
                       residual: torch.Tensor | None = None, h: torch.Tensor | None = None,
                       residual_bias: torch.Tensor | None = None):
    """y (rows, N) in `out_dtype` (default x's), and the fp32 row statistics (mean, rstd) when `store_stats`.

    With `residual` (rows, N), the row normalized is x + residual (+ `residual_bias`, N), written into
    `h` (rows, N), which the caller allocates in the dtype the sum should have.
    """
    n_rows, n_cols = x2.shape
    y2 = torch.empty_like(x2) if out_dtype in (None, x2.dtype) else \
        torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    mean = rstd = None
    if store_stats:
        mean = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if x2.numel() == 0:
        return y2, mean, rstd
    block, single = _block_n(n_cols)
    kernel = _fwd_kernel_for(block, single)
    grid = lambda meta: (cdiv(n_rows, meta["ROWS"]),)  # noqa: E731  (ROWS comes from the tuned config)
    # Unused pointers still need a tensor; x2 is never read through them.
    has_r = residual is not None
    args = (x2, y2, weight if weight is not None else x2, bias if bias is not None else x2,
            mean if store_stats else y2, rstd if store_stats else y2,
            residual if has_r else x2, h if has_r else x2, residual_bias if residual_bias is not None else x2,
            x2.stride(0), y2.stride(0), residual.stride(0) if has_r else 0, h.stride(0) if has_r else 0,
            n_rows, n_cols, eps)
    meta = dict(BLOCK_N=block, SINGLE_BLOCK=single, HAS_W=weight is not None, HAS_B=bias is not None,
                STORE_STATS=store_stats, HAS_RESIDUAL=has_r, HAS_RBIAS=has_r and residual_bias is not None)
    # Everything the kernel is specialised on follows from this key (y2, mean and rstd are new, aligned
    # allocations): a call like one before launches without working it out again (`runtime.launch_memo`).
    key = None if has_r or not aligned(x2, weight, bias) else (
        x2.get_device(), n_rows, n_cols, x2.stride(0), y2.stride(0), x2.dtype, y2.dtype,
        weight.dtype if weight is not None else None, bias.dtype if bias is not None else None, store_stats)
    launch_memo(_FWD_MEMO, key, kernel, grid, *args, **meta)
    return y2, mean, rstd


#: What `layer_norm`'s forward, backward and partial-sum launches compiled to, per call key (`runtime.launch_memo`).
_FWD_MEMO: dict = {}
_BWD_MEMO: dict = {}
_SUM_MEMO: dict = {}


# ---------------------------------------------------------------- backward


@triton.jit
def _layer_norm_bwd_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, part_ptr, dh_ptr, dr_ptr,
                           x_row_stride, dy_row_stride, dx_row_stride, dh_row_stride, dr_row_stride,
                           n_rows, n_cols, rows_per_program, eps,
                           ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                           HAS_W: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
                           COMPUTE_DB: tl.constexpr, RECOMPUTE_STATS: tl.constexpr,
                           HAS_DH: tl.constexpr, STORE_DR: tl.constexpr, COMPUTE_DRB: tl.constexpr):
    # With a fused residual add (h = x + r normalized): x_ptr holds h, dh_ptr the gradient that
    # reaches h from its other use (the residual stream), added to dx; dr_ptr gets the same sum
    # in r's dtype, since h = x + r passes one gradient to both. COMPUTE_DRB: r's bias was added
    # here too; its gradient, the column sums of that same gradient, is summed like dbias.
    # Program p owns rows [p * rows_per_program, (p + 1) * rows_per_program) and walks
    # them ROWS at a time. Besides dx it sums dy * xhat and dy over its rows, in a fixed
    # order, and writes those partial sums to row p of the [programs, N] buffers: one fp32 buffer of
    # [2 or 3, programs, N] holds dweight's, dbias' and the residual bias' (one allocation, no views).
    pid = tl.program_id(0).to(tl.int64)
    first_row = pid * rows_per_program
    cols = tl.arange(0, BLOCK_N)
    part_offset = pid * n_cols
    part_size = tl.num_programs(0).to(tl.int64) * n_cols
    dw_part_ptr = part_ptr
    db_part_ptr = part_ptr + part_size
    drb_part_ptr = part_ptr + 2 * part_size

    if SINGLE_BLOCK:
        col_mask = cols < n_cols
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        db_acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        drb_acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for i in range(0, rows_per_program, ROWS):
            rows = first_row + i + tl.arange(0, ROWS)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if RECOMPUTE_STATS:
                # The alternative to storing mean/rstd: x is in registers anyway, so this
                # costs two row reductions and no memory traffic.
                mean = tl.sum(x, axis=1) / n_cols
                xc = tl.where(mask, x - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
            else:
                mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
                rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            if COMPUTE_DX:
                c1 = tl.sum(xhat * g, axis=1) / n_cols
                c2 = tl.sum(g, axis=1) / n_cols
                dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                if HAS_DH:
                    dx += tl.load(dh_ptr + rows[:, None] * dh_row_stride + cols[None, :], mask=mask,
                                  other=0.0).to(tl.float32)
                tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                         mask=mask)
                if STORE_DR:
                    tl.store(dr_ptr + rows[:, None] * dr_row_stride + cols[None, :],
                             dx.to(dr_ptr.dtype.element_ty), mask=mask)
                if COMPUTE_DRB:
                    drb_acc += dx  # rows past the end have dx = 0
            # dgamma needs xhat, the normalized input -- not y = xhat * w + b (the seed's bug).
            if COMPUTE_DW:
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy
        # Fold the ROWS lanes once, at the end, in a fixed order.
        if COMPUTE_DW:
            tl.store(dw_part_ptr + part_offset + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if COMPUTE_DB:
            tl.store(db_part_ptr + part_offset + cols, tl.sum(db_acc, axis=0), mask=col_mask)
        if COMPUTE_DRB:
            tl.store(drb_part_ptr + part_offset + cols, tl.sum(drb_acc, axis=0), mask=col_mask)
    else:
        # Long rows, one at a time: pass 1 gathers the row sums, pass 2 writes dx and adds
        # into this program's own row of the partial buffers (zeroed by the launcher).
        for i in range(0, rows_per_program):
            row = first_row + i
            if row < n_rows:
                x_row = x_ptr + row * x_row_stride
                dy_row = dy_ptr + row * dy_row_stride
                if RECOMPUTE_STATS:
                    acc = tl.zeros([BLOCK_N], tl.float32)
                    for start in range(0, n_cols, BLOCK_N):
                        acc += tl.load(x_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
                    mean = tl.sum(acc, axis=0) / n_cols
                    acc = tl.zeros([BLOCK_N], tl.float32)
                    for start in range(0, n_cols, BLOCK_N):
                        m = start + cols < n_cols
                        x = tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32)
                        xc = tl.where(m, x - mean, 0.0)
                        acc += xc * xc
                    rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
                else:
                    mean = tl.load(mean_ptr + row)
                    rstd = tl.load(rstd_ptr + row)
                acc1 = tl.zeros([BLOCK_N], tl.float32)
                acc2 = tl.zeros([BLOCK_N], tl.float32)
                for start in range(0, n_cols, BLOCK_N):
                    m = start + cols < n_cols
                    x = tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32)
                    dy = tl.load(dy_row + start + cols, mask=m, other=0.0).to(tl.float32)
                    xhat = tl.where(m, (x - mean) * rstd, 0.0)
                    if HAS_W:
                        dy = dy * tl.load(w_ptr + start + cols, mask=m, other=0.0).to(tl.float32)
                    acc1 += xhat * dy
                    acc2 += dy
                c1 = tl.sum(acc1, axis=0) / n_cols
                c2 = tl.sum(acc2, axis=0) / n_cols
                for start in range(0, n_cols, BLOCK_N):
                    m = start + cols < n_cols
                    x = tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32)
                    dy = tl.load(dy_row + start + cols, mask=m, other=0.0).to(tl.float32)
                    xhat = tl.where(m, (x - mean) * rstd, 0.0)
                    if COMPUTE_DX:
                        g = dy
                        if HAS_W:
                            g = dy * tl.load(w_ptr + start + cols, mask=m, other=0.0).to(tl.float32)
                        dx = (g - (xhat * c1 + c2)) * rstd
                        if HAS_DH:
                            dx += tl.load(dh_ptr + row * dh_row_stride + start + cols, mask=m,
                                          other=0.0).to(tl.float32)
                        tl.store(dx_ptr + row * dx_row_stride + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
                        if STORE_DR:
                            tl.store(dr_ptr + row * dr_row_stride + start + cols, dx.to(dr_ptr.dtype.element_ty),
                                     mask=m)
                        if COMPUTE_DRB:
                            p = drb_part_ptr + part_offset + start + cols
                            tl.store(p, tl.load(p, mask=m, other=0.0) + dx, mask=m)
                    # Each program only touches its own partial row, so no other program races it.
                    if COMPUTE_DW:
                        p = dw_part_ptr + part_offset + start + cols
                        tl.store(p, tl.load(p, mask=m, other=0.0) + dy * xhat, mask=m)
                    if COMPUTE_DB:
                        p = db_part_ptr + part_offset + start + cols
                        tl.store(p, tl.load(p, mask=m, other=0.0) + dy, mask=m)
                # The next row re-reads what this one wrote: keep the program's threads in step.
                tl.debug_barrier()


@triton.jit
def _sum_partials_kernel(part_ptr, dw_ptr, db_ptr, drb_ptr, n_parts, n_cols,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                         COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DRB: tl.constexpr):
    # Column block per program; the partial rows are added in the same order on every run.
    part_size = tl.cast(n_parts, tl.int64) * n_cols  # [dweight's, dbias', residual bias'] partials, as above
    dw_part_ptr = part_ptr
    db_part_ptr = part_ptr + part_size
    drb_part_ptr = part_ptr + 2 * part_size
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    parts = tl.arange(0, BLOCK_P)
    dw_acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    drb_acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for start in range(0, n_parts, BLOCK_P):
        p = start + parts
        mask = (p < n_parts)[:, None] & col_mask[None, :]
        offsets = p.to(tl.int64)[:, None] * n_cols + cols[None, :]
        if COMPUTE_DW:
            dw_acc += tl.load(dw_part_ptr + offsets, mask=mask, other=0.0)
        if COMPUTE_DB:
            db_acc += tl.load(db_part_ptr + offsets, mask=mask, other=0.0)
        if COMPUTE_DRB:
            drb_acc += tl.load(drb_part_ptr + offsets, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(dw_ptr + cols, tl.sum(dw_acc, axis=0).to(dw_ptr.dtype.element_ty), mask=col_mask)
    if COMPUTE_DB:
        tl.store(db_ptr + cols, tl.sum(db_acc, axis=0).to(db_ptr.dtype.element_ty), mask=col_mask)
    if COMPUTE_DRB:
        tl.store(drb_ptr + cols, tl.sum(drb_acc, axis=0).to(drb_ptr.dtype.element_ty), mask=col_mask)


def _bwd_params(n_rows: int, n_cols: int, device: torch.device,
                element_size: int = 2) -> tuple[int, int, bool, int, int]:
    """(ROWS, BLOCK_N, single block?, num_warps, programs) for the backward of x with `element_size` bytes.

    Fixed by the shape and the GPU, never autotuned: the partial sums, and so the
    rounding of dweight and dbias, depend on how rows are split among programs.
    """
    block, single = _block_n(n_cols)
    rows, num_warps = _default_tile(block, single)
    if runtime.INTERPRET or device.type != "cuda":
        return rows, block, single, num_warps, INTERPRET_BWD_PROGRAMS
    sms = runtime.num_sms(device)
    if element_size == 4 and single and block <= 1024:
        # An fp32 x: the GPT's residual stream under autocast, whose backward also reads the fp32
        # gradient of the stream. Measured on the H100 at (16384, 768): tiles of 4096 values on
        # 4 warps, two programs per SM, 89 us against 112 us for the tiles of a 16-bit x.
        return 4096 // block, block, single, 4, 2 * sms
    # Enough programs to fill every SM, few enough that the [programs, N] partial
    # buffers stay small next to x and dy.
    return rows, block, single, num_warps, sms * max(1, BWD_WARPS_PER_SM // num_warps)


def _sum_params(n_cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the partial-sum kernel: about one column block per SM, tiles of 2048 values.

    The partial buffers are small (a few MB), so what matters is spreading them over
    enough SMs: at N = 768 one block of 8 columns per program gives 96 programs.
    """
    if runtime.INTERPRET or device.type != "cuda":
        block_c = min(1024, next_power_of_2(n_cols))  # the interpreter prefers few, wide programs
        return block_c, 64
    sms = runtime.num_sms(device)
    block_c = min(128, max(8, next_power_of_2(cdiv(n_cols, sms))))
    return block_c, 2048 // block_c


def layer_norm_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None,
                        mean: torch.Tensor | None, rstd: torch.Tensor | None, eps: float, *,
                        compute_dx: bool = True, compute_dw: bool = True, compute_db: bool = True,
                        bias_dtype: torch.dtype | None = None, num_programs: int | None = None,
                        dh: torch.Tensor | None = None, dr: torch.Tensor | None = None,
                        residual_bias_dtype: torch.dtype | None = None):
    """(dx (rows, N), dweight (N,), dbias (N,), d residual bias (N,)), each None when not computed.

    `mean`/`rstd` None means: recompute them from x (the chapter times this against
    storing them). `num_programs` overrides the row split (the chapter sweeps it).
    For a fused residual add, x is the normalized sum h: `dh` (rows, N) is added to dx,
    and `dr` (rows, N, allocated by the caller) receives the same gradient in its own dtype. With
    `residual_bias_dtype` (a bias was added to the residual too) its gradient, the column sums of
    dx, is the fourth value.
    """
    n_rows, n_cols = x2.shape
    compute_dw = compute_dw and weight is not None
    compute_drb = residual_bias_dtype is not None
    compute_dx = compute_dx or compute_drb  # the residual bias's gradient is summed from dx
    db_dtype = bias_dtype or (weight.dtype if weight is not None else dy2.dtype)
    if x2.numel() == 0:  # no rows: dweight and dbias are empty sums, zeros
        zeros = lambda dtype: torch.zeros(n_cols, dtype=dtype, device=x2.device)  # noqa: E731
        return (torch.empty_like(x2) if compute_dx else None, zeros(weight.dtype) if compute_dw else None,
                zeros(db_dtype) if compute_db else None, zeros(residual_bias_dtype) if compute_drb else None)
    # The partial-sum kernel writes every column of dweight and dbias, so they need no zero fill (a launch
    # each). `empty_like` where it can: it costs half of `torch.empty(shape, dtype=, device=)` on the host.
    dx2 = torch.empty_like(x2) if compute_dx else None
    dw = torch.empty_like(weight) if compute_dw else None
    db = None
    if compute_db:
        db = torch.empty_like(weight) if weight is not None and weight.dtype == db_dtype else \
            torch.empty(n_cols, dtype=db_dtype, device=x2.device)
    drb = torch.empty(n_cols, dtype=residual_bias_dtype, device=x2.device) if compute_drb else None

    rows, block, single, num_warps, programs = _bwd_params(n_rows, n_cols, x2.device, x2.element_size())
    programs = max(1, min(num_programs or programs, cdiv(n_rows, rows)))
    # Whole tiles per program; recount so that no program is left without rows.
    rows_per_program = cdiv(cdiv(n_rows, programs), rows) * rows
    programs = cdiv(n_rows, rows_per_program)

    recompute = mean is None
    dummy = x2  # stands in for pointers a flag leaves unused
    part = None
    if compute_dw or compute_db or compute_drb:
        # fp32 partial sums, [0] for dweight, [1] for dbias and [2] for the residual's bias. The
        # single-block path overwrites its row; the looping path adds into it, so it starts from zero.
        alloc = torch.empty if single else torch.zeros
        part = alloc((3 if compute_drb else 2, programs, n_cols), dtype=torch.float32, device=x2.device)

    args = (x2, dy2, dx2 if compute_dx else dummy, weight if weight is not None else dummy,
            dummy if recompute else mean, dummy if recompute else rstd,
            part if part is not None else dummy, dh if dh is not None else dummy, dr if dr is not None else dummy,
            x2.stride(0), dy2.stride(0), dx2.stride(0) if dx2 is not None else n_cols,
            dh.stride(0) if dh is not None else 0,
            dr.stride(0) if dr is not None else 0, n_rows, n_cols, rows_per_program, eps)
    meta = dict(ROWS=rows, BLOCK_N=block, SINGLE_BLOCK=single, HAS_W=weight is not None, COMPUTE_DX=compute_dx,
                COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, RECOMPUTE_STATS=recompute,
                HAS_DH=dh is not None and compute_dx, STORE_DR=dr is not None and compute_dx,
                COMPUTE_DRB=compute_drb, num_warps=num_warps)
    # The plain layer norm's calls (no residual) are keyed for `launch_memo`: dx2, part, dw and db are new
    # allocations, mean and rstd the forward's; x2, dy2 and the weight come from outside.
    memo = dh is None and dr is None and not compute_drb and aligned(x2, dy2, weight)
    key = (x2.get_device(), n_rows, n_cols, programs, rows_per_program, rows, num_warps, x2.stride(0),
           dy2.stride(0), x2.dtype, dy2.dtype, weight.dtype if weight is not None else None, compute_dx,
           compute_dw, compute_db, recompute) if memo else None
    launch_memo(_BWD_MEMO, key, _layer_norm_bwd_kernel, (programs,), *args, **meta)
    if part is not None:
        block_c, block_p = _sum_params(n_cols, x2.device)
        args = (part, dw if compute_dw else dummy, db if compute_db else dummy, drb if compute_drb else dummy,
                programs, n_cols)
        # (the device, key[0], asked once for both launches)
        key = (key[0], programs, n_cols, block_c, block_p, args[1].dtype, args[2].dtype, x2.dtype,
               compute_dw, compute_db) if memo else None
        launch_memo(_SUM_MEMO, key, _sum_partials_kernel, (cdiv(n_cols, block_c),), *args, BLOCK_P=block_p,
                    BLOCK_C=block_c, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, COMPUTE_DRB=compute_drb,
                    num_warps=4)
    return dx2, dw, db, drb


# ---------------------------------------------------------------- autograd and the public function


def _as_rows(t: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A 2-D (rows, N) view with unit column stride, copying only when a view cannot do."""
    if t.shape == (n_rows, n_cols) and t.stride(-1) == 1:  # already rows: no reshape op (microseconds of host time)
        return t
    t2 = t.reshape(n_rows, n_cols)
    return t2 if t2.stride(-1) == 1 or n_cols <= 1 else t2.contiguous()


def _flat_params(*params: torch.Tensor | None):
    """weight, bias (and the residual's bias) as the contiguous 1-D vectors the kernels read (None stays None)."""
    return tuple(t if t is None or (t.dim() == 1 and t.is_contiguous()) else t.reshape(-1).contiguous()
                 for t in params)


class LayerNormFunction(torch.autograd.Function):
    """Layer norm over the last `n_cols` elements of each row. Saves x, weight and the fp32 mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, n_rows: int, n_cols: int, eps: float, out_dtype: torch.dtype | None):
        x2 = _as_rows(x, n_rows, n_cols)
        w, b = _flat_params(weight, bias)
        y2, mean, rstd = layer_norm_forward(x2, w, b, eps, store_stats=True, out_dtype=out_dtype)
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.eps = eps
        ctx.x_shape = x.shape
        ctx.w_shape = weight.shape if weight is not None else None
        ctx.b_shape = bias.shape if bias is not None else None
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y2  # (rows, N): `layer_norm` gives it x's shape, outside the Function (see `runtime.shaped`)

    @staticmethod
    @no_double_backward
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx2, dw, db, _ = layer_norm_backward(_as_rows(dy, *x2.shape), x2, w, mean, rstd, ctx.eps,
                                             compute_dx=need_dx, compute_dw=need_dw, compute_db=need_db,
                                             bias_dtype=ctx.b_dtype)
        dx = shaped(dx2, ctx.x_shape) if dx2 is not None else None
        dw = shaped(dw, ctx.w_shape) if dw is not None else None
        db = shaped(db, ctx.b_shape) if db is not None else None
        return dx, dw, db, None, None, None, None


def _normalized(normalized_shape) -> tuple[int, ...]:
    """normalized_shape as a tuple of ints (numpy and torch integers included, as F.layer_norm takes them)."""
    if type(normalized_shape) is int:  # the common cases first, without the general path's conversions
        return (normalized_shape,)
    if (type(normalized_shape) in (tuple, torch.Size) and len(normalized_shape) == 1
            and type(normalized_shape[0]) is int):
        return tuple(normalized_shape)
    try:
        if not isinstance(normalized_shape, (tuple, list, torch.Size)):
            return (runtime.as_int("normalized_shape", normalized_shape),)
        shape = tuple(runtime.as_int("normalized_shape", s) for s in normalized_shape)
    except TypeError:
        raise TypeError(f"layer_norm: normalized_shape must be an int or a sequence of ints, "
                        f"got {normalized_shape!r}") from None
    if not shape:
        raise ValueError("layer_norm: normalized_shape must have at least one dimension")
    return shape


def _check_args(x, normalized_shape, weight, bias, out_dtype, residual_bias=None) -> tuple[int, int]:
    """Validate layer_norm's arguments (and add_layer_norm's residual bias); return (rows, N) of the normalized view."""
    check_tensor("layer_norm input", x, dtypes=FLOAT_DTYPES)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer_norm: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    shape = _normalized(normalized_shape)
    x_shape = x.shape
    if len(shape) > len(x_shape) or x_shape[len(x_shape) - len(shape):] != shape:
        raise ValueError(f"layer_norm: normalized_shape {list(shape)} must match the last dimensions of the "
                         f"input, got input of shape {list(x_shape)}")
    for name, p in (("weight", weight), ("bias", bias), ("residual_bias", residual_bias)):
        if p is not None:
            check_tensor(f"layer_norm {name}", p, dtypes=FLOAT_DTYPES, device=x.device)
            if p.shape != shape:
                raise ValueError(f"layer_norm: {name} has shape {list(p.shape)} but normalized_shape is {list(shape)}")
    n_cols = math.prod(shape)
    return math.prod(x_shape[:len(x_shape) - len(shape)]), n_cols


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Layer norm like ``torch.nn.functional.layer_norm``: normalize over the trailing `normalized_shape` dims.

    Statistics are computed in fp32; the result has x's dtype, or `out_dtype`: an fp32
    residual stream normalized straight into the bf16 that the next matmul reads needs no
    separate cast (the gradient then comes back in `out_dtype`; x's gradient has x's dtype).
    `weight` and `bias`, if given, have shape `normalized_shape` (any float dtype).
    Gradients flow to x, weight and bias; under ``torch.no_grad()`` (or when none of
    them requires a gradient) the forward saves nothing.
    """
    n_rows, n_cols = _check_args(x, normalized_shape, weight, bias, out_dtype)
    eps = runtime.as_float("layer_norm: eps", eps)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return shaped(LayerNormFunction.apply(x, weight, bias, n_rows, n_cols, eps, out_dtype), x.shape)
    # Inference: no autograd context and no statistics stored.
    y2, _, _ = layer_norm_forward(_as_rows(x, n_rows, n_cols), *_flat_params(weight, bias), eps,
                                  store_stats=False, out_dtype=out_dtype)
    return y2.view(x.shape)


# ---------------------------------------------------------------- residual add fused in


def _add_layer_norm_forward(x, r, rb, n_rows: int, n_cols: int, w, b, eps: float, out_dtype, store_stats: bool):
    """(y2, h2, mean, rstd): h = x + r (+ rb) in the promoted dtype, and its layer norm, as (rows, N) tensors.

    `w`, `b` and `rb` (the residual's bias or None) are flattened (`_flat_params`)."""
    h2 = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, r.dtype), device=x.device)
    y2, mean, rstd = layer_norm_forward(_as_rows(x, n_rows, n_cols), w, b, eps,
                                        store_stats=store_stats, out_dtype=out_dtype or h2.dtype,
                                        residual=_as_rows(r, n_rows, n_cols), h=h2, residual_bias=rb)
    return y2, h2, mean, rstd


class AddLayerNormFunction(torch.autograd.Function):
    """(y, h) with h = x + r (+ rb) and y = layer_norm(h). Saves h, weight and the fp32 mean and rstd.

    A pre-norm transformer adds each sublayer's output to the residual stream and
    normalizes the sum for the next sublayer: two kernels going forward (the add, the
    norm), and two coming back (the norm's backward, then autograd adding the gradient
    that arrives through the stream). Fused, the forward writes h while normalizing it,
    and the backward adds the stream's gradient dh in the pass that computes dx and
    writes the sum in both x's dtype (the stream) and r's (the sublayer's output).

    The bias of the projection that produced r can ride along too (rb, the "bias-add" of
    Megatron's bias-dropout-add): added here instead of in the projection's epilogue, its
    gradient is the column sums of the gradient this backward writes anyway, and the
    projection's dW GEMM no longer sums the rows of its input for it.
    """

    @staticmethod
    def forward(ctx, x, r, rb, weight, bias, n_rows: int, n_cols: int, eps: float, out_dtype):
        w, b, rb_flat = _flat_params(weight, bias, rb)
        y2, h2, mean, rstd = _add_layer_norm_forward(x, r, rb_flat, n_rows, n_cols, w, b, eps, out_dtype, True)
        ctx.save_for_backward(h2, w, mean, rstd)
        ctx.set_materialize_grads(False)  # the last h of a model has no later use: no gradient reaches it
        ctx.eps, ctx.shape, ctx.x_dtype, ctx.r_dtype = eps, x.shape, x.dtype, r.dtype
        ctx.w_shape = weight.shape if weight is not None else None
        ctx.b_shape, ctx.b_dtype = (bias.shape, bias.dtype) if bias is not None else (None, None)
        ctx.rb_dtype, ctx.rb_shape = (rb.dtype, rb.shape) if rb is not None else (None, None)
        return y2, h2  # (rows, N): `add_layer_norm` gives them x's shape (see `runtime.shaped`)

    @staticmethod
    @no_double_backward
    def backward(ctx, dy, dh):
        h2, w, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = h2.shape
        need_x, need_r, need_rb, need_w, need_b = ctx.needs_input_grad[:5]
        dy2 = _as_rows(dy, n_rows, n_cols) if dy is not None else h2.new_zeros(h2.shape)
        dh2 = _as_rows(dh, n_rows, n_cols) if dh is not None else None
        dr2 = torch.empty((n_rows, n_cols), dtype=ctx.r_dtype, device=h2.device) if need_r else None
        dx2, dw, db, drb = layer_norm_backward(dy2, h2, w, mean, rstd, ctx.eps, compute_dw=need_w,
                                               compute_db=need_b, bias_dtype=ctx.b_dtype, dh=dh2, dr=dr2,
                                               residual_bias_dtype=ctx.rb_dtype if need_rb else None)
        dx = dx2.to(ctx.x_dtype).view(ctx.shape) if need_x else None  # dx2 has h's dtype: x's, unless r's is wider
        return (dx, dr2.view(ctx.shape) if need_r else None, drb.view(ctx.rb_shape) if drb is not None else None,
                dw.view(ctx.w_shape) if dw is not None else None,
                db.view(ctx.b_shape) if db is not None else None, None, None, None, None)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, normalized_shape,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5, *,
                   out_dtype: torch.dtype | None = None,
                   residual_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` and ``layer_norm(h, ...)`` in one pass, forward and backward; returns (y, h).

    The residual-stream update of a pre-norm transformer block and the norm that
    follows it. h has the promoted dtype of x and residual (an fp32 stream plus a bf16
    sublayer output stays fp32) and is rounded to it before being normalized, exactly
    as ``layer_norm(x + residual)``; y is in `out_dtype` (default h's). With
    ``residual=None`` this is `layer_norm`, returning (y, x).

    ``residual_bias`` (shape `normalized_shape`) is added to the residual in fp32 before the sum,
    ``h = x + (residual + residual_bias)``: the bias of the projection that produced the residual,
    moved here from that projection's epilogue. Its gradient is the column sums of the residual's.
    """
    if residual is None:
        if residual_bias is not None:
            raise ValueError("add_layer_norm: residual_bias needs a residual to add it to")
        return layer_norm(x, normalized_shape, weight, bias, eps, out_dtype=out_dtype), x
    n_rows, n_cols = _check_args(x, normalized_shape, weight, bias, out_dtype, residual_bias)
    eps = runtime.as_float("add_layer_norm: eps", eps)
    check_tensor("add_layer_norm residual", residual, dtypes=FLOAT_DTYPES, device=x.device)
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual has shape {list(residual.shape)} but x has {list(x.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, residual, residual_bias, weight, bias)):
        y2, h2 = AddLayerNormFunction.apply(x, residual, residual_bias, weight, bias, n_rows, n_cols, eps,
                                            out_dtype)
        return shaped(y2, x.shape), shaped(h2, x.shape)
    w, b, rb = _flat_params(weight, bias, residual_bias)
    y2, h2, _, _ = _add_layer_norm_forward(x, residual, rb, n_rows, n_cols, w, b, eps, out_dtype, False)
    return shaped(y2, x.shape), shaped(h2, x.shape)
