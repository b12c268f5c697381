"""Softmax over the last dimension, forward and backward, with an optional causal mask.

    y_j = exp(x_j - m) / sum_k exp(x_k - m),      m = max_k x_k
    dx_j = y_j * (dy_j - sum_k dy_k y_k)

Softmax is memory bound: it reads x once and writes y once (backward reads y and
dy, writes dx), so the goal is to touch each byte exactly once. When the row fits
in one block (up to MAX_FUSED_BLOCK elements) a program owns one row, and the row
stays in registers between the max, the sum and the division: one read, one
write (a long row that a power-of-two block would pad heavily is held as two or
three power-of-two pieces instead, see `row_pieces`). From ROW_LOOP_FROM lanes on,
where shared memory holds a row, one program per SM walks the rows instead, and the
loads of its next rows are in flight while it reduces and writes this one (`row_loop`).
Longer rows stream through blocks twice: the first pass keeps a running max and a
running sum rescaled whenever the max grows (the "online softmax" of Milakov &
Gimelshein), the second writes the result. For those the grid is a few
programs per SM, each looping over rows, so that fewer rows are in flight and more
of the second pass reads its row from L2 rather than from HBM (all of it where the
rows in flight fit in L2's 50 MB; see ONLINE_PROGRAMS_PER_SM).

The causal mask is the seed's: for input of shape (..., M, N), row i of each
M x N matrix only sees columns j <= i (top-left aligned, as
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .runtime import (FLOAT_DTYPES, as_int, check_tensor, launch, next_power_of_2, no_double_backward, num_sms,
                      shaped, shared_memory)

#: Longest row kept whole in registers (elements; 64K bf16 = 128 KB per program, measured fastest with
#: 16 warps on an H100). fp32 rows get half. Longer rows take the two-pass online path.
MAX_FUSED_BLOCK = 65536
#: Block width of the online path.
ONLINE_BLOCK = 8192
#: Programs per SM on the online path (forward, backward) and the pipelining depth of its loops. Measured
#: on the H100 at (8192, 50304) bf16: one program per row (all 8192 rows queued, hundreds in flight, more
#: bytes than the 50 MB L2) took 1.36 ms for the backward; 1 program per SM 1.11 ms, 4 per SM 1.35 ms.
#: The forward, which keeps one row in flight where the backward keeps two, was fastest at 4 per SM.
ONLINE_PROGRAMS_PER_SM = (4, 1)
ONLINE_STAGES = 3
#: Rows held on chip whose power-of-two block is at least this wide may be held as pieces (`row_pieces`);
#: at (8192, 12000), a block of 16 384 against pieces of 8192 + 4096, the two measured the same.
PIECES_FROM = 32768
#: The smallest piece: 2 lanes a thread at 16 warps.
MIN_PIECE = 1024
#: Rows held on chip in a block of at least this many lanes are walked by one program per SM (`row_loop`).
#: At (4096, 16384) the loop took 98 us of GPU time against 92 for a program per row (four rows per SM in flight).
ROW_LOOP_FROM = 32768
#: Shared memory `row_loop` leaves to the kernel's own use (the reductions' scratch) beside the rows it prefetches.
ROW_SMEM_RESERVE = 16384

# exp(x) = exp2(x * log2(e)): exp2 is the GPU's native instruction. A constexpr, because compiled
# kernels may only read globals that are compile-time constants.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def online_update(m, d, x):
    """One block of the online softmax: per-lane running max `m` and sum `d` of exp(x - m), after seeing `x`.

    When the max grows from m to m', the sum so far is rescaled by exp(m - m'). A lane that
    has seen only -inf keeps d = 0 (exp(-inf - -inf) would be NaN). Cross-entropy (chapter 6)
    streams its vocabulary rows through the same two functions.
    """
    # propagate_nan: a NaN in x must make the row NaN, as in PyTorch; the GPU's max instruction would
    # return the other operand, and a NaN in a lane's first block would vanish from the row.
    m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
    alpha = tl.where(m_new == -float("inf"), 0.0, tl.exp2((m - m_new) * LOG2E))
    d = d * alpha + tl.where(m_new == -float("inf"), 0.0, tl.exp2((x - m_new) * LOG2E))
    return m_new, d


@triton.jit
def online_combine(m, d):
    """Combine the lanes of `online_update`: the row's max and its sum of exp(x - max)."""
    m_row = tl.max(m, axis=0)
    return m_row, tl.sum(d * tl.exp2((m - m_row) * LOG2E), axis=0)


@triton.jit
def exp_and_sum(x, m):
    """(exp(x - m) in x's own dtype, its sum in fp32) for a row x held on chip, m its max.

    One exp2 per value: the exponentials are kept for the caller (exp(x - m) / sum is the softmax)
    instead of being computed a second time. Kept in 16 bits as x was, e costs no more registers
    than x did; the sum is taken in fp32 before that rounding, and the result is rounded once more
    when stored (within one unit in the last place of a 16-bit output). Measured on the H100 (bf16,
    kernel time, `probe.py onexp`): (8192, 32000) 455 -> 395 us, (8192, 50304) 739 -> 735 us.
    Cross-entropy's row kernel does the same. With a program per row it spilled more registers there
    (50 against 22) and got slower (755 -> 838 us at (8192, 50304)); walked by a looping program that
    prefetches its rows (`row_loop`), on 8 warps, it took 603 us against 734 for the package then (a program
    per row, two exponentials a value).
    """
    e = tl.exp2((x.to(tl.float32) - m) * LOG2E)  # masked lanes: exp(-inf) = 0
    return e.to(x.dtype), tl.sum(e, axis=0)


@triton.jit
def pieces_exp_and_sum(x, x1, x2, m, PIECE1: tl.constexpr, PIECE2: tl.constexpr):
    """`exp_and_sum` over a row held as pieces x, x1, x2 (see `row_pieces`): (e, e1, e2, their sum in fp32).
    A piece the row does not have (PIECE 0) comes back as it went in, unread. Cross-entropy's row kernel
    (chapter 6) takes its exponentials the same way."""
    e, d = exp_and_sum(x, m)
    e1 = x1
    e2 = x2
    if PIECE1 > 0:
        e1, d1 = exp_and_sum(x1, m)
        d += d1
    if PIECE2 > 0:
        e2, d2 = exp_and_sum(x2, m)
        d += d2
    return e, e1, e2, d


@triton.jit
def strided(cols, stride, UNIT_STRIDE: tl.constexpr):
    """cols * stride. At unit stride that is cols itself, int32 and visibly contiguous, so loads and stores
    are vectorised; otherwise int64, so that a large stride (a transposed tensor) cannot overflow."""
    if UNIT_STRIDE:
        return cols
    else:
        return cols.to(tl.int64) * stride


@triton.jit
def load_lanes(row_ptr, start, n, stride, B: tl.constexpr, UNIT_STRIDE: tl.constexpr):
    """Lanes [start, start + B) of a row; those past `n` load as -inf, which max ignores and exp makes 0."""
    cols = start + tl.arange(0, B)
    return tl.load(row_ptr + strided(cols, stride, UNIT_STRIDE), mask=cols < n, other=-float("inf"))


@triton.jit
def load_pieces(row_ptr, n, stride, BLOCK: tl.constexpr, PIECE1: tl.constexpr, PIECE2: tl.constexpr,
                UNIT_STRIDE: tl.constexpr):
    """A row on chip as BLOCK lanes followed by PIECE1 and PIECE2 more (0: none; see `row_pieces`): (x, x1, x2).

    A piece the row does not have is returned as x, a stand-in that `pieces_max` and the callers never read.
    Every load is issued before the caller's first reduction waits on one. Cross-entropy's row kernel
    (chapter 6) holds its rows the same way."""
    x = load_lanes(row_ptr, 0, n, stride, BLOCK, UNIT_STRIDE)
    x1 = x
    x2 = x
    if PIECE1 > 0:
        x1 = load_lanes(row_ptr, BLOCK, n, stride, PIECE1, UNIT_STRIDE)
    if PIECE2 > 0:
        x2 = load_lanes(row_ptr, BLOCK + PIECE1, n, stride, PIECE2, UNIT_STRIDE)
    return x, x1, x2


@triton.jit
def pieces_max(x, x1, x2, PIECE1: tl.constexpr, PIECE2: tl.constexpr):
    """The max, in fp32, of a row held as pieces x, x1, x2 (see `row_pieces`); x1 and x2 are not read when
    their PIECE is 0 (pass x for them). Cross-entropy's row kernel holds its rows the same way."""
    m = tl.max(x, axis=0)
    if PIECE1 > 0:
        m = tl.maximum(m, tl.max(x1, axis=0))
    if PIECE2 > 0:
        m = tl.maximum(m, tl.max(x2, axis=0))
    return m.to(tl.float32)


@triton.jit
def _store_lanes(row_ptr, start, n, e, inv_sum, B: tl.constexpr):
    """y = e / sum on lanes [start, start + B) of a row, the lanes below `n` only."""
    cols = start + tl.arange(0, B)
    tl.store(row_ptr + cols, (e.to(tl.float32) * inv_sum).to(row_ptr.dtype.element_ty), mask=cols < n)


@triton.jit
def _softmax_row(x_ptr, y_ptr, row, x_row_stride, y_row_stride, n_cols, rows_per_matrix,
                 BLOCK: tl.constexpr, PIECE1: tl.constexpr, PIECE2: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
                 CAUSAL: tl.constexpr, STAGES: tl.constexpr):
    """y = softmax(x) of one row (int64 `row`: row * stride can pass 2**31 elements)."""
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    cols = tl.arange(0, BLOCK)
    # Columns this row may see; under the causal mask, row i of each matrix sees 0..i.
    n_seen = n_cols
    if CAUSAL:
        n_seen = tl.minimum(row % rows_per_matrix + 1, n_cols)

    if SINGLE_BLOCK:
        # The row on chip, in pieces. Masked-out columns load as -inf, so exp() makes them exactly 0 in
        # the output. x stays in its own dtype (bf16: two values per register) so a 50K-wide row fits on
        # chip; the max is exact in any dtype, and exp_and_sum keeps the exponentials in it too.
        x, x1, x2 = load_pieces(x_row, n_seen, 1, BLOCK, PIECE1, PIECE2, True)
        m = pieces_max(x, x1, x2, PIECE1, PIECE2)
        e, e1, e2, d = pieces_exp_and_sum(x, x1, x2, m, PIECE1, PIECE2)
        inv_sum = 1.0 / d
        _store_lanes(y_row, 0, n_cols, e, inv_sum, BLOCK)
        if PIECE1 > 0:
            _store_lanes(y_row, BLOCK, n_cols, e1, inv_sum, PIECE1)
        if PIECE2 > 0:
            _store_lanes(y_row, BLOCK + PIECE1, n_cols, e2, inv_sum, PIECE2)
    else:
        # Pass 1: per-lane running max m and running sum d of exp(x - m). tl.range's stages let
        # the loads of the next blocks start while this one is reduced.
        m = tl.full([BLOCK], -float("inf"), tl.float32)
        d = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, n_seen, BLOCK, num_stages=STAGES):
            x = tl.load(x_row + start + cols, mask=start + cols < n_seen, other=-float("inf")).to(tl.float32)
            m, d = online_update(m, d, x)
        m_row, d_row = online_combine(m, d)
        # Pass 2: normalise and write (columns past n_seen get exp(-inf) = 0). This program read
        # the row moments ago: it comes back from L2.
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            x = tl.load(x_row + start + cols, mask=start + cols < n_seen, other=-float("inf")).to(tl.float32)
            y = tl.exp2((x - m_row) * LOG2E) / d_row
            tl.store(y_row + start + cols, y.to(y_ptr.dtype.element_ty), mask=start + cols < n_cols)


@triton.jit
def _softmax_fwd_kernel(x_ptr, y_ptr, x_row_stride, y_row_stride, n_rows, n_cols, rows_per_matrix,
                        BLOCK: tl.constexpr, PIECE1: tl.constexpr, PIECE2: tl.constexpr,
                        SINGLE_BLOCK: tl.constexpr, CAUSAL: tl.constexpr, STAGES: tl.constexpr,
                        ROW_STAGES: tl.constexpr):
    if SINGLE_BLOCK:  # a program per row, or one per SM that prefetches its next rows (`row_loop`)
        for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0), num_stages=ROW_STAGES):
            _softmax_row(x_ptr, y_ptr, tl.cast(row, tl.int64), x_row_stride, y_row_stride, n_cols,
                         rows_per_matrix, BLOCK, PIECE1, PIECE2, SINGLE_BLOCK, CAUSAL, STAGES)
    else:  # a few programs per SM, program p doing rows p, p + P, p + 2P, ...
        for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            _softmax_row(x_ptr, y_ptr, row, x_row_stride, y_row_stride, n_cols,
                         rows_per_matrix, BLOCK, PIECE1, PIECE2, SINGLE_BLOCK, CAUSAL, STAGES)


@triton.jit
def _softmax_bwd_row(y_ptr, dy_ptr, dx_ptr, row, y_row_stride, dy_row_stride, dx_row_stride, n_cols,
                     BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """dx = y * (dy - sum(y * dy)) of one row. The causal mask needs no special case: masked columns
    have y = 0, hence dx = 0."""
    y_row = y_ptr + row * y_row_stride
    dy_row = dy_ptr + row * dy_row_stride
    dx_row = dx_ptr + row * dx_row_stride
    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        mask = cols < n_cols
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(y * dy, axis=0))
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            mask = start + cols < n_cols
            y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += y * dy
        s = tl.sum(acc, axis=0)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):  # from L2, as the forward's pass 2
            mask = start + cols < n_cols
            y = tl.load(y_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + start + cols, (y * (dy - s)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(y_ptr, dy_ptr, dx_ptr, y_row_stride, dy_row_stride, dx_row_stride, n_rows, n_cols,
                        BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, STAGES: tl.constexpr):
    if SINGLE_BLOCK:  # a program per row (the backward never loops over rows held on chip)
        _softmax_bwd_row(y_ptr, dy_ptr, dx_ptr, tl.program_id(0).to(tl.int64), y_row_stride, dy_row_stride,
                         dx_row_stride, n_cols, BLOCK, SINGLE_BLOCK, STAGES)
    else:
        for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
            _softmax_bwd_row(y_ptr, dy_ptr, dx_ptr, row, y_row_stride, dy_row_stride, dx_row_stride, n_cols,
                             BLOCK, SINGLE_BLOCK, STAGES)


def _launch_params(n_cols: int, element_size: int = 2, rows_held: int = 1) -> tuple[int, bool, int]:
    """Block width, whether the row fits in one block, and warps (a warp per 1024 lanes, 4 to 16).

    `rows_held` is how many row-sized tensors the kernel keeps on chip (forward 1, backward 2).
    """
    limit = MAX_FUSED_BLOCK * 2 // (element_size * rows_held)
    if n_cols <= limit:
        block = next_power_of_2(n_cols)
        single = True
    else:
        block = ONLINE_BLOCK
        single = False
    num_warps = min(16, max(4, block // 1024))
    return block, single, num_warps


def _prev_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def row_pieces(n_cols: int, block: int) -> tuple[int, int, int]:
    """The lanes that hold a row of `n_cols` on chip: (first piece, second, third), 0 for a piece not used.

    `tl.arange` needs a power of two, so a row is one block of `block` = next_power_of_2(n_cols) lanes,
    and at GPT-2's 50 304 columns 23% of the 65 536 lanes are padding: loaded (masked), exponentiated
    and reduced like the rest. In a long row that is what bounds the kernel (one program per SM holds
    the row; its arithmetic does not overlap its memory traffic), so a long row whose block pads it by
    more than 1/8 is held instead as up to three power-of-two pieces: the largest power of two below
    n_cols, the largest below the rest, and what remains rounded up (50 304 columns in 32 768 + 16 384 + 2 048
    = 51 200 lanes, 2% padding). Measured on the H100 (bf16 forward, do_bench, `benchmarks/experiments/pieces.py`):
    (8192, 50304) 650.7 us (2533 GB/s) against 729.7 us (2259 GB/s) for the padded block, a copy 548.4 us;
    (8192, 40000) 547 against 642 us; (8192, 20000) 248 against 333 us. Rows with little padding keep one
    block: three pieces of 16 384 + 8 192 + 8 192 for (8192, 32000) took 466 us against 397.
    """
    if block < PIECES_FROM or n_cols == block:
        return block, 0, 0
    first = _prev_power_of_2(n_cols)
    rest = n_cols - first
    second = max(MIN_PIECE, _prev_power_of_2(rest))
    third = max(MIN_PIECE, next_power_of_2(rest - second)) if rest > second else 0
    if third == second:  # two equal pieces make one
        second, third = 2 * second, 0
    if second == first or 8 * (first + second + third) > 7 * block:
        return block, 0, 0
    return first, second, third


def row_loop(n_rows: int, block: int, lanes: int, element_size: int, device: torch.device) -> tuple[tuple[int], int]:
    """(grid, pipelining stages) for rows held whole on chip in a block of `block` lanes, `lanes` with its pieces.

    A program per row holds its row in registers, and while it reduces and writes, its SM has no load
    in flight: at (8192, 50304) bf16, one 100 KB row per SM, that kernel ran at 84% of a copy's speed. So
    long rows are walked by one program per SM instead, `tl.range(..., num_stages=S)`: Triton's pipeliner
    then copies the next S - 1 rows into shared memory (cp.async) while this one is worked on, as many as
    the GPU's shared memory holds (two at 100 KB a row on an H100, none on a T4). Measured on the H100
    (bf16 softmax forward, do_bench, `benchmarks/experiments/row_prefetch.py`): (8192, 50304) 583 us
    against 656, a copy 549; (8192, 32000) 371 against 397; (8192, 20000) 241 against 249. The loop counts
    rows in int32 and widens each row's offset inside: counted in int64, the same kernel spilled and took 745
    us at (8192, 50304). Shorter rows keep a program each: several of them in flight per SM hide the loads
    already. The interpreter loops too, on its 4 "SMs", so that the CPU tests walk several rows per program.
    """
    if block < ROW_LOOP_FROM:
        return (n_rows,), 1
    if device.type != "cuda":
        return (min(n_rows, num_sms(device)),), 1
    ahead = min(2, (shared_memory(device) - ROW_SMEM_RESERVE) // (lanes * element_size))
    if ahead < 1:  # no room for a row in shared memory: nothing to prefetch, a program per row
        return (n_rows,), 1
    return (min(n_rows, num_sms(device)),), 1 + ahead


#: (kernel, lanes, element size, device) whose prefetching loop did not fit in shared memory after all (`launch_rows`).
_NO_ROOM: set = set()


def launch_rows(kernel, n_rows: int, block: int, lanes: int, element_size: int, device: torch.device, args: tuple,
                meta: dict, loop_warps: int | None = None):
    """Launch `kernel` over rows held whole on chip, with the grid and ROW_STAGES of `row_loop`.

    `row_loop` predicts the shared memory the pipeliner takes, S - 1 rows, from what it took on an H100
    with Triton 3.6. Should a compile take more (Triton raises OutOfResources), the call runs with a
    program per row instead, and so does every later call with rows of that size. `loop_warps`, if given,
    replaces meta's num_warps when the rows loop.
    """
    grid, stages = row_loop(n_rows, block, lanes, element_size, device)
    if stages > 1:
        key = (kernel, lanes, element_size, device)
        if key not in _NO_ROOM:
            loop_meta = {**meta, "num_warps": loop_warps} if loop_warps else meta
            try:
                return launch(kernel, grid, *args, ROW_STAGES=stages, **loop_meta)
            except OutOfResources:
                _NO_ROOM.add(key)
        grid, stages = (n_rows,), 1
    return launch(kernel, grid, *args, ROW_STAGES=stages, **meta)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, cols) view with unit column stride, copying only when a view cannot do."""
    if t.dim() == 2 and t.stride(-1) == 1:  # already rows: no reshape op (each costs microseconds of host time)
        return t
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(n_rows: int, single: bool, programs_per_sm: int, device: torch.device) -> tuple[int]:
    """One program per row for rows in one block; a few per SM, looping over rows, on the online path."""
    return (n_rows if single else min(n_rows, programs_per_sm * num_sms(device)),)


def softmax_forward(x2: torch.Tensor, causal: bool = False, rows_per_matrix: int = 1) -> torch.Tensor:
    n_rows, n_cols = x2.shape
    y2 = torch.empty_like(x2)  # (a row-strided x2 is not dense: y2 then comes out contiguous)
    block, single, num_warps = _launch_params(n_cols, x2.element_size())
    first, second, third = row_pieces(n_cols, block) if single else (block, 0, 0)
    args = (x2, y2, x2.stride(0), y2.stride(0), n_rows, n_cols, rows_per_matrix)
    meta = dict(BLOCK=first, PIECE1=second, PIECE2=third, SINGLE_BLOCK=single, CAUSAL=causal, STAGES=ONLINE_STAGES,
                num_warps=num_warps)
    if single:
        launch_rows(_softmax_fwd_kernel, n_rows, block, first + second + third, x2.element_size(), x2.device,
                    args, meta)
    else:
        launch(_softmax_fwd_kernel, _grid(n_rows, False, ONLINE_PROGRAMS_PER_SM[0], x2.device), *args,
               ROW_STAGES=1, **meta)
    return y2


def softmax_backward(y2: torch.Tensor, dy2: torch.Tensor) -> torch.Tensor:
    n_rows, n_cols = y2.shape
    dx2 = torch.empty_like(y2)
    block, single, num_warps = _launch_params(n_cols, y2.element_size(), rows_held=2)
    launch(_softmax_bwd_kernel, _grid(n_rows, single, ONLINE_PROGRAMS_PER_SM[1], y2.device),
           y2, dy2, dx2, y2.stride(0), dy2.stride(0), dx2.stride(0), n_rows, n_cols,
           BLOCK=block, SINGLE_BLOCK=single, STAGES=ONLINE_STAGES, num_warps=num_warps)
    return dx2


class SoftmaxFunction(torch.autograd.Function):
    """Softmax over the last dimension. Saves only y: the backward needs nothing else."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, causal: bool) -> torch.Tensor:
        rows_per_matrix = x.shape[-2] if causal else 1
        y2 = softmax_forward(_as_rows(x), causal, rows_per_matrix)
        ctx.save_for_backward(y2)
        ctx.x_shape = x.shape
        return y2  # (rows, N): `softmax` gives it x's shape, outside the Function (see `runtime.shaped`)

    @staticmethod
    @no_double_backward
    def backward(ctx, dy: torch.Tensor):
        (y2,) = ctx.saved_tensors
        dx2 = softmax_backward(y2, _as_rows(dy))
        return shaped(dx2, ctx.x_shape), None


def softmax(x: torch.Tensor, dim: int = -1, causal: bool = False) -> torch.Tensor:
    """Softmax of `x` along `dim`, like ``torch.softmax``, computed in fp32 and returned in x's dtype.

    ``causal=True`` (last dimension only, x at least 2-D) masks column j of row i
    of each trailing (M, N) matrix whenever j > i, as attention scores need.
    """
    check_tensor("softmax input", x, dtypes=FLOAT_DTYPES)
    dim = as_int("softmax: dim", dim)
    if not -max(x.dim(), 1) <= dim < max(x.dim(), 1):  # a 0-dim tensor takes dim 0 or -1, as in torch
        raise IndexError(f"softmax: dim {dim} is out of range for a tensor of {x.dim()} dimensions")
    if x.dim() == 0:
        return softmax(x.reshape(1), 0, causal).reshape(())
    dim = dim % x.dim()
    if causal and (dim != x.dim() - 1 or x.dim() < 2):
        raise ValueError("softmax: causal=True needs dim=-1 on a tensor of at least 2 dimensions (..., M, N)")
    if x.numel() == 0:  # nothing to launch: PyTorch's own (empty, still differentiable) result
        return torch.softmax(x, dim)
    if dim != x.dim() - 1:  # x is checked above: the moved view goes straight to the Function
        moved = x.movedim(dim, -1)
        return shaped(SoftmaxFunction.apply(moved, False), moved.shape).movedim(-1, dim)
    return shaped(SoftmaxFunction.apply(x, causal), x.shape)
