"""Dropout whose mask is never stored: regenerated from a seed in the backward.

    y = x * m / (1 - p),      m_i ~ Bernoulli(1 - p)
    dx = dy * m / (1 - p)     (the same operation, with the same m)

PyTorch's dropout saves the mask m for the backward: one byte per element on a
GPU (a bool tensor), a full tensor of the input's dtype on a CPU. We save only
the seed, a Python int. Every element's random number is a pure function of
(seed, element index) computed by Philox4x32-10, a counter-based generator
(Salmon et al., 2011), so the backward, or any other kernel, recomputes the
identical mask on the fly.

The mask convention, shared by every kernel of the package:

    element e of a contiguous tensor uses output word (e % 4) of
    Philox4x32-10(key = seed, counter = (e // 4, e // 2**34, 0, 0)) -- a uint32 r,
    and is kept when  r >= floor(p * 2**32)  (p rounded to fp32).

One Philox call yields four 32-bit words, so four neighbouring elements share one
call: that is what makes the dropout kernel memory bound instead of bound by
integer multiplies. The counter is 64 bits wide (two 32-bit words), so element
indices are unique up to 2**66: no wrap-around at 2**32 elements.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from . import runtime
from .runtime import FLOAT_DTYPES, as_float, as_int, autotune, cdiv, check_tensor, launch, no_double_backward

PHILOX_ROUNDS = 10


def philox_ptx(rounds: int = PHILOX_ROUNDS) -> str:
    """PTX for Philox4x32-`rounds` exactly as ``tl.philox`` computes it, for `tl.inline_asm_elementwise`
    (outputs $0-$3 = the four words; inputs $4-$7 = the counter c0-c3, $8, $9 = the key's low and high words).

    A Philox round multiplies two counter words by constants and needs both halves of each 64-bit product.
    ``tl.philox`` asks for them as a ``mul.hi`` and a ``mul.lo`` apiece; one ``mul.wide.u32`` gives both. Same
    words, fewer instructions: in the attention forward with dropout (chapter 5), a 64 x 64 tile's mask is 748
    SASS instructions against 920, and the kernel 151 us against 162 (`benchmarks/experiments/attn_rounds.py`).
    """
    body = ["{", ".reg .u32 %pc<10>;", ".reg .u64 %pw<2>;"]
    body += [f"mov.u32 %pc{i}, ${i + 4};" for i in range(6)]  # c0..c3, k0 (%pc4), k1 (%pc5)
    for _ in range(rounds):
        body += ["mul.wide.u32 %pw0, %pc0, 0xD2511F53;",  # A * c0
                 "mul.wide.u32 %pw1, %pc2, 0xCD9E8D57;",  # B * c2
                 "mov.b64 {%pc6, %pc7}, %pw0;",           # lo, hi of A * c0
                 "mov.b64 {%pc8, %pc9}, %pw1;",           # lo, hi of B * c2
                 "xor.b32 %pc0, %pc9, %pc1;", "xor.b32 %pc0, %pc0, %pc4;",  # c0 = hi(B c2) ^ c1 ^ k0
                 "xor.b32 %pc2, %pc7, %pc3;", "xor.b32 %pc2, %pc2, %pc5;",  # c2 = hi(A c0) ^ c3 ^ k1
                 "mov.u32 %pc1, %pc8;", "mov.u32 %pc3, %pc6;",              # c1 = lo(B c2), c3 = lo(A c0)
                 "add.u32 %pc4, %pc4, 0x9E3779B9;", "add.u32 %pc5, %pc5, 0xBB67AE85;"]  # the key's schedule
    body += [f"mov.u32 ${i}, %pc{i};" for i in range(4)] + ["}"]
    return "\n".join(body)


#: Philox in PTX on NVIDIA GPUs; ``tl.philox`` under the interpreter (which runs no PTX) and elsewhere.
PTX_PHILOX = tl.constexpr(not runtime.INTERPRET and runtime.DEVICE.type == "cuda" and torch.version.hip is None)
_PHILOX_PTX = tl.constexpr(philox_ptx())


@triton.jit
def philox(seed, c0, c1, c2, c3):
    """Philox4x32-10's four uint32 words at counter (c0, c1, c2, c3) (uint32 blocks of one shape) under key
    `seed`: what ``tl.philox(seed, c0, c1, c2, c3)`` returns, from PTX on an NVIDIA GPU (see `philox_ptx`)."""
    if PTX_PHILOX:
        tl.static_assert(c0.dtype.primitive_bitwidth == 32, "philox: the counter words must be 32-bit")
        key = tl.cast(seed, tl.uint64)  # tl.cast, not seed.to: a seed of 1, or a literal, arrives as a constexpr
        k0 = c0 * 0 + (key & 0xFFFFFFFF).to(tl.uint32)  # the key as blocks shaped like the counter
        k1 = c0 * 0 + ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
        r0, r1, r2, r3 = tl.inline_asm_elementwise(_PHILOX_PTX, "=r,=r,=r,=r,r,r,r,r,r,r", [c0, c1, c2, c3, k0, k1],
                                                   dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32),
                                                   is_pure=True, pack=1)
    else:
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    return r0, r1, r2, r3


@triton.jit
def _threshold(p):
    # P(r >= floor(p * 2**32)) = 1 - p exactly for a uniform uint32 r; p * 2**32 is exact in fp32.
    # Clamped to [0, 1 - 2**-24] (the largest fp32 below 1) so the conversion cannot overflow;
    # callers handle p >= 1 with (p < 1.0).
    return (tl.maximum(tl.minimum(p, 0.99999994), 0.0) * 4294967296.0).to(tl.uint32)


@triton.jit
def keep_mask(seed, offsets, p):
    """True where an element survives dropout with probability p (a bool block shaped like `offsets`).

    ``offsets`` are element indices (int32 or int64, >= 0); the random number of
    each is a pure function of (seed, offset), so a backward kernel, or a kernel
    that fuses dropout into something else, regenerates the identical mask
    instead of storing it. Element e reads word e % 4 of Philox4x32-10 at counter
    e // 4 (see the module docstring), which is exactly the mask
    ``dropout(torch.ones(shape), p, seed=seed) != 0`` gives element e of a
    contiguous tensor of that shape.

    How attention uses it: to drop the probabilities P[b, h, i, j] of a (B, H, M, N)
    attention inside its kernel, pass the index P[b, h, i, j] would have in a
    contiguous tensor,

        offsets = ((b * H + h) * M + rows[:, None]).to(tl.int64) * N + cols[None, :]

    (int64: B*H*M*N passes 2**31 at long sequence lengths), drop with
    ``p_tile = tl.where(keep_mask(seed, offsets, p), p_tile * scale, 0.0)`` and, in
    the backward, call it again with the same seed and offsets. The result is the
    same mask as ``dropout`` applied to the materialised probabilities, which is
    how it is tested. Faster, when N and the tile's first column are multiples of
    4: ``keep_mask_2d(seed, ((b * H + h) * M + rows).to(tl.int64) * N, start_n, p, BLOCK_N)``
    returns the same tile with one Philox call per four columns instead of one
    per element (the compiler does not discover that sharing by itself).

    p >= 1 drops everything; p <= 0 keeps everything.
    """
    counter = offsets >> 2
    lane = offsets & 3
    lo = counter.to(tl.uint32)
    if tl.constexpr(offsets.dtype.primitive_bitwidth) > 32:
        hi = (counter >> 32).to(tl.uint32)
    else:
        hi = lo * 0
    zero = lo * 0
    r0, r1, r2, r3 = philox(seed, lo, hi, zero, zero)
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return (r >= _threshold(p)) & (p < 1.0)


@triton.jit
def keep_mask_2d(seed, row_offsets, col_start, p, BN: tl.constexpr):
    """`keep_mask` of a [BM, BN] tile of a row-major matrix, with one Philox call per four columns.

    Returns ``keep_mask(seed, row_offsets[:, None] + col_start + tl.arange(0, BN)[None, :], p)``
    provided every ``row_offsets + col_start`` is a multiple of 4 (row length and
    ``col_start`` multiples of 4) and BN is a multiple of 4; otherwise use `keep_mask`.
    ``row_offsets`` ([BM], int64) is the element index of each row's column 0.

    `keep_mask` runs the full 10-round Philox for every element (~60 instructions);
    this shares each call among the four elements it serves (~15 per element),
    which matters inside attention, where the mask covers B*H*M*N probabilities.
    """
    BM: tl.constexpr = row_offsets.shape[0]
    counter = ((row_offsets + col_start) >> 2)[:, None] + tl.arange(0, BN // 4)[None, :]
    lo = counter.to(tl.uint32)
    hi = (counter.to(tl.int64) >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = philox(seed, lo, hi, zero, zero)
    # Element 4g + 2j + i of a row takes word 2j + i of group g (join stacks along a new last axis).
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BM, BN])
    return (r >= _threshold(p)) & (p < 1.0)


@triton.jit
def keep_tile(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    """The keep mask of the [rows, col_start : col_start + BLOCK_N] tile of a row-major matrix of `n_cols` columns.

    Element (r, c) takes the mask of element ``(row_base + r) * n_cols + c`` of a contiguous tensor,
    as `dropout` draws it (``row_base``: int64, so that the index may pass 2**31). Attention drops its
    probabilities P[b, h, i, j] with row_base = (b * H + h) * N_q; a GEMM drops its output tile with
    row_base = the tile's first row. GROUPED (n_cols and col_start multiples of 4) takes
    `keep_mask_2d`, one Philox call per four columns; otherwise `keep_mask`, one per element.
    """
    row_offsets = (row_base + rows) * n_cols
    if GROUPED:
        keep = keep_mask_2d(seed, row_offsets, col_start, p, BLOCK_N)
    else:
        keep = keep_mask(seed, row_offsets[:, None] + col_start + tl.arange(0, BLOCK_N)[None, :], p)
    return keep


def _configs():
    # First config: the one the interpreter keeps (runtime.autotune) and that a T4 runs happily.
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=4),
        triton.Config({"BLOCK": 4096}, num_warps=8),
        triton.Config({"BLOCK": 4096}, num_warps=4),
        triton.Config({"BLOCK": 8192}, num_warps=8),
        triton.Config({"BLOCK": 8192}, num_warps=16),
    ]


@triton.jit
def philox_key(seed, seed_base_ptr, SEED_BASE: tl.constexpr):
    """The Philox key of a mask: ``seed``, XOR the int64 stored at ``seed_base_ptr`` when ``SEED_BASE``.

    The second form is the one a CUDA graph can replay with new masks: the key's varying part is read
    from memory when the kernel runs, not recorded with its arguments (see `replayable_seeds`).
    """
    if SEED_BASE:
        seed = seed ^ tl.load(seed_base_ptr)
    return seed


@autotune(_configs(), key=["n_elements"])
@triton.jit(do_not_specialize=["seed"])
def _dropout_kernel(x_ptr, y_ptr, n_elements, p, scale, seed, seed_base_ptr, SEED_BASE: tl.constexpr,
                    BLOCK: tl.constexpr):
    # A block of the flat tensor is a one-row tile, so the mask comes from the same helper attention
    # uses. Every config gives the same output: the mask depends on (seed, element index), not BLOCK.
    seed = philox_key(seed, seed_base_ptr, SEED_BASE)
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: tensors of more than 2**31 elements
    offs = tl.arange(0, BLOCK)[None, :]
    in_bounds = offs < n_elements - start
    x = tl.load(x_ptr + start + offs, mask=in_bounds, other=0.0)
    keep = keep_mask_2d(seed, tl.full([1], 0, tl.int64) + start, 0, p, BLOCK)
    # x * (scale or 0), as torch computes it: kept elements round once, like x * scale, and a dropped
    # inf or NaN gives NaN, as in torch. (Selecting after the multiply costs 1.5 more instructions/element.)
    y = x.to(tl.float32) * tl.where(keep, scale, 0.0)
    tl.store(y_ptr + start + offs, y.to(y_ptr.dtype.element_ty), mask=in_bounds)


def normalize_seed(seed) -> int:
    """Any integer -> the int64 (two's complement) whose 64 bits are the Philox key.

    Seeds that agree modulo 2**64 give the same mask. The kernel receives it as i32 or i64
    (Triton picks by value); both sign-extend to the same 64-bit key.
    """
    s = as_int("seed", seed)  # rejects floats, strings and bools with a TypeError
    return (s + 2**63) % 2**64 - 2**63


def probability(what: str, p) -> float:
    """p as a Python float in [0, 1] (a numpy or 0-dim tensor value too, as F.dropout accepts), else a clear error."""
    value = as_float(what, p)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} has to be between 0 and 1, but got {p!r}")
    return value


def draw_seed() -> int:
    """A fresh seed from torch's default (CPU) generator: `torch.manual_seed` makes it reproducible."""
    return int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64))


# ---------------------------------------------------------------- seeds a CUDA graph can replay

#: The `replayable_seeds` blocks open now, innermost last: [base tensor, dropouts drawn so far].
_replayable: list = []


@contextlib.contextmanager
def replayable_seeds(base: torch.Tensor):
    """Inside this block, every mask drawn without an explicit seed (`dropout`, attention's, `feed_forward`'s) is keyed
    by ``salt ^ base``: ``base`` a one-element int64 tensor that the kernels read when they run, the salt a
    constant fixed by the call's place in the block (the n-th dropout of the block takes salt n).

    Why: a CUDA graph records every kernel's arguments, so a seed passed as a Python int would replay the
    same mask at every step. Recorded inside this block, a step's kernels read the varying part of their
    key from ``base``; write a new value there before each replay (``base.fill_(draw_seed())``, outside
    the graph) and each replay draws new masks, while the forward and the backward of one replay read the
    same value and agree. Eager calls inside the block key their masks the same way, so a training run
    draws the same masks whether a step was recorded, replayed or run eagerly.

    Blocks do not nest (an inner block's salts would repeat the outer one's), and the base must not change
    between a forward and its backward: the autograd functions that regenerate a mask save it, so autograd
    refuses such a backward (`feed_forward`'s backward reads its mask from the dropped output instead).
    """
    check_tensor("replayable_seeds: base", base, dtypes=(torch.int64,))
    if base.numel() != 1:
        raise ValueError(f"replayable_seeds: base must hold one int64, got shape {tuple(base.shape)}")
    if _replayable:
        raise RuntimeError("replayable_seeds blocks do not nest: an inner block's salts would repeat the outer "
                           "block's, and so would its masks")
    _replayable.append([base, 0])
    try:
        yield base
    finally:
        _replayable.pop()


def _salt(n: int) -> int:
    """The n-th salt of a `replayable_seeds` block: SplitMix64's output n, as a signed int64.

    Well-mixed 64-bit constants, so that the keys ``salt ^ base`` of a step's dropouts share no
    structure (consecutive integers would differ in a bit or two of the key).
    """
    z = (n * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return normalize_seed(z ^ (z >> 31))


def next_seed(seed, x: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The (seed, seed base) of a dropout on `x`: the caller's seed as it is; else, inside `replayable_seeds`,
    the block's next salt and its base tensor; else a seed drawn from torch's CPU generator."""
    if seed is not None:
        return normalize_seed(seed), None
    if _replayable:
        block = _replayable[-1]
        block[1] += 1
        if block[0].device != x.device:
            raise ValueError(f"replayable_seeds: the base is on {block[0].device}, the dropout's input on {x.device}")
        return _salt(block[1]), block[0]
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("dropout without a seed while a CUDA graph is being recorded: the graph would replay "
                           "one mask forever. Record inside `with replayable_seeds(base):` and write a new seed "
                           "into base before each replay (or pass seed= to keep one mask on purpose)")
    return draw_seed(), None


def dropout_forward(x: torch.Tensor, p: float, seed: int, seed_base: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the mask of (seed, p) to x, scaled by 1/(1-p): the whole forward, and (on dy) the whole backward.

    Non-contiguous x is copied first: the mask follows the element's index in
    row-major order of the logical shape, whatever the memory layout. With `seed_base` (a one-element
    int64 tensor) the key is ``seed ^ seed_base``, read by the kernel (`replayable_seeds`).
    """
    if p >= 1.0:  # every element dropped; times 0 rather than zeros, so a NaN or inf stays NaN as in F.dropout
        return x * 0
    x_c = x.contiguous()
    y = torch.empty_like(x_c)
    n = x_c.numel()
    if n == 0:
        return y
    grid = lambda meta: (cdiv(n, meta["BLOCK"]),)  # noqa: E731
    launch(_dropout_kernel, grid, x_c, y, n, float(p), 1.0 / (1.0 - p), seed,
           x_c if seed_base is None else seed_base, SEED_BASE=seed_base is not None)
    return y


class DropoutFunction(torch.autograd.Function):
    """Saves two Python numbers, the seed and p (and the seed base, one int64): zero bytes per element."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, seed_base: torch.Tensor | None = None) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        ctx.save_for_backward(seed_base)  # saved, so a base rewritten before the backward is an error, not a new mask
        return dropout_forward(x, p, seed, seed_base)

    @staticmethod
    @no_double_backward
    def backward(ctx, dy: torch.Tensor):
        # d(x * m * s)/dx = m * s: the backward is dropout of dy with the same seed.
        (seed_base,) = ctx.saved_tensors
        return dropout_forward(dy, ctx.p, ctx.seed, seed_base), None, None, None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, seed: int | None = None) -> torch.Tensor:
    """Like ``torch.nn.functional.dropout``: zero each element with probability p, scale the rest by 1/(1-p).

    The mask is never stored; the backward regenerates it from ``seed``. Without a
    seed, one is drawn from torch's default generator, so ``torch.manual_seed``
    makes the result reproducible. ``training=False`` or ``p == 0`` returns ``x``
    itself; ``p == 1`` returns ``x * 0`` (zeros, NaN where x is NaN or infinite, as F.dropout; zero gradients).
    """
    p = probability("dropout probability", p)
    if not isinstance(training, bool):  # "False" or None would silently pick a mode, as no F.dropout call can
        raise TypeError(f"dropout: training must be a bool, got {type(training).__name__}")
    check_tensor("dropout input", x, dtypes=FLOAT_DTYPES)
    if not training or p == 0:
        return x
    seed, seed_base = next_seed(seed, x)
    return DropoutFunction.apply(x, float(p), seed, seed_base)


# ---------------------------------------------------------------- reference (tests and the chapter)

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def philox4x32_reference(seed: int, c0, c1, c2=0, c3=0, rounds: int = 10):
    """Philox4x32 in NumPy: counter (c0, c1, c2, c3), key (seed mod 2**32, seed // 2**32 mod 2**32).

    Written from Salmon et al.'s definition, independently of Triton, so the tests
    can check the kernels bit for bit (and this function against Random123's
    published test vectors). Returns four uint32 arrays.
    """
    import numpy as np

    key = normalize_seed(seed) % 2**64
    k0, k1 = np.uint64(key & _U32), np.uint64(key >> 32)
    c0 = np.asarray(c0, dtype=np.uint64) & _U32
    c1 = np.asarray(c1, dtype=np.uint64) & _U32
    c0, c1 = np.broadcast_arrays(c0, c1)
    c2 = np.broadcast_to(np.asarray(c2, dtype=np.uint64) & _U32, c0.shape)
    c3 = np.broadcast_to(np.asarray(c3, dtype=np.uint64) & _U32, c0.shape)
    m0, m1 = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])
    mask32 = np.uint64(_U32)
    for _ in range(rounds):
        prod0 = m0 * c0  # both < 2**32: the product fits in 64 bits
        prod1 = m1 * c2
        c0, c1, c2, c3 = ((prod1 >> 32) ^ c1 ^ k0, prod1 & mask32,
                          (prod0 >> 32) ^ c3 ^ k1, prod0 & mask32)
        k0 = (k0 + np.uint64(_PHILOX_W[0])) & mask32
        k1 = (k1 + np.uint64(_PHILOX_W[1])) & mask32
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def reference_keep(seed: int, offsets, p: float) -> torch.Tensor:
    """The keep mask of the given element indices, computed on the CPU from the definition (bool tensor)."""
    import numpy as np

    offsets = np.asarray(offsets, dtype=np.int64)
    counter = (offsets >> 2).astype(np.uint64)
    words = philox4x32_reference(seed, counter & _U32, counter >> 32)
    r = np.choose((offsets & 3).astype(np.int64), words)
    p32 = float(np.float32(p))
    keep = r >= np.uint32(int(min(p32, 1 - 2**-24) * 2**32)) if p32 < 1 else np.zeros(r.shape, bool)
    return torch.from_numpy(np.ascontiguousarray(keep))


def reference_mask(shape, p: float, seed: int) -> torch.Tensor:
    """The keep mask ``dropout`` uses for a tensor of `shape` with this seed (bool, CPU)."""
    n = math.prod(shape)
    return reference_keep(seed, range(n), p).reshape(shape)
