"""Probe: can a long row's loads overlap the previous row's arithmetic? (GPU)

    python3 benchmarks/experiments/rowpipe.py

The package's softmax forward at (8192, 50304) holds one 100 KB row per program, and one such program
fills an SM's registers: while it takes the max and the exponentials, no load is in flight, and the
kernel reaches ~84% of a copy. Here a persistent program loops over rows with `tl.range(num_stages=S)`:
with S > 1 Triton's pipeliner may issue the next row's loads (into shared memory) before this row's
arithmetic, the overlap one resident program cannot otherwise get. Printed per variant: kernel time,
GB/s, registers, spills and shared memory (a pipelined row shows as ~100 KB per stage).

Measured (H100 80GB HBM3, torch 2.11, Triton 3.6, bf16, two runs): the package 655-657 us, 83-84% of a
copy's 547 us. Persistent, one stage: 78-79% at 16 warps (68-70% at 8 and 32). Two stages (the next
row staged in 102 KB of shared memory): 63-71%; three (205 KB): 67-73%, with spills. The overlap does
not pay for the row's detour through shared memory.

Later (`row_prefetch.py`): the loop above counts rows in int64 (`tl.program_id(0).to(tl.int64)`). Counted in
int32, with each row's offset widened inside, the same pipelined loop spilled nothing and ran at 94% of a copy
(583 us at three stages, 16 warps), against 745 us with the int64 counter in the same process: the package's
one-block path now loops that way (`softmax.row_loop`).
"""
import triton_transformer as tt  # noqa: F401  (first: sets the interpreter up on a CPU)
import torch
import triton
import triton.language as tl
import triton.testing

from triton_transformer import runtime
from triton_transformer.softmax import _softmax_row, row_pieces, softmax_forward


@triton.jit
def _rows_kernel(x_ptr, y_ptr, x_row_stride, y_row_stride, n_rows, n_cols, BLOCK: tl.constexpr,
                 PIECE1: tl.constexpr, PIECE2: tl.constexpr, STAGES: tl.constexpr):
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0), num_stages=STAGES):
        # the package's one-block row (loads, max, exponentials, stores), here inside the pipelined loop
        _softmax_row(x_ptr, y_ptr, row, x_row_stride, y_row_stride, n_cols, 1, BLOCK, PIECE1, PIECE2,
                     True, False, 1)


def main():
    dev = runtime.DEVICE
    n_rows, n_cols = (8192, 50304) if dev.type == "cuda" else (6, 300)
    x = torch.randn(n_rows, n_cols, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    ref = torch.softmax(x.float(), -1)
    moved = 2 * x.numel() * x.element_size()
    bench = (lambda f: triton.testing.do_bench(f, warmup=50, rep=300)) if dev.type == "cuda" else \
        (lambda f: (f(), float("nan"))[1])
    copy = bench(lambda: x.clone())
    base = bench(lambda: softmax_forward(x))
    print(f"({n_rows}, {n_cols}) bf16: copy {copy * 1e3:.1f} us, package {base * 1e3:.1f} us "
          f"({moved / base / 1e6:.0f} GB/s, {copy / base:.0%} of a copy)", flush=True)
    block = triton.next_power_of_2(n_cols)
    first, second, third = row_pieces(n_cols, block)
    sms = runtime.num_sms(dev) if dev.type == "cuda" else 2
    for stages in (1, 2, 3):
        for warps in (8, 16, 32):
            for per_sm in (1, 2):
                y = torch.empty_like(x)
                try:
                    compiled = _rows_kernel[(min(n_rows, per_sm * sms),)](
                        x, y, x.stride(0), y.stride(0), n_rows, n_cols, BLOCK=first, PIECE1=second, PIECE2=third,
                        STAGES=stages, num_warps=warps)
                    err = (y.float() - ref).abs().max().item()
                    t = bench(lambda: _rows_kernel[(min(n_rows, per_sm * sms),)](
                        x, y, x.stride(0), y.stride(0), n_rows, n_cols, BLOCK=first, PIECE1=second, PIECE2=third,
                        STAGES=stages, num_warps=warps))
                    meta = getattr(compiled, "metadata", None)
                    shared = getattr(meta, "shared", None) if meta is not None else None
                    print(f"stages {stages} warps {warps:2d} {per_sm}/SM: {t * 1e3:7.1f} us "
                          f"{moved / t / 1e6:5.0f} GB/s {copy / t:4.0%} of a copy | regs "
                          f"{getattr(compiled, 'n_regs', '?')} spills {getattr(compiled, 'n_spills', '?')} "
                          f"shared {shared} | max err {err:.1e}", flush=True)
                except Exception as exc:  # out of shared memory or registers: say so and go on
                    print(f"stages {stages} warps {warps:2d} {per_sm}/SM: {type(exc).__name__}: {str(exc)[:100]}",
                          flush=True)


if __name__ == "__main__":
    main()
