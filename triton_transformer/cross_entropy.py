"""Fused cross-entropy over the vocabulary: the loss and its gradient in one pass over the logits.

For a row of logits x (length V) and its target class y,

    loss = logsumexp(x) - x_y,            logsumexp(x) = m + log sum_j exp(x_j - m),  m = max_j x_j
    dloss/dx_j = softmax(x)_j - [j == y]

The gradient needs nothing but the row and its logsumexp, which the forward has
just computed. So the forward writes it right away (scaled for the reduction:
1/(number of counted rows) for "mean"), and the backward only multiplies it by
the incoming gradient, which is 1 in the common case and then costs nothing. The
logits are read once (twice when a row is longer than one block) and the
gradient written once; no probabilities, log-probabilities or fp32 copies of
the logits ever reach memory. At GPT-2's vocabulary the logits are the largest
tensor of training, so this is where most of the memory is saved.

When the row fits in one block (up to MAX_FUSED_BLOCK columns in bf16/fp16, half
that in fp32) a program owns one row and keeps it on chip: one read, one write.
That path computes each exponential once and keeps it in the logits' dtype, as softmax
does (`exp_and_sum`). A long row (a block of 32 768 lanes or more: Llama 2's vocabulary of
32 000, GPT-2's 50 304 held as three pieces) is walked instead by one program per SM
that prefetches its next rows into shared memory while it works on this one (softmax's
`row_loop`). Measured on the H100 (bf16, the forward: loss and gradient, in
`benchmarks/experiments/row_prefetch.py`, whose docstring keeps the numbers):
(8192, 50304) 603 us against 734 with a program per row computing each exponential
twice, a copy 548; (8192, 32000) 371 against 406. Each change alone gained little or
lost there: the loop with two exponentials a value took 775 us at best against 748,
one exponential with a program per row 762. Rows held whole of fewer than 32 768 lanes
keep a program each, and so do long rows on GPUs whose shared memory holds none (a T4,
or an RTX 30/40 at GPT-2's width): one exponential was not measured there, and with a
program per row on the H100 it was the slower choice (762 against 734 us).
Short rows (a byte-level vocabulary of 256) go several to a program, as one tile of
about TILE values, so that a program has more than a few hundred bytes to move.
Longer rows use the online logsumexp (running max, rescaled running sum; Milakov &
Gimelshein) over blocks of ONLINE_BLOCK, then a second pass re-reads the row to
write the gradient; there a few programs per SM loop over the rows, so that the
second pass finds its row in L2.

The loss of "mean" and "sum" is added up in the same kernel: each program sums its rows' losses, and
the program that finishes last adds up the programs' sums in a fixed order (`_sum_of_programs`), so the
result is the same from run to run and no reduction kernel follows. The pre-pass before it counts the
targets, each of its programs into slots of its own, so no buffer needs zeroing first. With the loss
sum folded in and the counts' copy moved to a side stream, forward and backward measured 598 and 597 us
of GPU time against 605 and 598 at (8192, 50304), 375 and 377 against 403 and 408 at (8192, 32000), and
13.0 and 15.2 against 16.9 and 18.1 at (8192, 256) (H100, bf16, two runs, `benchmarks/experiments/ce_wall.py`).

Layout: logits are (N, V) or (B, T, V) with the classes along the LAST dimension,
as a GPT produces them (F.cross_entropy wants classes in dimension 1, so the
equivalent call is ``F.cross_entropy(logits.flatten(0, -2), target.flatten())``).
Any strides are read in place, without a copy.

Differences from F.cross_entropy, on purpose:
* the loss is returned in float32 whatever the logits' dtype (all arithmetic is
  fp32; F.cross_entropy returns the logits' dtype, so a bf16 loss would be rounded
  to 3 significant digits);
* a target outside [0, V) that is not ignore_index raises ValueError. Checking it
  reads the small pre-pass's counts back from the GPU (copied on a side stream), the only
  host-device synchronisation. The host waits for the pre-pass only, with the main kernel
  already queued behind it, so the GPU does not idle for the check. On a bad target the main
  kernel writes no gradient, so logits given with ``inplace=True`` are untouched by the failed call.
* backward can run once per forward (the gradient buffer is scaled in place and
  released); ``retain_graph=True`` with a second backward raises.
* no class weights, label smoothing or probability targets.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .runtime import (FLOAT_DTYPES, as_int, cdiv, check_tensor, device_index, launch, next_power_of_2,
                      no_double_backward, shaped)
from .softmax import (LOG2E, ONLINE_STAGES, _grid, launch_rows, load_lanes, load_pieces, pieces_exp_and_sum,
                      online_combine, online_update, pieces_max, row_pieces, strided)

#: Longest bf16/fp16 row (after rounding up to a power of two) kept whole on chip, in its own dtype
#: (128 KB a program, as the softmax of chapter 1); fp32 rows get half. GPT-2's 50 304 rounds to
#: 65 536 and takes this path in bf16.
MAX_FUSED_BLOCK = 65536
#: Block width of the online path, for longer rows.
ONLINE_BLOCK = 8192
#: Programs per SM on the online path, as chapter 1's softmax forward (its loops pipeline as deep: ONLINE_STAGES).
ONLINE_PROGRAMS_PER_SM = 4
#: Warps of a program that loops over long 16-bit rows held whole (`row_loop`), measured on the H100 (bf16, the
#: forward, `benchmarks/experiments/row_prefetch.py`): 603 us at (8192, 50304) against 628 at 16 warps and 857 at
#: 32; at (8192, 32000) 371 against 374 and 376. fp32 rows, twice the bytes a lane, keep `_launch_params`' warps.
ROW_LOOP_WARPS = 8
#: Short rows (up to TILE // 2 columns) go ROWS to a program, in tiles of about TILE values, at most
#: MAX_TILE_ROWS rows (`_cross_entropy_rows`).
TILE = 4096
MAX_TILE_ROWS = 128
#: Targets counted per program of the small pre-pass (each program writes its own counts: no atomics, no zeroed buffer).
STATS_BLOCK = 1024

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "sum", "none")



@triton.jit
def _target_stats_kernel(target_ptr, stats_ptr, n_rows, n_cols, ignore_index, n_parts, BLOCK: tl.constexpr):
    # The counts of one block of targets, each program in slots of its own (no atomics, so no buffer to
    # zero first): stats[1 + p] = rows that count (target != ignore_index), whose total is the divisor
    # of "mean", needed by every row's gradient before any row is done, hence this separate pass over the
    # (small) targets; stats[1 + n_parts + p] = counted rows whose target is outside [0, n_cols): the
    # wrapper raises on them. Program 0 also resets stats[0], the ticket the main kernel's programs draw
    # to find which of them finishes last (`_sum_of_programs`).
    part = tl.program_id(0)
    offs = part.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_rows
    t = tl.load(target_ptr + offs, mask=inside, other=0).to(tl.int64)
    counted = inside & (t != ignore_index)
    bad = counted & ((t < 0) | (t >= n_cols))
    tl.store(stats_ptr + 1 + part, tl.sum(counted.to(tl.int32), axis=0))
    tl.store(stats_ptr + 1 + n_parts + part, tl.sum(bad.to(tl.int32), axis=0))
    if part == 0:
        tl.store(stats_ptr, 0)


@triton.jit
def _parts_total(parts_ptr, n_parts, BLOCK: tl.constexpr):
    """The sum of `n_parts` slots at `parts_ptr`, in their dtype and always in the same order: the pre-pass's
    counts (one per STATS_BLOCK targets), or the main kernel's per-program losses (`_sum_of_programs`)."""
    total = tl.zeros([BLOCK], parts_ptr.dtype.element_ty)
    for start in range(0, n_parts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        # .cg reads L2, where other SMs' slots are, not this SM's L1 (`_sum_of_programs` reads slots that
        # programs of the same kernel wrote)
        total += tl.load(parts_ptr + offs, mask=offs < n_parts, other=0, cache_modifier=".cg")
    return tl.sum(total, axis=0)


@triton.jit
def _sum_of_programs(partials_ptr, total_ptr, ticket_ptr, partial, BLOCK: tl.constexpr):
    """Write the sum over the grid's programs of `partial` (fp32) to total_ptr, in a fixed order.

    Each program puts its partial sum in a slot of its own and draws a ticket; the program that draws the
    last one adds the slots up, in slot order, so the total does not depend on the order programs finish
    in (adding floats with atomics would). This saves the reduction kernel that would follow.
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    tl.store(partials_ptr + pid, partial)
    # acq_rel: our slot is written before the ticket counts it (release), and the last program sees
    # every slot the tickets before it counted (acquire).
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == n_programs - 1:
        tl.store(total_ptr, _parts_total(partials_ptr, n_programs, BLOCK))


@triton.jit
def _store_grad(g_row, start, n_write, p, target_col, scale, stride, B: tl.constexpr, UNIT_STRIDE: tl.constexpr):
    """The gradient (p - onehot) * scale of columns [start, start + B) below n_write, from their probabilities p
    (fp32)."""
    cols = start + tl.arange(0, B)
    grad = (p - tl.where(cols == target_col, 1.0, 0.0)) * scale
    tl.store(g_row + strided(cols, stride, UNIT_STRIDE), grad.to(g_row.dtype.element_ty), mask=cols < n_write)


@triton.jit
def _row_loss(m, d, x_target, counted):
    """A row's loss, logsumexp - x_target = (m - x_target) + log d (0 for an ignored row).

    In that order, not as (m + log d) - x_target: with logits around -1e9 (a row masked by adding a large
    negative number), m + log d rounds back to m in fp32 and the loss would come out 0 instead of log V.
    """
    return tl.where(counted, (m - x_target) + tl.log(d), 0.0)


@triton.jit
def _target_terms(x_row, target, counted, n_cols, x_stride_v, mean_scale):
    """(the target's logit in fp32, the gradient's scale, the target as an int32 column) of a row, or of a
    block of rows (`x_row` then a block of row pointers)."""
    # The target's logit, read only when the target is a real column: a bad target never
    # causes an out-of-bounds read (the wrapper raises on it after the pre-pass counted it).
    in_range = (target >= 0) & (target < n_cols)
    x_target = tl.load(x_row + target * x_stride_v, mask=counted & in_range, other=0.0).to(tl.float32)
    # A bad target's loss is NaN: when nothing can read the check back (a CUDA graph), the loss shows it.
    x_target = tl.where(in_range, x_target, float("nan"))
    scale = tl.where(counted, mean_scale, 0.0)  # an ignored row's gradient is 0
    # The target as an int32 column, as cols (-1, no column, when it is not one): compared with an
    # int64 target, the columns would be widened lane by lane.
    target_col = tl.where(in_range, target, -1).to(tl.int32)
    return x_target, scale, target_col


@triton.jit
def _cross_entropy_row(logits_ptr, target_ptr, loss_ptr, grad_ptr, row, mean_scale, loss_scale, n_write,
                       rows_per_batch,
                       x_stride_b, x_stride_t, x_stride_v, g_stride_b, g_stride_t, g_stride_v, n_cols, ignore_index,
                       BLOCK: tl.constexpr, PIECE1: tl.constexpr, PIECE2: tl.constexpr,
                       SINGLE_BLOCK: tl.constexpr, HAS_GRAD: tl.constexpr,
                       UNIT_STRIDE: tl.constexpr, STAGES: tl.constexpr, REDUCE: tl.constexpr):
    """Loss and gradient of one row (int64 `row`: 8192 rows x 50304 columns is already 412M elements).
    Returns the row's loss, and also stores it at loss_ptr[row] unless the kernel REDUCEs the losses to one.

    The gradient is written for columns below `n_write`: all of them, or none when the pre-pass counted a bad
    target (the wrapper then raises, and logits given with inplace=True must come out of the failed call as
    they went in).
    """
    b = row // rows_per_batch
    t = row - b * rows_per_batch
    x_row = logits_ptr + b * x_stride_b + t * x_stride_t
    g_row = grad_ptr + b * g_stride_b + t * g_stride_t

    target = tl.load(target_ptr + row).to(tl.int64)
    counted = target != ignore_index
    x_target, scale, target_col = _target_terms(x_row, target, counted, n_cols, x_stride_v, mean_scale)

    if SINGLE_BLOCK:
        # The whole row on chip: read once, loss and gradient from the same values. It is held in up to
        # three pieces, as chapter 1's softmax holds a long row (`row_pieces`, `load_pieces`). x stays in
        # its own dtype (bf16: two values per register) so a 50K-wide row fits; the max is exact in any
        # dtype. As in softmax, each exponential is computed once and kept in that dtype (`exp_and_sum`),
        # in the registers x held: the gradient is e / d - onehot. (The target's e, where p nears 1, is the
        # row's max: e = 1 exactly, and p - 1 = (1 - d) / d loses nothing to the rounding.)
        x, x1, x2 = load_pieces(x_row, n_cols, x_stride_v, BLOCK, PIECE1, PIECE2, UNIT_STRIDE)
        m = pieces_max(x, x1, x2, PIECE1, PIECE2)
        e, e1, e2, d = pieces_exp_and_sum(x, x1, x2, m, PIECE1, PIECE2)  # masked lanes: exp(-inf) = 0
        loss = _row_loss(m, d, x_target, counted) * loss_scale
        if HAS_GRAD:
            # n_write masks the stores rather than a branch going around them: with the branch, the call
            # whose kernel checks the flag took 0.75 ms at (8192, 50304), against 0.60 of GPU time for a
            # CUDA graph's, which cannot check and has no branch; masked, 0.612 and 0.604 (H100).
            inv_d = 1.0 / d
            _store_grad(g_row, 0, n_write, e.to(tl.float32) * inv_d, target_col, scale, g_stride_v, BLOCK,
                        UNIT_STRIDE)
            if PIECE1 > 0:
                _store_grad(g_row, BLOCK, n_write, e1.to(tl.float32) * inv_d, target_col, scale, g_stride_v,
                            PIECE1, UNIT_STRIDE)
            if PIECE2 > 0:
                _store_grad(g_row, BLOCK + PIECE1, n_write, e2.to(tl.float32) * inv_d, target_col, scale,
                            g_stride_v, PIECE2, UNIT_STRIDE)
    else:
        # Pass 1, online logsumexp: every lane keeps its own running max m and a running sum d of
        # exp(x - m), rescaled whenever m grows; lanes are combined once at the end, so the loop
        # has no cross-lane reduction.
        m = tl.full([BLOCK], -float("inf"), tl.float32)
        d = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            x = load_lanes(x_row, start, n_cols, x_stride_v, BLOCK, UNIT_STRIDE).to(tl.float32)
            m, d = online_update(m, d, x)
        m_row, d_row = online_combine(m, d)
        loss = _row_loss(m_row, d_row, x_target, counted) * loss_scale
        if HAS_GRAD:
            if n_write > 0:
                # Pass 2: read the row again (from L2: this program read it moments ago) and write the gradient.
                log2_d = tl.log2(d_row)
                for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
                    x = load_lanes(x_row, start, n_cols, x_stride_v, BLOCK, UNIT_STRIDE).to(tl.float32)
                    p = tl.exp2((x - m_row) * LOG2E - log2_d)  # exp(x - m) / d
                    _store_grad(g_row, start, n_write, p, target_col, scale, g_stride_v, BLOCK, UNIT_STRIDE)
    if not REDUCE:
        tl.store(loss_ptr + row, loss)
    return loss


@triton.jit
def _cross_entropy_rows(logits_ptr, target_ptr, loss_ptr, grad_ptr, tile, mean_scale, loss_scale, n_write, n_rows,
                        rows_per_batch, x_stride_b, x_stride_t, x_stride_v, g_stride_b, g_stride_t, g_stride_v,
                        n_cols, ignore_index, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_GRAD: tl.constexpr,
                        UNIT_STRIDE: tl.constexpr, REDUCE: tl.constexpr):
    """Loss and gradient of ROWS short rows at once, as one (ROWS, BLOCK) tile: `_cross_entropy_row` for
    each of them, row by row along the tile's first axis. Returns the sum of their losses.

    At a byte-level vocabulary (256 columns) a program per row has 512 bytes to move, and 8192 such
    programs spent their time on the chain of dependent steps each row needs (the target, its logit,
    the row, the max, the sum); a tile of rows runs those chains side by side.
    """
    rows = tile.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    b = rows // rows_per_batch
    t = rows - b * rows_per_batch
    x_rows = logits_ptr + b * x_stride_b + t * x_stride_t
    g_rows = grad_ptr + b * g_stride_b + t * g_stride_t

    target = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    counted = row_ok & (target != ignore_index)
    x_target, scale, target_col = _target_terms(x_rows, target, counted, n_cols, x_stride_v, mean_scale)

    cols = tl.arange(0, BLOCK)
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_rows[:, None] + strided(cols, x_stride_v, UNIT_STRIDE)[None, :], mask=mask,
                other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=1)
    m = tl.where(row_ok, m, 0.0)  # rows past the end: keep -inf - -inf (NaN) and log(0) out of the arithmetic
    d = tl.where(row_ok, tl.sum(tl.exp2((x - m[:, None]) * LOG2E), axis=1), 1.0)
    loss = _row_loss(m, d, x_target, counted) * loss_scale  # 0 for rows past the end (not counted)
    if not REDUCE:
        tl.store(loss_ptr + rows, loss, mask=row_ok)
    if HAS_GRAD:
        if n_write > 0:
            p = tl.exp2((x - m[:, None]) * LOG2E - tl.log2(d)[:, None])
            grad = (p - tl.where(cols[None, :] == target_col[:, None], 1.0, 0.0)) * scale[:, None]
            tl.store(g_rows[:, None] + strided(cols, g_stride_v, UNIT_STRIDE)[None, :],
                     grad.to(grad_ptr.dtype.element_ty), mask=mask)
    return tl.sum(loss, axis=0)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr, target_ptr, loss_ptr, total_ptr, grad_ptr, stats_ptr,
    n_rows, rows_per_batch,                  # rows = B * T of (B, T, V)
    x_stride_b, x_stride_t, x_stride_v,      # strides of the logits (any layout, read in place)
    g_stride_b, g_stride_t, g_stride_v,      # strides of the gradient buffer
    n_cols, ignore_index, n_parts,           # n_parts: programs of the pre-pass, each with its own counts
    BLOCK: tl.constexpr, PIECE1: tl.constexpr, PIECE2: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    HAS_GRAD: tl.constexpr, MEAN: tl.constexpr, LOSS_MEAN: tl.constexpr, STOP_ON_BAD: tl.constexpr,
    UNIT_STRIDE: tl.constexpr, STAGES: tl.constexpr, ROWS: tl.constexpr, ROW_STAGES: tl.constexpr,
    REDUCE: tl.constexpr,
):
    # Gradient scale of counted rows: 1 for "sum"/"none" (and an fp16 "mean", see cross_entropy_forward),
    # 1/(counted rows) for "mean".
    # (With every row ignored the count is 0; the maximum keeps inf out of the gradient.)
    mean_scale = 1.0
    loss_scale = 1.0
    if MEAN or LOSS_MEAN:
        count = _parts_total(stats_ptr + 1, n_parts, 128)
        if MEAN:
            mean_scale = 1.0 / tl.maximum(count, 1).to(tl.float32)
        # LOSS_MEAN: each row's loss is taken already divided by the count, so that the mean is a sum. With
        # every row ignored the scale is NaN, and so is the mean, as PyTorch's 0/0.
        if LOSS_MEAN:
            loss_scale = tl.where(count > 0, 1.0 / tl.maximum(count, 1).to(tl.float32), float("nan"))
    # STOP_ON_BAD: the host reads the count back and raises (see _cross_entropy_row), and no gradient is
    # written (n_write = 0) if it will. In a CUDA graph it cannot, so every row's gradient is written: the
    # good rows' are right, and a bad row's loss is NaN.
    n_write = n_cols
    if STOP_ON_BAD:
        n_write = tl.where(_parts_total(stats_ptr + 1 + n_parts, n_parts, 128) == 0, n_cols, 0)
    # REDUCE ("mean", "sum"): the program's rows' losses are summed here, and the programs' sums added up by
    # the last of them (`_sum_of_programs`), into total_ptr; loss_ptr then holds those sums, a slot a program.
    total = 0.0
    if ROWS > 1:  # short rows, ROWS to a program
        total = _cross_entropy_rows(logits_ptr, target_ptr, loss_ptr, grad_ptr, tl.program_id(0), mean_scale,
                                    loss_scale, n_write, n_rows, rows_per_batch, x_stride_b, x_stride_t, x_stride_v,
                                    g_stride_b, g_stride_t, g_stride_v, n_cols, ignore_index, BLOCK, ROWS, HAS_GRAD,
                                    UNIT_STRIDE, REDUCE)
    elif SINGLE_BLOCK:  # a program per row, or one per SM that prefetches its next rows (softmax's `row_loop`)
        for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0), num_stages=ROW_STAGES):
            total += _cross_entropy_row(logits_ptr, target_ptr, loss_ptr, grad_ptr, tl.cast(row, tl.int64),
                                        mean_scale, loss_scale, n_write, rows_per_batch, x_stride_b, x_stride_t,
                                        x_stride_v, g_stride_b, g_stride_t, g_stride_v, n_cols, ignore_index, BLOCK,
                                        PIECE1, PIECE2, SINGLE_BLOCK, HAS_GRAD, UNIT_STRIDE, STAGES, REDUCE)
    else:  # a few programs per SM looping over rows, as chapter 1's softmax: the second pass reads L2
        for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            total += _cross_entropy_row(logits_ptr, target_ptr, loss_ptr, grad_ptr, row, mean_scale, loss_scale,
                                        n_write, rows_per_batch, x_stride_b, x_stride_t, x_stride_v, g_stride_b,
                                        g_stride_t, g_stride_v, n_cols, ignore_index, BLOCK, PIECE1, PIECE2,
                                        SINGLE_BLOCK, HAS_GRAD, UNIT_STRIDE, STAGES, REDUCE)
    if REDUCE:
        _sum_of_programs(loss_ptr, total_ptr, stats_ptr, total, 1024)


@triton.jit
def _scale_rows_kernel(grad_ptr, dloss_ptr, dloss_stride, n_rows, rows_per_batch, g_stride_b, g_stride_t,
                       g_stride_v, n_cols, BLOCK: tl.constexpr):
    # The backward of the fused loss: grad *= dloss[row] (dloss_stride = 0 for "mean"/"sum", where
    # dloss is one scalar). When dloss is exactly 1 -- loss.backward() on a "mean" or "sum" loss --
    # the buffer already holds the answer: each program reads one scalar and returns, with no
    # host-device sync to find that out. A few programs per SM loop over the rows: a program per
    # row cost 6 us at 8192 rows just to start programs that return at once.
    if (dloss_stride != 0) | (tl.load(dloss_ptr).to(tl.float32) != 1.0):
        cols = tl.arange(0, BLOCK).to(tl.int64)
        for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            g = tl.load(dloss_ptr + row * dloss_stride).to(tl.float32)
            if g != 1.0:
                b = row // rows_per_batch
                t = row - b * rows_per_batch
                g_row = grad_ptr + b * g_stride_b + t * g_stride_t
                for start in range(0, n_cols, BLOCK):
                    mask = start + cols < n_cols
                    ptrs = g_row + (start + cols) * g_stride_v
                    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                    tl.store(ptrs, (x * g).to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_params(n_cols: int, element_size: int = 2, single_block: bool | None = None) -> tuple[int, bool, int]:
    """Block width, whether the row is kept whole on chip, and warps (4 to 16).

    `single_block` forces one path or the other (to measure them against each other).
    """
    whole = next_power_of_2(n_cols)
    single = whole <= MAX_FUSED_BLOCK * 2 // element_size if single_block is None else single_block
    block = whole if single else min(ONLINE_BLOCK, whole)
    # A warp per 1024 lanes, 4 to 16, and 32 for a row of 32 768 held whole: measured on the H100 (bf16,
    # (8192, 32000), `probe.py warps`), 421 against 484 us at 16 warps. At 65 536 lanes 32 warps cap a
    # thread at 64 registers, 32 of them its 64 bf16 values, and spill (1537 against 756 us at
    # (8192, 50304)): 16 there.
    num_warps = 32 if single and block == 32768 else min(16, max(4, block // 1024))
    return block, single, num_warps


def _rows_per_program(block: int) -> int:
    """Rows a program takes when a row is short: tiles of ~TILE values (1 for rows of TILE or more)."""
    return max(1, min(MAX_TILE_ROWS, TILE // block))


def _row_layout(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows_per_batch, stride_b, stride_t, stride_v) of a (N, V) or (B, T, V) tensor, for row = b*T + t."""
    if t.dim() == 2:
        return max(t.shape[0], 1), 0, t.stride(0), t.stride(1)
    return max(t.shape[1], 1), t.stride(0), t.stride(1), t.stride(2)


class _BadTargetCount:
    """The pre-pass's counts of bad targets (one per pre-pass program), on their way to the host.

    `mark`, called right after the pre-pass is queued, marks that point of the stream with an event. `check`,
    called once the main kernel is queued behind the pre-pass, copies the counts to pinned host memory on a
    side stream that waits for that event only: the main kernel starts as soon as the pre-pass ends, without
    the copy between them, and the host waits for the copy alone, not for the main kernel, so it does not
    hold the GPU up. Nothing is read back while a CUDA graph is being recorded (reading back is forbidden
    there); a replayed graph cannot raise, and the kernel makes a bad target's loss NaN instead.
    """

    def __init__(self, bad: torch.Tensor):
        self.bad, self.counted = bad, None
        self.capturing = bad.is_cuda and torch.cuda.is_current_stream_capturing()

    @property
    def will_check(self) -> bool:
        """Whether `check` reads the counts (not in a CUDA graph being recorded)."""
        return not self.capturing

    def mark(self) -> None:
        """Note that the pre-pass is queued: its counts are what the stream has written once it gets here."""
        if self.bad.is_cuda and not self.capturing:
            self.counted = torch.cuda.Event()
            self.counted.record(torch.cuda.current_stream(self.bad.device))

    def check(self, target: torch.Tensor, n_cols: int, ignore_index: int) -> None:
        """Raise ValueError if the pre-pass found targets outside [0, V)."""
        if not self.will_check:
            return  # recorded into a CUDA graph
        counts = self.bad  # on the CPU: read directly
        if self.counted is not None:
            side = _copy_stream(device_index(self.bad.device))
            side.wait_event(self.counted)
            with torch.cuda.stream(side):
                counts = torch.empty(self.bad.shape, dtype=self.bad.dtype, pin_memory=True)
                counts.copy_(self.bad, non_blocking=True)
            side.synchronize()  # the side stream holds nothing but such copies
        n_bad = int(counts.sum())
        if n_bad:
            flat = target.reshape(-1).long()  # as the kernel compares: an int8 or uint8 target would wrap ignore_index
            bad = (flat != ignore_index) & ((flat < 0) | (flat >= n_cols))
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"cross_entropy: {n_bad} target(s) outside [0, {n_cols}) that are not ignore_index={ignore_index}, "
                f"e.g. target {int(flat[row])} at row {row} (of the flattened targets)")


@functools.lru_cache(maxsize=None)
def _copy_stream(index: int) -> torch.cuda.Stream:
    """A side stream of GPU `index` for `_BadTargetCount`'s copies, made on first use."""
    return torch.cuda.Stream(index)


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                          reduction: str = "mean", with_grad: bool = False, inplace: bool = False,
                          single_block: bool | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss, gradient, gradient scale): the gradient, when `with_grad`, is d(loss)/d(logits) for an
    incoming gradient of 1, times the scale when that is not None.

    The gradient lands in a new tensor shaped like the logits (in their dtype), or, with
    `inplace`, in the logits' own storage. Inputs are assumed validated (see `cross_entropy`).

    The scale is a 0-dim tensor, 1 / (counted rows), for a "mean" over fp16 logits, and None
    otherwise. fp16 holds nothing below 6e-8, so a stored p / N would lose the small probabilities
    before the backward multiplies in the incoming gradient, which mixed-precision training scales
    up (GradScaler: from 2**16, growing while no step overflows) precisely so that they survive. In
    fp16 the gradient is stored without the mean's 1/N and the backward applies it with the incoming
    gradient, as PyTorch's fp32 loss does; bf16 and fp32 have fp32's range and fold it in.
    """
    n_cols = logits.shape[-1]
    n_rows = target.numel()
    flat_target = target.reshape(-1).contiguous()
    device = logits.device

    grad = None
    if with_grad:
        grad = logits if inplace else torch.empty_like(logits)
    rows_per_batch, xsb, xst, xsv = _row_layout(logits)
    _, gsb, gst, gsv = _row_layout(grad) if grad is not None else (0, 0, 0, 0)
    block, single, num_warps = _launch_params(n_cols, logits.element_size(), single_block)
    first, second, third = row_pieces(n_cols, block) if single else (block, 0, 0)
    fold_mean = reduction == "mean" and logits.dtype != torch.float16
    rows = _rows_per_program(block) if single and not second else 1  # (a row in pieces is a long one)
    reduce = reduction != "none"
    # "none": each row's loss. "mean"/"sum": each program's sum of its rows' losses (no more programs than
    # rows), and the loss, their total (`_sum_of_programs`); for "mean" each row's loss comes divided by the
    # count of counted rows (NaN if every row is ignored), so the mean is a sum too.
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device) if reduce else loss_rows
    # stats: [the ticket of `_sum_of_programs`, n_parts counts of counted rows, n_parts counts of bad targets]
    n_parts = cdiv(n_rows, STATS_BLOCK)
    stats = torch.empty(1 + 2 * n_parts, dtype=torch.int32, device=device)
    bad_targets = _BadTargetCount(stats[1 + n_parts:])
    args = (logits, flat_target, loss_rows, loss, grad if grad is not None else logits, stats,
            n_rows, rows_per_batch, xsb, xst, xsv, gsb, gst, gsv, n_cols, ignore_index, n_parts)
    meta = dict(BLOCK=first, PIECE1=second, PIECE2=third, SINGLE_BLOCK=single, HAS_GRAD=with_grad, MEAN=fold_mean,
                LOSS_MEAN=reduction == "mean", ROWS=rows, STOP_ON_BAD=bad_targets.will_check, REDUCE=reduce,
                UNIT_STRIDE=xsv == 1 and gsv in (0, 1), STAGES=ONLINE_STAGES, num_warps=num_warps)

    # The pre-pass and the main kernel are queued back to back, everything above worked out before either:
    # a GPU done with whatever came before would otherwise wait while the host prepared the main kernel.
    launch(_target_stats_kernel, (n_parts,), flat_target, stats, n_rows, n_cols, ignore_index, n_parts,
           BLOCK=STATS_BLOCK, num_warps=4)
    bad_targets.mark()
    if single and rows == 1:  # a row held whole: a program per row, or for long rows one per SM that prefetches
        element_size = logits.element_size()
        launch_rows(_cross_entropy_fwd_kernel, n_rows, block, first + second + third, element_size, device, args,
                    meta, loop_warps=ROW_LOOP_WARPS if element_size == 2 else None)
    else:
        grid = (cdiv(n_rows, rows),) if rows > 1 else _grid(n_rows, False, ONLINE_PROGRAMS_PER_SM, device)
        launch(_cross_entropy_fwd_kernel, grid, *args, ROW_STAGES=1, **meta)
    # The check comes now, when the main kernel is queued: the host waits for the pre-pass's counts only (copied
    # on a side stream) and the GPU keeps busy meanwhile. The main kernel wrote no gradient if a target was
    # bad, so logits given with inplace=True come out of a call that raises as they went in.
    bad_targets.check(target, n_cols, ignore_index)
    grad_scale = None
    if with_grad and reduction == "mean" and not fold_mean:
        grad_scale = 1.0 / stats[1:1 + n_parts].sum().clamp(min=1).float()
    return loss, grad, grad_scale


def scale_rows_(grad: torch.Tensor, dloss: torch.Tensor) -> torch.Tensor:
    """grad[row, :] *= dloss[row] in place (dloss a scalar or one value per row); free where dloss == 1."""
    n_cols = grad.shape[-1]
    n_rows = grad.numel() // n_cols
    dloss = dloss.reshape(-1) if dloss.dim() else dloss.reshape(1)
    dloss_stride = dloss.stride(0) if dloss.numel() == n_rows and n_rows > 1 else 0
    rows_per_batch, sb, st, sv = _row_layout(grad)
    block = min(ONLINE_BLOCK, next_power_of_2(n_cols))
    launch(_scale_rows_kernel, _grid(n_rows, False, ONLINE_PROGRAMS_PER_SM, grad.device), grad, dloss,
           dloss_stride, n_rows, rows_per_batch, sb, st, sv, n_cols,
           BLOCK=block, num_warps=min(16, max(4, block // 1024)))
    return grad


class CrossEntropyFunction(torch.autograd.Function):
    """The forward writes d(loss)/d(logits) for an incoming gradient of 1; the backward scales it
    (by the incoming gradient, times 1/N for an fp16 "mean": see `cross_entropy_forward`).

    The buffer is kept on ctx (it is neither an input nor an output of the forward, except
    with `inplace`, where it is the logits' storage) and released by the backward.
    """

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, inplace):
        loss, grad, ctx.grad_scale = cross_entropy_forward(logits, target, ignore_index, reduction, with_grad=True,
                                                           inplace=inplace)
        if inplace:
            # The logits now hold the gradient. Bumping their version makes autograd raise, instead of
            # silently using the gradient, if some other operation saved the logits for its backward.
            torch.autograd.graph.increment_version(logits)
            grad = grad.detach()
        ctx.grad = grad
        return loss

    @staticmethod
    @no_double_backward
    def backward(ctx, dloss):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "cross_entropy: backward ran twice through the same graph. The fused loss writes its "
                "gradient during the forward and the backward scales that buffer in place and releases "
                "it, so retain_graph=True with a second backward is not supported.")
        ctx.grad = None
        if ctx.grad_scale is not None:
            dloss = dloss * ctx.grad_scale
        return scale_rows_(grad, dloss), None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  *, inplace: bool = False) -> torch.Tensor:
    """Cross-entropy of `logits` (N, V) or (B, T, V) against class indices `target` (N,) or (B, T).

    Like ``F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=..., reduction=...)``
    (``.view(target.shape)`` for "none"), with the classes along the last dimension. All math is
    fp32 and the loss is returned in **float32** for fp32, fp16 and bf16 logits.

    Rows whose target is `ignore_index` add 0 to the loss and get a zero gradient; "mean"
    divides by the number of the other rows (NaN when there are none, as PyTorch).

    When gradients are needed, the forward writes the gradient into one buffer shaped like the
    logits, in their dtype, and the backward is free when the incoming gradient is 1 (for fp16
    logits with "mean" it is one pass over that buffer: see `cross_entropy_forward`); under
    ``torch.no_grad()`` (or logits that do not require grad) no buffer is allocated. ``inplace=True`` writes it into the logits' own storage instead, saving
    that buffer: the logits then hold the gradient after the call, so use it only when nothing
    else reads them (e.g. the output of the LM head, straight into the loss). It needs
    contiguous, non-leaf logits.
    """
    check_tensor("cross_entropy logits", logits, dtypes=FLOAT_DTYPES, ndim=(2, 3))
    check_tensor("cross_entropy target", target, dtypes=INTEGER_DTYPES, device=logits.device)
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"cross_entropy: target of shape {tuple(target.shape)} does not match logits of shape "
                         f"{tuple(logits.shape)}; expected target shape {tuple(logits.shape[:-1])} "
                         "(classes are the last dimension of the logits)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.shape[-1] == 0:
        raise ValueError("cross_entropy: logits have 0 classes")
    ignore_index = as_int("cross_entropy: ignore_index", ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"cross_entropy: ignore_index {ignore_index} does not fit in 64 bits")
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace and needs_grad:
        if logits.is_leaf:
            raise ValueError("cross_entropy: inplace=True would overwrite a leaf tensor's values with its own "
                             "gradient; use it on the output of a layer (e.g. the LM head), or inplace=False")
        if not logits.is_contiguous():
            raise ValueError("cross_entropy: inplace=True needs contiguous logits")
    if target.numel() == 0:  # nothing to launch: PyTorch's own answer (NaN, 0 or empty), still differentiable
        return torch.nn.functional.cross_entropy(
            logits.reshape(0, logits.shape[-1]).float(), target.reshape(0).long(), ignore_index=ignore_index,
            reduction=reduction).view(target.shape if reduction == "none" else ())
    if needs_grad:
        loss = CrossEntropyFunction.apply(logits, target, ignore_index, reduction, inplace)
    else:
        loss, _, _ = cross_entropy_forward(logits, target, ignore_index, reduction, with_grad=False)
    # "none": the per-row losses shaped like the targets here, not inside the Function (see `runtime.shaped`)
    return shaped(loss, target.shape) if reduction == "none" else loss
