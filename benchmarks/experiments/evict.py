"""Probe: L2 eviction hints on the memory-bound forwards, timed as the benchmarks time them (GPU).

    python3 benchmarks/experiments/evict.py           # copies of the kernels, every policy pair

    git worktree add /tmp/evict e8a97fe && cd /tmp/evict   # the A/B in the package, at the commit that had it
    python3 benchmarks/experiments/evict.py package

`bench.measure_ms` is `triton.testing.do_bench`, which zeroes a 256 MB buffer before every call to
flush the L2. The call then starts with the 50 MB L2 full of *dirty* lines of that buffer: each line
the kernel brings in evicts one, which must first be written back to HBM. A kernel that reads x once
and writes y once can steer which lines go: x is clean and never read again (evicting it costs
nothing), y is dirty (evicting it costs a write-back) and is what the next kernel reads. So: loads
marked evict_first, stores evict_last (Triton lowers both to an L2 cache-policy hint on sm_80+).

Each kernel below is the package's forward (or a copy) with the two policies as constexprs, for every
combination, beside the package's own call and `x.clone()`, in interleaved rounds, one process:
softmax (4096, 4096), layer norm (16384, 768), dropout (16M elements), bf16.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, min of 3 rounds, us): stores marked evict_last did
not help (the theory above is wrong about stores): slower for layer norm (4 rows x 4 warps 22.85 against 21.76
unmarked) and dropout (4096 x 8 warps 28.19 against 26.50), within noise for softmax (27.90 against 28.06 at 4
warps, 28.06 against 27.55 at 8). Loads marked evict_first helped, stores evict_first too: softmax one row a
program, 4 warps, 28.06 -> 26.24 (2558 GB/s; the package 27.26, a clone 27.58); layer norm 2 rows x 4 warps
22.85 -> 21.47 (the package 22.69, a clone 21.95); dropout 4096 x 8 warps 26.50 -> 25.95-26.02 (the package
27.71, a clone 27.62), while its 4-warp tiles got slower (28.99 -> 29.95).

Not adopted. The same hints in the package's kernels (one-block rows of softmax, layer norm and
cross-entropy, their backwards, dropout), timed by benchmarks/run.py on the next machine: softmax
(8192, 50304) 0.730 ms against 0.645-0.655 before (GPU time, the row in pieces, one program an SM),
cross-entropy (8192, 50304) no faster (0.775 ms GPU), softmax (4096, 16384) and dropout (64M) 1-3%
slower in GPU time (warm L2: evict_first gives up lines the next call would have found), and the
(4096, 4096) softmax at 28.3 us in wall time, no better than before on a host too slow to tell.

Settled in the package itself, one process (commit e8a97fe added `runtime.STREAM_LOADS` / `STREAM_STORES`,
passed as constexprs to softmax's one-block rows, layer norm's forward and dropout, and a `package` mode here that
times every case of those three benchmarks as benchmarks/run.py does, three interleaved rounds per case). Measured
(H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0; GPU time, min of 3, us; no hint / loads evict_first / loads
and stores evict_first / x.clone() of the same bytes):

    softmax 4096 x 1024        7.70    7.61    7.75   copy  7.36
    softmax 4096 x 4096       24.35   24.40   24.43   copy 24.20   (wall 27.17 27.62 27.39, copy 27.36)
    softmax 4096 x 16384      92.45   93.42   94.65   copy 90.27
    softmax 8192 x 50304     651.85  652.15  651.44   copy 544.18  (rows in pieces: no hint, the control)
    layer norm 16384 x 512    13.74   13.92   13.81   copy 13.35
    layer norm 16384 x 768    19.98   19.93   20.08   copy 19.16   (wall 23.68 22.64 22.98, copy 22.18)
    layer norm 8192 x 4096    47.61   48.10   48.52   copy 46.56
    dropout 4M                 7.99    7.64    8.08   copy  7.60
    dropout 16M               24.65   24.70   24.97   copy 24.43   (wall 27.36 26.91 27.23, copy 27.52)
    dropout 64M               91.03   91.59   93.13   copy 90.35
    fwd+bwd: softmax 4096^2 58.87 57.82 60.23; layer norm 16384 x 768 61.03 61.06 61.81; dropout 16M 49.30 49.49 50.20

No gain beyond the rounds' spread anywhere, small losses at the larger shapes: the package's forwards already run
within 1-4% of a copy's GPU time, and the probe's gains were over its own unhinted copies. Reverted. (The same
run's host was slow: forward+backward wall times of 170-590 us for 15-160 us of GPU time.)

That also answers the earlier lead for layer norm alone (its 13 forwards in the seed model's profiled step
took 0.388 ms with the hints against 0.422 on another machine without): in one process its forward is the
same with or without them, so that gap was the machines.
"""
import itertools
import sys

import torch
import triton
import triton.language as tl

import triton_transformer as tt
from triton_transformer import runtime
from triton_transformer.bench import measure_ms  # how benchmarks/run.py times a call
from triton_transformer.dropout import keep_mask_2d

LOG2E = tl.constexpr(1.4426950408889634)
POLICIES = [("", ""), ("evict_first", ""), ("", "evict_last"), ("evict_first", "evict_last"),
            ("evict_first", "evict_first")]


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr, LP: tl.constexpr, SP: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    m = offs < n - start
    x = tl.load(x_ptr + start + offs, mask=m, eviction_policy=LP)
    tl.store(y_ptr + start + offs, x, mask=m, eviction_policy=SP)


@triton.jit
def _softmax(x_ptr, y_ptr, n_cols, BLOCK: tl.constexpr, LP: tl.constexpr, SP: tl.constexpr):
    # the package's one-block row (softmax._softmax_row with SINGLE_BLOCK, one piece)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=-float("inf"), eviction_policy=LP)
    m = tl.max(x, axis=0).to(tl.float32)
    e = tl.exp2((x.to(tl.float32) - m) * LOG2E)
    d = tl.sum(e, axis=0)
    e = e.to(x.dtype)
    tl.store(y_ptr + row * n_cols + cols, (e.to(tl.float32) * (1.0 / d)).to(y_ptr.dtype.element_ty),
             mask=cols < n_cols, eviction_policy=SP)


@triton.jit
def _layer_norm(x_ptr, y_ptr, w_ptr, b_ptr, n_rows, n_cols, eps, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                LP: tl.constexpr, SP: tl.constexpr):
    # the package's single-block forward with weight and bias, no statistics stored
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0,
                eviction_policy=LP).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    y = xc * rstd[:, None]
    y = y * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = y + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask,
             eviction_policy=SP)


@triton.jit(do_not_specialize=["seed"])
def _dropout(x_ptr, y_ptr, n_elements, p, scale, seed, BLOCK: tl.constexpr, LP: tl.constexpr, SP: tl.constexpr):
    # the package's _dropout_kernel
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)[None, :]
    in_bounds = offs < n_elements - start
    x = tl.load(x_ptr + start + offs, mask=in_bounds, other=0.0, eviction_policy=LP)
    keep = keep_mask_2d(seed, tl.full([1], 0, tl.int64) + start, 0, p, BLOCK)
    y = x.to(tl.float32) * tl.where(keep, scale, 0.0)
    tl.store(y_ptr + start + offs, y.to(y_ptr.dtype.element_ty), mask=in_bounds, eviction_policy=SP)



def main(rounds: int = 3):
    dev = runtime.DEVICE
    bf16 = torch.bfloat16
    cases = {}  # name -> (bytes moved, {variant: fn})

    x = torch.randn(4096, 4096, device=dev, dtype=bf16)
    y = torch.empty_like(x)
    v = {"package": lambda: tt.softmax(x), "clone": lambda: x.clone()}
    for lp, sp in POLICIES:
        v[f"rows/4w {lp or '-'}/{sp or '-'}"] = lambda lp=lp, sp=sp: _softmax[(4096,)](
            x, y, 4096, BLOCK=4096, LP=lp, SP=sp, num_warps=4)
        v[f"rows/8w {lp or '-'}/{sp or '-'}"] = lambda lp=lp, sp=sp: _softmax[(4096,)](
            x, y, 4096, BLOCK=4096, LP=lp, SP=sp, num_warps=8)
    cases["softmax 4096x4096"] = (4 * x.numel(), v)

    xl = torch.randn(16384, 768, device=dev, dtype=bf16)
    yl = torch.empty_like(xl)
    w = torch.randn(768, device=dev, dtype=bf16)
    b = torch.randn(768, device=dev, dtype=bf16)
    v = {"package": lambda: tt.layer_norm(xl, (768,), w, b), "clone": lambda: xl.clone()}
    for (rows, warps), (lp, sp) in itertools.product(((2, 4), (4, 4), (4, 8), (8, 8)), POLICIES):
        v[f"{rows}r/{warps}w {lp or '-'}/{sp or '-'}"] = lambda rows=rows, warps=warps, lp=lp, sp=sp: _layer_norm[
            (triton.cdiv(16384, rows),)](xl, yl, w, b, 16384, 768, 1e-5, ROWS=rows, BLOCK_N=1024, LP=lp, SP=sp,
                                         num_warps=warps)
    cases["layer_norm 16384x768"] = (4 * xl.numel(), v)

    xd = torch.randn(16777216, device=dev, dtype=bf16)
    yd = torch.empty_like(xd)
    n = xd.numel()
    v = {"package": lambda: tt.dropout(xd, 0.1, seed=1), "clone": lambda: xd.clone()}
    for (block, warps), (lp, sp) in itertools.product(((4096, 4), (4096, 8), (8192, 8), (8192, 16)), POLICIES):
        v[f"{block}/{warps}w {lp or '-'}/{sp or '-'}"] = lambda block=block, warps=warps, lp=lp, sp=sp: _dropout[
            (triton.cdiv(n, block),)](xd, yd, n, 0.1, 1 / 0.9, 1, BLOCK=block, LP=lp, SP=sp, num_warps=warps)
    for lp, sp in POLICIES:
        v[f"copy 4096/4w {lp or '-'}/{sp or '-'}"] = lambda lp=lp, sp=sp: _copy[(triton.cdiv(n, 4096),)](
            xd, yd, n, BLOCK=4096, LP=lp, SP=sp, num_warps=4)
    cases["dropout 16M"] = (4 * n, v)

    # the variants compute what the package computes (dropout: same mask, same seed)
    _softmax[(4096,)](x, y, 4096, BLOCK=4096, LP="evict_first", SP="evict_last", num_warps=4)
    torch.testing.assert_close(y, tt.softmax(x))
    _layer_norm[(8192,)](xl, yl, w, b, 16384, 768, 1e-5, ROWS=2, BLOCK_N=1024, LP="evict_first", SP="evict_last",
                         num_warps=4)
    torch.testing.assert_close(yl, tt.layer_norm(xl, (768,), w, b))
    _dropout[(triton.cdiv(n, 4096),)](xd, yd, n, 0.1, 1 / 0.9, 1, BLOCK=4096, LP="evict_first", SP="evict_last",
                                      num_warps=4)
    assert torch.equal(yd, tt.dropout(xd, 0.1, seed=1))

    times = {c: {k: [] for k in v} for c, (_, v) in cases.items()}
    for _ in range(rounds):
        for c, (_, v) in cases.items():
            for k, fn in v.items():
                times[c][k].append(measure_ms(fn))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"do_bench median (L2 flushed), us min/max over {rounds} rounds, GB/s at the min")
    for c, (moved, v) in cases.items():
        print(c)
        for k in sorted(v, key=lambda k: min(times[c][k])):
            t = times[c][k]
            print(f"  {k:36s} {1e3 * min(t):7.2f} {1e3 * max(t):7.2f}  {moved / min(t) / 1e6:6.0f} GB/s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
