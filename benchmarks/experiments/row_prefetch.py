"""Probe: a long row held on chip, with the next row's loads in flight while this one is reduced and written.

    python3 benchmarks/experiments/row_prefetch.py

The package's one-block softmax gives each row its own program. At (8192, 50304) bf16 a row is 100 KB held
in registers, one program per SM: while it reduces and writes, no load is in flight on that SM, and the
kernel runs at ~84% of a copy. Here a persistent program loops over rows with `tl.range(num_stages=S)`:
with S = 2 Triton's pipeliner should copy row r + P into shared memory (cp.async) while row r is worked on,
if 2 x 100 KB of stages fit. Softmax forward, bf16, against the package and a copy (do_bench medians).
`ce` times cross-entropy's forward+backward: the package, then a program per row (stages 0) and the
loop with stages and warps forced, by do_bench and in GPU time (a CUDA graph, `bench.measure_gpu_ms`).

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16). Softmax forward: (8192, 50304) package
(a program per row) 655.6 us, the loop at 3 stages 582.8-584.4 (8 or 16 warps; 94% of a copy's 549), at 2
stages 584.9-588.3 on 8 warps but 855 with spills on 16, at 1 stage 710; (8192, 32000) 396.6 against
370.8-375.3; (8192, 20000) 248.9 against 240.8-242.3. The loop's row counter in int64 instead of int32:
745.2 against 582.8 us at (8192, 50304), 8 registers spilled (the difference from rowpipe.py). In the
package: 583.7-585.1 us at (8192, 50304). Cross-entropy forward+backward, GPU time: (8192, 32000) 402-407 us
at 3 stages (16 or 32 warps) against 438-475 with a program per row; (8192, 50304) 775 at best (2 stages,
8 warps) and up to 1186 (3 stages, 16 warps), against 748 with a program per row (the row kernel then
computed each exponential twice, once for the sum and once for the gradient). A variant that picked the target's logit out of the row held on chip instead of loading it
was slower everywhere (954 against 748 us with a program per row at (8192, 50304)) and was dropped.
Then a `cesoft` mode timed the forward alone (loss and gradient) computed as softmax's row is, each
exponential once and kept in bf16 (`exp_and_sum`), in a kernel of its own: (8192, 50304) 603 us with the
loop at 3 stages on 8 warps (628 on 16, 857 on 32, 636 at 2 stages), 762 with a program per row, against
734 for the package's forward as it was; (8192, 32000) 371 against 406. The package's row kernel became
that computation (so `ce` above now sweeps it), and the mode was removed with its copy of the kernel.
(The softmax numbers were measured with the row's code written out in the kernel, the same code as
`_softmax_row`'s one-block path, which the kernel now calls; the package's own loop is that kernel.)

Later, what cross-entropy's looping row does besides softmax's, timed by switches put into the package's row
kernel for one run (a `ce_store.py` probe, removed with them; H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0,
bf16, session of 2026-11-27). do_bench of the forward with gradient (pre-pass,
kernel, loss sum, check), three rounds each, (8192, 50304) / (8192, 32000), copy 549 / 351 us:
  the package                                                          608-612 / 400-405
  no target loads at all (constants: a bound, wrong losses)            600-602 / 391-393
  the target's logit gathered by the pre-pass, read back from the
  loss buffer (no load waiting on another inside the loop)             616-617 / 395-397
  exponent as one FMA, x * log2(e) - m * log2(e)                       602-604 / 401-402
  gradient stored as e * (scale / d), the target's column rewritten
  after a barrier (no per-lane compare)                                709-710 / 483-484
  the same with the target's column masked out of the vector store     2455-2470 / 1560-1576
The target's loads cost at most 8 us; the barrier in the loop costs far more than the compare it saves;
a mask that differs lane by lane breaks the vectorised store. The FMA gained 5 us at 50 304 only, and is
wrong where logits are large: at |m| ~ 1e9 (a row masked by adding a large negative number) the product
m * log2(e) rounds by up to 64 in fp32, and every exponent with it, where x - m is exact. Nothing adopted.
"""
import importlib
import sys

import torch
import triton
import triton.language as tl
import triton.testing

import triton_transformer as tt  # noqa: F401  (first: GPU or interpreter)
from triton_transformer import runtime
from triton_transformer.bench import measure_gpu_ms
from triton_transformer.softmax import _softmax_row, row_pieces, softmax_forward


@triton.jit
def _prefetch_softmax(x_ptr, y_ptr, stride, n_rows, n_cols, BLOCK: tl.constexpr, PIECE1: tl.constexpr,
                      PIECE2: tl.constexpr, STAGES: tl.constexpr, WIDE: tl.constexpr):
    """The package's one-block row (`_softmax_row`) in a loop over rows, counted in int32 or (WIDE) int64."""
    start = tl.program_id(0)
    if WIDE:  # the loop counts rows in int64, as the earlier rowpipe.py did
        start = start.to(tl.int64)
    for row in tl.range(start, n_rows, tl.num_programs(0), num_stages=STAGES):
        _softmax_row(x_ptr, y_ptr, tl.cast(row, tl.int64), stride, stride, n_cols, 1, BLOCK, PIECE1, PIECE2,
                     True, False, 1)


def bench(fn, grads=None):
    return 1e3 * triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median")


def main():
    dev = runtime.DEVICE
    sms = runtime.num_sms(dev)
    for rows, cols in ((8192, 50304), (8192, 32000), (8192, 20000)):
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        ref = softmax_forward(x)
        block = triton.next_power_of_2(cols)
        p = row_pieces(cols, block)
        copy = bench(lambda: x.clone())
        print(f"({rows}, {cols}) pieces {p}: copy {copy:.1f} us, package {bench(lambda: softmax_forward(x)):.1f}")
        for stages, warps, per_sm, wide in ((1, 16, 1, 0), (2, 8, 1, 0), (3, 8, 1, 0), (3, 16, 1, 0), (3, 16, 1, 1),
                                            (2, 8, 1, 1)):
            if True:
                if True:
                    y = torch.empty_like(x)
                    grid = (min(rows, per_sm * sms),)
                    try:
                        k = _prefetch_softmax[grid](x, y, x.stride(0), rows, cols, p[0], p[1], p[2], stages,
                                                    wide, num_warps=warps)
                        torch.cuda.synchronize()
                    except Exception as e:  # out of shared memory or registers
                        print(f"  stages {stages} warps {warps:2d} per SM {per_sm} int64 {wide}: {type(e).__name__}")
                        continue
                    err = (y.float() - ref.float()).abs().max().item()
                    t = bench(lambda: _prefetch_softmax[grid](x, y, x.stride(0), rows, cols, p[0], p[1], p[2],
                                                              stages, wide, num_warps=warps))
                    print(f"  stages {stages} warps {warps:2d} per SM {per_sm} int64 counter {wide}: {t:7.1f} us ({copy / t:4.0%} of copy)"
                          f"  smem {k.metadata.shared // 1024} KB, spills {k.n_spills}, max err {err:.1e}")


def ce():
    cem = importlib.import_module("triton_transformer.cross_entropy")
    dev = runtime.DEVICE
    sms = runtime.num_sms(dev)
    launch_params, row_loop = cem._launch_params, cem.row_loop
    for rows, cols in ((8192, 50304), (8192, 32000)):
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, cols, (rows,), device=dev)
        copy = bench(lambda: x.detach().clone())
        fn = lambda: tt.cross_entropy(x, t).backward()  # noqa: E731
        ref = torch.nn.functional.cross_entropy(x.float(), t)
        ref_grad, = torch.autograd.grad(ref, x)
        ref = ref.detach()  # no autograd graph left holding x (see below)
        print(f"({rows}, {cols}): copy {copy:.1f} us, package {bench(fn, [x]):.1f}")
        for stages in (0, 2, 3):
            for warps in (8, 16, 32):
                cem._launch_params = lambda n, e=2, s=None, w=warps: launch_params(n, e, s)[:2] + (w,)
                cem.row_loop = lambda n, b, lanes, e, d, st=stages: ((min(n, sms),), st) if st else ((n,), 1)
                x.grad = None
                loss = tt.cross_entropy(x, t)
                loss.backward()
                err = (x.grad.float() - ref_grad).abs().max().item()
                loss_err = abs(loss.item() - ref.item())
                del loss  # a live graph's AccumulateGrad node would break the CUDA graph recording below
                us = bench(fn, [x])
                gpu = 1e3 * measure_gpu_ms(fn, [x])
                print(f"  stages {stages} warps {warps:2d}: {us:7.1f} us ({copy / us:4.0%} of copy), graph {gpu:6.1f}, "
                      f"loss err {loss_err:.1e}, grad err {err:.1e}")
        cem._launch_params, cem.row_loop = launch_params, row_loop
        del x


if __name__ == "__main__":
    if "ce" in sys.argv:
        ce()

    else:
        main()
