"""Where attention's dropout time goes: the same kernels with four ways of making the keep mask (GPU).

    python3 benchmarks/experiments/attn_mask_cost.py            # every variant, each in its own process

Causal attention at the seed model's shape (16 x 8 heads x 1024 tokens x 64, bf16), forward+backward GPU time
(one call replayed as a CUDA graph, bench.measure_gpu_ms), at p = 0.1 (and once at p = 0), with
`attention.keep_tile` swapped for:

  grouped   the package's: one Philox call per four columns, its words joined into the tile (keep_mask_2d)
  element   one Philox call per element (keep_mask): four times the integer work, no joining
  pairs     one call per two columns, the pair's two words selected by its position (the same mask):
            twice grouped's integer work, words joined in pairs, as a tile's registers hold neighbours
  none      no random numbers, every element kept: what dropout costs beyond making the mask

Each variant runs in a fresh process, so that Triton compiles the kernels with its keep_tile, and with a Triton
cache of its own (TRITON_CACHE_DIR), so that none can load another's compiled kernels.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0). A first run, with one Triton cache shared by the four
processes: grouped fwd 62.3 us at p = 0 and 173.2 at p = 0.1, fwd+bwd 253.1 and 574.4; at p = 0.1 pairs 175.1 / 579.9,
none 175.5 / 577.7, element 175.7 / 572.6 (pairs gives the package's mask, checked tile for tile). So making the mask,
even four times over, would cost nothing, and dropout's 2.8x on the forward would come from the rest of its path;
but that run did not rule out a variant loading another's kernels from the shared cache, which the second run's
separate caches do. The second run (separate caches) repeated grouped (61.9 / 253.3 at p = 0, 173.3 / 570.9 at
p = 0.1) and ran out of the call's time compiling the other variants. The kernels it compiled (the tuner's choices,
all 4 warps and 3 stages, none spilling): forward 128 registers without dropout and 178 with it; dq 157 and
156-163; dk/dv 160 and 207-254. Fewer programs fit an SM with dropout; whether that, and not the mask, is the
cost was not settled here. Neither run measured a swapped mask: this probe imported `attention` from the
package, which is the function of that name, not the module, so `A.keep_tile = ...` never reached the kernels and
every variant ran the package's mask (hence four equal times). Fixed since (the module by importlib), not re-run.
attn_rounds.py, written after, settles it for the forward: without the mask the dropout forward costs nothing
extra (62.8 against 62.3 us) and Philox's rounds are most of its cost (7 us a round of the 100 it adds).
"""
import subprocess
import sys

VARIANTS = ["grouped", "pairs", "none", "element"]

if len(sys.argv) == 1:
    import os
    import tempfile

    for v in VARIANTS:  # a fresh Triton cache each: no variant can load another's compiled kernels
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"tc_{v}_"))
        subprocess.run([sys.executable, __file__, v], check=False, env=env)
    sys.exit(0)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import triton_transformer as tt  # noqa: E402
from triton_transformer import bench  # noqa: E402
from triton_transformer import dropout as _  # noqa: E402,F401
import importlib  # noqa: E402

D = importlib.import_module("triton_transformer.dropout")
# the module: `from triton_transformer import attention` is the package's function of that name, on which
# setting keep_tile changes nothing (the first two runs below did exactly that)
A = importlib.import_module("triton_transformer.attention")


@triton.jit
def keep_element(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    row_offsets = (row_base + rows) * n_cols
    return D.keep_mask(seed, row_offsets[:, None] + col_start + tl.arange(0, BLOCK_N)[None, :], p)


@triton.jit
def keep_pairs(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    # element e takes word e % 4 of Philox at counter e // 4; a pair (e, e + 1), e even, shares its counter
    # and takes words 0, 1 or 2, 3 (needs n_cols and col_start even: GROUPED guarantees multiples of 4)
    BM: tl.constexpr = rows.shape[0]
    first = ((row_base + rows) * n_cols + col_start)[:, None] + 2 * tl.arange(0, BLOCK_N // 2)[None, :]
    counter = first >> 2
    upper = (first & 2) != 0
    lo = counter.to(tl.uint32)
    hi = (counter.to(tl.int64) >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(seed, lo, hi, zero, zero)
    r = tl.reshape(tl.join(tl.where(upper, r2, r0), tl.where(upper, r3, r1)), [BM, BLOCK_N])
    return (r >= D._threshold(p)) & (p < 1.0)


@triton.jit
def keep_none(seed, row_base, rows, col_start, n_cols, p, BLOCK_N: tl.constexpr, GROUPED: tl.constexpr):
    BM: tl.constexpr = rows.shape[0]
    return tl.full([BM, BLOCK_N], 1, tl.int1) & (p < 1.0)


variant = sys.argv[1]
A.keep_tile = {"grouped": D.keep_tile, "element": keep_element, "pairs": keep_pairs, "none": keep_none}[variant]

B, H, N, Dh = 16, 8, 1024, 64
q, k, v = (torch.randn(B, H, N, Dh, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn(B, H, N, Dh, device="cuda", dtype=torch.bfloat16)


@triton.jit
def _both(out_ptr, seed, row_base, n_cols, p, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.arange(0, BM)
    offs = rows[:, None] * BN + tl.arange(0, BN)[None, :]
    tl.store(out_ptr + offs, D.keep_tile(seed, row_base, rows, 8, n_cols, p, BN, True).to(tl.int8))
    tl.store(out_ptr + BM * BN + offs, keep_pairs(seed, row_base, rows, 8, n_cols, p, BN, True).to(tl.int8))


if variant == "pairs":  # the same mask as the package's, tile for tile
    masks = torch.empty(2, 64, 64, dtype=torch.int8, device="cuda")
    _both[(1,)](masks, 1234567, 5 * 1024, 1024, 0.3, BM=64, BN=64)
    print(f"pairs: the package's mask: {torch.equal(masks[0], masks[1])} (kept {masks[0].float().mean():.3f})")
line = []
for p in (0.0, 0.1) if variant == "grouped" else (0.1,):  # p = 0 compiles no mask: one baseline
    fwd = bench.measure_gpu_ms(lambda p=p: tt.attention(q, k, v, causal=True, dropout_p=p))
    fb = bench.measure_gpu_ms(lambda p=p: tt.attention(q, k, v, causal=True, dropout_p=p).backward(do), [q, k, v])
    line.append(f"p {p}: fwd {fwd * 1e3:6.1f} us, fwd+bwd {fb * 1e3:6.1f} us")
print(f"{variant:8} " + " | ".join(line), flush=True)
from triton_transformer import runtime  # noqa: E402

for launcher in runtime._launchers.values():  # what each compiled kernel holds: the config the tuner chose
    name = launcher.jit.fn.__name__
    if name.startswith("_attn"):
        for key, (compiled, _, _) in launcher.cache.items():
            md = compiled.metadata
            print(f"   {name:22} dropout={dict(key[2]).get('DROPOUT')!s:5} warps {md.num_warps} stages {md.num_stages} "
                  f"regs {compiled.n_regs} spills {compiled.n_spills} shared {md.shared}", flush=True)
