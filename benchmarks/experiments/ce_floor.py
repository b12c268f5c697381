"""Probe: how fast can cross-entropy's row loop be at GPT-2's width, before any arithmetic? (GPU)

    python3 benchmarks/experiments/ce_floor.py [perrow | spills | once]

Cross-entropy's forward at (8192, 50304) bf16 (loss and gradient) takes ~595 us of kernel time against a
copy's 548; twice torch.compile's speed (issue 7) needs ~585 us for the whole call. Two changes to its
arithmetic were measured first, side by side with the package (do_bench of forward+backward, H100): the gradient
written as one product a value, e * (scale / d), in fp32 or in bf16, with the target's lane patched afterwards
behind a barrier (698-714 us against 600: the barrier in the loop seems to cost more than the instructions
saved), and the exponentials stored unscaled, no gradient arithmetic at all (607 against 600). So the
arithmetic is not what sets the kernel's pace at this width. (At widths the benchmark does not measure the same
runs read the other way, within a noisy host's spread: (8192, 16384), a program per row, 288-295 us patched
against 353 as packaged, maxima up to 689; (4096, 50304) 369-392 against 420. Not re-measured in GPU time.) Here the same loop as the package's (one program per SM, the row held whole in
three pieces, the next rows prefetched into shared memory by `tl.range(num_stages=)`) only moves the row:
WORK 0 stores it back as it came, 2 as softmax's forward does (max, exponentials, sum, scale), with fewer
programs than SMs so that the last round of rows is fuller. `perrow` runs the package's kernel with a program
per row and capped registers instead: at 8 warps and 128 registers a thread two programs fit an SM, so one
could load while the other computes. do_bench medians, L2 flushed, three rounds interleaved: min (max).

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16; us):

    (8192, 50304)                  132 programs   131       128       (two runs: 570.5-571.4 at 132)
    loop, WORK 0 (row moved only)  571.4          576.0     574.2     8 warps, 3 stages (a first version
    loop, WORK 2 (softmax)         583.5          588.1     587.5      of this script: 2 stages 573.3,
                                                                       16 warps 571.4)
    package forward+backward       600.2-600.6    670.9     602.3     (the host adds noise: maxima 650-880)
    a program per row, WORK 0: 552.0-552.4; torch's copy: 547.7-548.4

    (8192, 32000): loop WORK 0 364.6-364.7 (131: 363.7, 128: 372.3), WORK 2 372.4-372.5, a program per row
    WORK 0 353.6, copy 350.0-350.1

    perrow, forward+backward at (8192, 50304): 8 warps capped at 128 registers 1938 us (342 spilled), 120:
    2066 (356), 16 warps capped at 64: 1798 (104); uncapped, 16 warps 816 (128 registers), 8 warps 856
    (255); the package 599.3. At (8192, 32000): 819, 765, 560, 498, 563; the package 392.5.

`spills` prints each variant's registers and spills beside its time, with stores of the two pieces that lie
inside the row made without a column mask (`FULL_PIECES`); `once` runs each kernel once for a profiler:

    cd benchmarks/experiments && ncu --target-processes all -k regex:"_rows_kernel|_cross_entropy_fwd" \
        --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats python3 ce_floor.py once
 Nsight
Compute (`/usr/local/cuda/bin/ncu` on the lent machine, counters allowed; these kernels ran at 1.59 GHz under it)
read the bare loop at 2.88 TB/s of DRAM (86%), a program per row at 2.99 (89%), the softmax loop at 2.83 and the
package's cross-entropy kernel at 2.53 (75%, 644 us at that clock; 255 registers, 8 warps an SM, an
instruction issued every 4.2 cycles per warp). Its 393 216 local-memory (spill) requests come from 4 spilled
registers (Triton's count), 48 requests a row:

    (8192, 50304), us (registers, spilled)   column masks kept          full pieces unmasked
    loop WORK 0, 8 warps, 3 stages           570.1 (64, 0)              570.4 (62, 0)
    loop WORK 0, 16 warps                    571.8 (40, 0)              571.5 (40, 0)
    loop WORK 2, 8 warps, 3 stages           582.8 (255, 4)             581.2 (255, 2)
    loop WORK 2, 16 warps                    583.8 (128, 2)             584.6 (128, 2)
    loop WORK 2, 8 warps, 2 stages           -                          608.6 (255, 2)

So the spills are not the cost either: at 16 warps (128 registers a thread) the softmax loop takes as long.

The loop alone, moving rows and computing nothing, takes 571 us, 23 us more than a copy and 19 more than a
program per row doing the same; softmax's arithmetic adds 12 and cross-entropy's (target, loss, gradient)
about 10 more. A fuller last round does not help (the tail is not the cost), and two resident programs per
SM spill hundreds of registers (not the 2-4 of the loop). The ~585 us that twice torch.compile asks for is
within 14 us of what this loop costs with no arithmetic at all. Not adopted: nothing here beat the package.
"""
import sys

import triton_transformer as tt  # noqa: F401  (first: sets the interpreter up on a CPU)
import torch
import triton
import triton.language as tl
from triton_transformer import runtime
softmax_mod = sys.modules["triton_transformer.softmax"]
from triton_transformer.bench import rounds
from triton_transformer.softmax import load_pieces, pieces_exp_and_sum, pieces_max, row_pieces

ce = sys.modules["triton_transformer.cross_entropy"]
dev = runtime.DEVICE


@triton.jit
def _store_piece(y_row, start, n, x, B: tl.constexpr):
    cols = start + tl.arange(0, B)
    tl.store(y_row + cols, x, mask=cols < n)


@triton.jit
def _rows_kernel(x_ptr, y_ptr, n_rows, n_cols, stride, BLOCK: tl.constexpr, PIECE1: tl.constexpr,
                 PIECE2: tl.constexpr, STAGES: tl.constexpr, WORK: tl.constexpr,
                 FULL_PIECES: tl.constexpr = False):
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0), num_stages=STAGES):
        offset = tl.cast(row, tl.int64) * stride
        x, x1, x2 = load_pieces(x_ptr + offset, n_cols, 1, BLOCK, PIECE1, PIECE2, True)
        if WORK == 1:
            m = pieces_max(x, x1, x2, PIECE1, PIECE2).to(x.dtype)
            x = x - m
            x1 = x1 - m
            x2 = x2 - m
        elif WORK == 2:
            m = pieces_max(x, x1, x2, PIECE1, PIECE2)
            x, x1, x2, d = pieces_exp_and_sum(x, x1, x2, m, PIECE1, PIECE2)
            inv = (1.0 / d).to(x.dtype)
            x = x * inv
            x1 = x1 * inv
            x2 = x2 * inv
        if FULL_PIECES:  # the first two pieces lie inside the row (`row_pieces`): stored without a column mask
            tl.store(y_ptr + offset + tl.arange(0, BLOCK), x)
            if PIECE1 > 0:
                tl.store(y_ptr + offset + BLOCK + tl.arange(0, PIECE1), x1)
        else:
            _store_piece(y_ptr + offset, 0, n_cols, x, BLOCK)
            if PIECE1 > 0:
                _store_piece(y_ptr + offset, BLOCK, n_cols, x1, PIECE1)
        if PIECE2 > 0:
            _store_piece(y_ptr + offset, BLOCK + PIECE1, n_cols, x2, PIECE2)


_registers = {}


def rows(x, y, work, stages, warps, programs, full=False):
    n_rows, n_cols = x.shape
    first, second, third = row_pieces(n_cols, triton.next_power_of_2(n_cols))
    assert not full or first + second <= n_cols
    c = _rows_kernel[(programs,)](x, y, n_rows, n_cols, x.stride(0), BLOCK=first, PIECE1=second, PIECE2=third,
                                  STAGES=stages, WORK=work, FULL_PIECES=full, num_warps=warps)
    if c is not None:  # (the interpreter returns no compiled kernel)
        _registers[(work, stages, warps, full)] = (c.n_regs, c.n_spills)


def package_step(xg, t, programs):
    """The package's forward+backward with its row loop run by `programs` programs instead of one per SM."""
    real = softmax_mod.num_sms
    softmax_mod.num_sms = lambda device: programs
    try:
        xg.grad = None
        ce.cross_entropy(xg, t).backward()
    finally:
        softmax_mod.num_sms = real


_compiled = {}


def per_row_step(xg, t, warps, maxnreg):
    """The package's forward+backward with a program per row (no loop), `warps` warps and at most `maxnreg`
    registers a thread: at 8 warps and 128 registers two programs fit an SM's 64K registers, so one can load
    while the other computes, which a program per row at 16 warps (one resident) cannot."""
    real = ce.launch_rows

    def launch_rows(kernel, n_rows, block, lanes, element_size, device, args, meta, loop_warps=None):
        options = {**meta, "num_warps": warps}
        if maxnreg:
            options["maxnreg"] = maxnreg
        _compiled[(warps, maxnreg)] = kernel[(n_rows,)](*args, ROW_STAGES=1, **options)

    ce.launch_rows = launch_rows
    try:
        xg.grad = None
        ce.cross_entropy(xg, t).backward()
    finally:
        ce.launch_rows = real


def per_row(n, v):
    x = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3
    t = torch.randint(0, v, (n,), device=dev)
    xg = x.clone().requires_grad_()
    xr = x.float().requires_grad_()
    torch.nn.functional.cross_entropy(xr, t).backward()
    variants = [(8, 128), (8, 120), (16, 64), (16, None), (8, None)]
    cases = {"package": lambda: package_step(xg, t, runtime.num_sms(dev))}
    for warps, maxnreg in variants:
        per_row_step(xg, t, warps, maxnreg)
        c = _compiled[(warps, maxnreg)]
        err = ((xg.grad.float() - xr.grad).abs().max() / xr.grad.abs().max()).item()
        label = f"a program per row, {warps} warps, maxnreg {maxnreg} ({c.n_regs} registers, {c.n_spills} spilled, err {err:.1e})"
        cases[label] = lambda w=warps, r=maxnreg: per_row_step(xg, t, w, r)
    for name, ts in rounds(cases).items():
        print(f"({n}, {v}) ce fwd+bwd {name}: {min(ts):6.1f} us ({max(ts):6.1f})", flush=True)


def once():
    """Each bare kernel once, at (8192, 50304), for a profiler (ncu -k regex:_rows_kernel): the loop, then a program
    per row, then the package's kernel."""
    n, v = 8192, 50304
    x = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3
    y = torch.empty_like(x)
    rows(x, y, 0, 3, 8, runtime.num_sms(dev))
    rows(x, y, 0, 1, 16, n)
    rows(x, y, 2, 3, 8, runtime.num_sms(dev))
    xg = x.clone().requires_grad_()
    package_step(xg, torch.randint(0, v, (n,), device=dev), runtime.num_sms(dev))
    torch.cuda.synchronize()


def spills():
    """Registers and spills of the loop's variants, and time, at (8192, 50304): unmasked full pieces (FULL_PIECES)."""
    n, v = 8192, 50304
    x = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3
    y = torch.empty_like(x)
    sms = runtime.num_sms(dev)
    cases = {}
    for work in (0, 2):
        for stages, warps, full in ((3, 8, False), (3, 8, True), (3, 16, False), (3, 16, True), (2, 8, True)):
            rows(x, y, work, stages, warps, sms, full)
            if work == 2:
                ref = torch.softmax(x.float(), dim=1)
                assert (y.float() - ref).abs().max().item() < 1e-2
            cases[(work, stages, warps, full)] = lambda a=(work, stages, warps, sms, full): rows(x, y, *a)
    for (work, stages, warps, full), ts in rounds(cases).items():
        regs, spilled = _registers[(work, stages, warps, full)]
        print(f"(8192, 50304) loop WORK {work} s{stages} w{warps} full pieces unmasked {full}: {min(ts):6.1f} us "
              f"({max(ts):6.1f}), {regs} registers, {spilled} spilled", flush=True)


def main():
    if "spills" in sys.argv:
        spills()
        xg = torch.randn(8192, 50304, device=dev, dtype=torch.bfloat16).requires_grad_()
        t = torch.randint(0, 50304, (8192,), device=dev)
        package_step(xg, t, runtime.num_sms(dev))
        try:
            for c in ce._cross_entropy_fwd_kernel.device_caches[0][0].values():
                print(f"package kernel variant: {c.n_regs} registers, {c.n_spills} spilled, "
                      f"{c.metadata.num_warps} warps", flush=True)
        except Exception as e:  # noqa: BLE001  (Triton's cache layout differs between versions)
            print("package kernel's registers not found:", e)
        return
    if "once" in sys.argv:
        once()
        return
    if "perrow" in sys.argv:
        for n, v in ((8192, 50304), (8192, 32000)):
            per_row(n, v)
        return
    sms = runtime.num_sms(dev)
    for n, v in ((8192, 50304), (8192, 32000)):
        x = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3
        y = torch.empty_like(x)
        t = torch.randint(0, v, (n,), device=dev)
        xg = x.clone().requires_grad_()
        balanced = triton.cdiv(n, triton.cdiv(n, sms))  # as many rounds as sms programs need, every round fuller
        cases = {"torch copy": lambda: y.copy_(x)}
        for programs in sorted({sms, balanced, 128}, reverse=True):
            cases[f"package ce fwd+bwd, {programs} programs"] = lambda p=programs: package_step(xg, t, p)
            for work in (0, 2):
                cases[f"loop WORK {work} s3 w8, {programs} programs"] = \
                    lambda w=work, p=programs: rows(x, y, w, 3, 8, p)
        cases["a program per row, WORK 0, w16"] = lambda: rows(x, y, 0, 1, 16, n)
        rows(x, y, 0, 3, 8, sms)
        assert torch.equal(y, x)
        for name, ts in rounds(cases).items():
            print(f"({n}, {v}) {name}: {min(ts):6.1f} us ({max(ts):6.1f})", flush=True)


if __name__ == "__main__":
    main()
