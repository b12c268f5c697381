"""What attention's dropout forward pays for its random numbers: Philox rounds and bits per element (GPU).

    python3 benchmarks/experiments/attn_rounds.py            # every variant, each in its own process and cache

Causal attention forward at the seed model's shape (16 x 8 heads x 1024 tokens x 64, bf16), GPU time of one call
replayed as a CUDA graph (bench.measure_gpu_ms), p = 0.1, with `attention.keep_tile` swapped for:

  p0        no dropout at all (p = 0: the kernel compiled without its mask code)
  g10       the package's mask: one Philox4x32-10 call per four elements (32 bits each), `dropout.philox`
  g7, g4    the same with 7 and 4 rounds
  h16       one call per eight elements, each word's two 16-bit halves compared with a 16-bit threshold
  q8        one call per sixteen elements, 8-bit quarters (FlashAttention's choice)
  none      every element kept: what the rest of the dropout path costs
  element   one call per element, its word picked by the element's place (dropout.keep_mask): four times g10's
            rounds, nothing joined (the package's own mask)
  pairs     one call per two columns, the pair's two words picked by its place: twice the rounds, words joined in
            pairs (the package's mask too)
  tl10      g10's calls through tl.philox, which asks for each product's halves as a mul.hi and a mul.lo: the
            package's mask as it was drawn before `dropout.philox` (Philox in PTX, one mul.wide.u32 a product)

Only the amount of integer work matters here; h16 and q8 draw masks of their own (not the package's).

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, min of three; every variant tuned to 64 x 64 tiles, 4
warps, 3 stages, no spills): p0 62.3 us (128 registers), none 62.8 (128), g10 162.0 (218; through tl.philox
then, today's tl10), g7 140.5, g4 119.7, h16 142.5 (178), q8 126.2 (178). So the whole of dropout's cost in the forward is making the mask (keeping every
element through the same code costs nothing), and most of it is Philox's rounds: about 7 us a round, 70 of the 100
us; the rest (~29 us, what 0 rounds would leave) is the counter arithmetic, joining the words into the tile and
moving the mask into the accumulator's layout. Fewer bits per element save less than the rounds they spare: 16-bit
halves (half the calls, ~35 us of rounds spared) saved 20 us, splitting and joining eight values per call costing
back ~15; FlashAttention's 8-bit quarters 36 us. The package's own mask drawn other ways (checked tile for tile
against keep_tile), next run, g10 162.4: element 442.3 (the tuner fell back to 32 x 32 tiles, 156 registers) and
pairs 230.4 (209 registers). Four words a call joined into the tile is the cheapest way to this mask; the join
costs far less than the rounds it spares. The package keeps Philox4x32-10 and 32 bits: 7 rounds would change every
mask (and the dropout chapter's generator) for ~20 us a kernel, and fewer bits would round p.

Then Philox in PTX (first as a variant "wide", now the package's `dropout.philox`, so g10): compiled offline for
sm_90 (Triton 3.9's ptxas), a 64 x 64 tile's mask on 4 warps is 748 SASS instructions against 920 through
tl.philox, the 128 IMAD.HI.U32 and most of the 173 IMAD becoming 160 IMAD.WIDE.U32. Measured (same GPU and
versions): 151.1 us, and 151.5 in a second run, against 162.3 through tl.philox (tl10; registers 220 and 218,
same tiles), the mask checked tile for tile first. In the seed model's training step with dropout 0.1
(benchmarks/run.py) the step went from 8.98 ms (1.04x torch.compile's 9.34, an earlier run) to 8.69 (1.06x its
9.21, one process). Every other variant above (g7, g4, h16, q8, pairs) calls tl.philox: compare it with
tl10. element calls dropout.keep_mask, so it now runs the PTX too; its 442.3 us was measured through tl.philox.

From an earlier probe of the same question (attn_mask_cost.py, since removed: its variants set keep_tile on the
package's function `attention`, not on the module, so every one of them ran the package's mask): forward+backward
at this shape 253 us at p = 0 and 571-574 at p = 0.1; the tuner's kernels (4 warps, 3 stages, no spills) used
128 registers in the forward without dropout and 178 with it, dq 157 and 156-163, dk/dv 160 and 207-254.
"""
import os
import subprocess
import sys
import tempfile

VARIANTS = ["p0", "g10", "tl10", "g7", "g4", "h16", "q8", "none", "element", "pairs"]

if len(sys.argv) < 2 or sys.argv[1] == "--only":  # --only V [V ...]: just those variants
    for v in sys.argv[2:] or VARIANTS:  # a fresh Triton cache each: no variant can load another's compiled kernels
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"tc_{v}_"))
        subprocess.run([sys.executable, __file__, v], check=False, env=env)
    sys.exit(0)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import importlib  # noqa: E402

import triton_transformer as tt  # noqa: E402
from triton_transformer import bench, runtime  # noqa: E402

A = importlib.import_module("triton_transformer.attention")

D = importlib.import_module("triton_transformer.dropout")


@triton.jit
def _counters(row_base, rows, col_start, n_cols, WIDTH: tl.constexpr):
    # keep_mask_2d's Philox counters for a [BM, WIDTH] tile, one per four columns: (low word, high word, zeros)
    counter = (((row_base + rows) * n_cols + col_start) >> 2)[:, None] + tl.arange(0, WIDTH // 4)[None, :]
    lo = counter.to(tl.uint32)
    return lo, (counter.to(tl.int64) >> 32).to(tl.uint32), lo * 0


@triton.jit
def _joined(r0, r1, r2, r3, BM: tl.constexpr, WIDTH: tl.constexpr):
    # the four words of each call side by side, as keep_mask_2d joins them
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BM, WIDTH])


@triton.jit
def _words(seed, row_base, rows, col_start, n_cols, WIDTH: tl.constexpr, ROUNDS: tl.constexpr):
    # Philox words for a [BM, WIDTH] tile, one call per four of them, joined as keep_mask_2d joins them
    lo, hi, zero = _counters(row_base, rows, col_start, n_cols, WIDTH)
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero, ROUNDS)
    return _joined(r0, r1, r2, r3, rows.shape[0], WIDTH)


@triton.jit
def _kept(r, p):
    # the package's test on 32-bit words (dropout.keep_mask_2d): kept where r >= p * 2**32, nothing kept at p >= 1
    return (r >= D._threshold(p)) & (p < 1.0)


@triton.jit
def keep_g7(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    return _kept(_words(seed, row_base, rows, col_start, n_cols, BLOCK_N, 7), p)


@triton.jit
def keep_g4(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    return _kept(_words(seed, row_base, rows, col_start, n_cols, BLOCK_N, 4), p)


@triton.jit
def keep_h16(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    BM: tl.constexpr = rows.shape[0]
    w = _words(seed, row_base, rows, col_start // 2, n_cols // 2, BLOCK_N // 2, 10)
    r = tl.reshape(tl.join(w & 0xFFFF, w >> 16), [BM, BLOCK_N])
    return (r >= (tl.maximum(p, 0.0) * 65536.0).to(tl.uint32)) & (p < 1.0)


@triton.jit
def keep_q8(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    BM: tl.constexpr = rows.shape[0]
    w = _words(seed, row_base, rows, col_start // 4, n_cols // 4, BLOCK_N // 4, 10)
    h = tl.reshape(tl.join(w & 0xFFFF, w >> 16), [BM, BLOCK_N // 2])
    r = tl.reshape(tl.join(h & 0xFF, h >> 8), [BM, BLOCK_N])
    return (r >= (tl.maximum(p, 0.0) * 256.0).to(tl.uint32)) & (p < 1.0)


@triton.jit
def keep_element(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    row_offsets = (row_base + rows) * n_cols
    return D.keep_mask(seed, row_offsets[:, None] + col_start + tl.arange(0, BLOCK_N)[None, :], p)


@triton.jit
def keep_pairs(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    # element e takes word e % 4 of Philox at counter e // 4; a pair (e, e + 1), e even, shares its counter and
    # takes words 0, 1 or 2, 3 (n_cols and col_start multiples of 4, as GROUPED has them at this shape)
    BM: tl.constexpr = rows.shape[0]
    first = ((row_base + rows) * n_cols + col_start)[:, None] + 2 * tl.arange(0, BLOCK_N // 2)[None, :]
    counter = first >> 2
    upper = (first & 2) != 0
    lo = counter.to(tl.uint32)
    hi = (counter.to(tl.int64) >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
    return _kept(tl.reshape(tl.join(tl.where(upper, r2, r0), tl.where(upper, r3, r1)), [BM, BLOCK_N]), p)


@triton.jit
def keep_tl10(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    # g10's calls through tl.philox: the package's mask as keep_mask_2d drew it before dropout.philox
    return _kept(_words(seed, row_base, rows, col_start, n_cols, BLOCK_N, 10), p)


@triton.jit
def keep_none(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    BM: tl.constexpr = rows.shape[0]
    return tl.full([BM, BLOCK_N], 1, tl.int1) & (p < 1.0)


@triton.jit
def _two_masks(out_ptr, seed, row_base, n_cols, p, BM: tl.constexpr, BN: tl.constexpr, VARIANT: tl.constexpr):
    rows = tl.arange(0, BM)
    offs = rows[:, None] * BN + tl.arange(0, BN)[None, :]
    tl.store(out_ptr + offs, D.keep_tile(seed, row_base, rows, 8, n_cols, p, BN, True).to(tl.int8))
    if VARIANT == "element":
        other = keep_element(seed, row_base, rows, 8, n_cols, p, BN, True)
    elif VARIANT == "tl10":
        other = keep_tl10(seed, row_base, rows, 8, n_cols, p, BN, True)
    else:
        other = keep_pairs(seed, row_base, rows, 8, n_cols, p, BN, True)
    tl.store(out_ptr + BM * BN + offs, other.to(tl.int8))


variant = sys.argv[1]
if variant in ("element", "pairs", "tl10"):  # the package's mask drawn another way, checked tile for tile
    masks = torch.empty(2, 64, 64, dtype=torch.int8, device=runtime.DEVICE)
    _two_masks[(1,)](masks, 1234567, 5 * 1024, 1024, 0.3, BM=64, BN=64, VARIANT=variant)
    print(f"{variant}: the package's mask: {torch.equal(masks[0], masks[1])} (kept {masks[0].float().mean():.3f})")
A.keep_tile = {"p0": D.keep_tile, "g10": D.keep_tile, "g7": keep_g7, "g4": keep_g4, "h16": keep_h16,
               "q8": keep_q8, "none": keep_none, "element": keep_element, "pairs": keep_pairs,
               "tl10": keep_tl10}[variant]
p = 0.0 if variant == "p0" else 0.1

B, H, N, Dh = 16, 8, 1024, 64
q, k, v = (torch.randn(B, H, N, Dh, device=runtime.DEVICE, dtype=runtime.default_dtype()) for _ in range(3))
with torch.no_grad():
    o = tt.attention(q, k, v, causal=True, dropout_p=p, seed=1)

    times = [bench.measure_gpu_ms(lambda: tt.attention(q, k, v, causal=True, dropout_p=p, seed=1)) for _ in range(3)]
line = f"{variant:7} p {p}: fwd {1e3 * min(times):6.1f} us (max {1e3 * max(times):6.1f})"
line += f" | {A._attn_fwd.best_config}"
for launcher in runtime._launchers.values():  # the config the tuner chose, and its registers
    if launcher.jit.fn.__name__ == "_attn_fwd_kernel":
        for compiled, _, _ in launcher.cache.values():
            md = compiled.metadata
            line += (f" | warps {md.num_warps} stages {md.num_stages} regs {compiled.n_regs} "
                     f"spills {compiled.n_spills}")
print(line, flush=True)
