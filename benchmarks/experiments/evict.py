"""Probe: L2 eviction hints on the memory-bound forwards, timed as the benchmarks time them (GPU).

    python3 benchmarks/experiments/evict.py           # copies of the kernels, every policy pair
    python3 benchmarks/experiments/evict.py package   # the package's calls under each runtime.STREAM_* setting

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

A lead for layer norm, where nothing got slower: the same run's profile of the seed model's training step
(benchmarks/profile_step.py, one CUDA graph replayed) gave its 13 layer-norm forwards 0.388 ms a step and its
backwards 0.647, against 0.422 and 0.665 in chapter 7's profile (another machine, without the hints), and the
step 6.52 ms of GPU time (6.54 wall) against 6.65 in session 21's run. Not the same process, so not settled:
time profile_step with and without the hints in one process before adopting them for layer norm alone.
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


def package(rounds: int = 3):
    """The package's own calls, as benchmarks/run.py times them, with `runtime.STREAM_LOADS` / `STREAM_STORES`
    set to each policy in turn: every case of the softmax, layer norm and dropout benchmarks, wall time
    (`measure_ms`) and GPU time (`measure_gpu_ms`), in interleaved rounds, one process."""
    from triton_transformer.bench import dropout as b_dropout, layer_norm as b_layer_norm, softmax as b_softmax
    from triton_transformer.bench import measure_gpu_ms

    variants = [("", ""), ("evict_first", ""), ("evict_first", "evict_first")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"us, min (max) over {rounds} rounds: wall (do_bench), GPU (CUDA graph)")
    wall, gpu = {}, {}
    # a case's tensors live only until the generator moves on (the cases delete them): rounds within a case
    for c in (c for mod in (b_softmax, b_layer_norm, b_dropout) for c in mod.cases()):
        for _ in range(rounds):
            for lp, sp in variants:
                runtime.STREAM_LOADS, runtime.STREAM_STORES = lp, sp
                k = (c.kernel, c.pass_, "x".join(map(str, c.shape)), f"{lp or '-'}/{sp or '-'}")
                wall.setdefault(k, []).append(measure_ms(c.providers["triton"], c.grad_to_none))
                gpu.setdefault(k, []).append(measure_gpu_ms(c.providers["triton"], c.grad_to_none))
            if "copy" in c.providers:
                k = (c.kernel, c.pass_, "x".join(map(str, c.shape)), "copy")
                wall.setdefault(k, []).append(measure_ms(c.providers["copy"]))
                gpu.setdefault(k, []).append(measure_gpu_ms(c.providers["copy"]))
        for k in [k for k in wall if k[:3] == (c.kernel, c.pass_, "x".join(map(str, c.shape)))]:
            print(f"  {' '.join(k[:3]):28s} {k[3]:24s} wall {1e3 * min(wall[k]):8.2f} ({1e3 * max(wall[k]):8.2f})"
                  f"  gpu {1e3 * min(gpu[k]):8.2f} ({1e3 * max(gpu[k]):8.2f})", flush=True)
    runtime.STREAM_LOADS = runtime.STREAM_STORES = ""


if __name__ == "__main__":
    if sys.argv[1:2] == ["package"]:
        package(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
