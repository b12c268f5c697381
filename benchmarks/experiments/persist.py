"""Probe: persistent programs for long rows, so that a row's second pass reads it from L2, not HBM.

    python3 benchmarks/experiments/persist.py [softmax] [ce] [bwd] [single]

A grid of one program per row lets every SM hold several rows at once: at (8192, 50304) bf16 that is
hundreds of 100 KB rows in flight, more than the 50 MB L2, so a two-pass kernel reads each row twice from
HBM. Here the grid is PROGS programs per SM, each looping over rows: only SMs x PROGS rows are live, and the
second pass hits L2. Variants: block width (16 values a thread), programs per SM, pipelining stages, and
a running max kept per lane (two exp2 a value) or per block (one exp2 a value, one reduction a block).
"""
import sys

import torch

import triton_transformer as tt  # noqa: F401  (first: sets the interpreter up on a CPU)
import triton
import triton.language as tl
import triton.testing
from triton_transformer import runtime
from triton_transformer.softmax import LOG2E, online_update, online_combine, softmax_forward
from triton_transformer.cross_entropy import cross_entropy_forward

dev = runtime.DEVICE
SMALL = dev.type == "cpu"


@triton.jit
def _block_update(m, d, x):
    # running max m and sum d (scalars) after a block x: one exp2 per value
    m_new = tl.maximum(m, tl.max(x, axis=0))
    alpha = tl.where(m_new == -float("inf"), 1.0, tl.exp2((m - m_new) * LOG2E))
    d = d * alpha + tl.sum(tl.where(x == -float("inf"), 0.0, tl.exp2((x - m_new) * LOG2E)), axis=0)
    return m_new, d


@triton.jit
def _row_lse(x_row, n_cols, cols, BLOCK: tl.constexpr, STAGES: tl.constexpr, LANE: tl.constexpr):
    if LANE:
        m = tl.full([BLOCK], -float("inf"), tl.float32)
        d = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
            m, d = online_update(m, d, x)
        m_row, d_row = online_combine(m, d)
    else:
        m_row = -float("inf")
        d_row = 0.0
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
            m_row, d_row = _block_update(m_row, d_row, x)
    return m_row + tl.log2(d_row) / LOG2E


@triton.jit
def softmax_online_persist(x_ptr, y_ptr, xs, ys, n_rows, n_cols, BLOCK: tl.constexpr, STAGES: tl.constexpr,
                           LANE: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        x_row = x_ptr + row * xs
        y_row = y_ptr + row * ys
        lse = _row_lse(x_row, n_cols, cols, BLOCK, STAGES, LANE)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
            tl.store(y_row + start + cols, tl.exp2((x - lse) * LOG2E).to(y_ptr.dtype.element_ty),
                     mask=start + cols < n_cols)


@triton.jit
def softmax_single_persist(x_ptr, y_ptr, xs, ys, n_rows, n_cols, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for row in tl.range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0), num_stages=STAGES):
        x = tl.load(x_ptr + row * xs + cols, mask=cols < n_cols, other=-float("inf"))
        m = tl.max(x, axis=0).to(tl.float32)
        d = tl.sum(tl.exp2((x.to(tl.float32) - m) * LOG2E), axis=0)
        y = tl.exp2((x.to(tl.float32) - m) * LOG2E - tl.log2(d))
        tl.store(y_ptr + row * ys + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def ce_online_persist(x_ptr, t_ptr, loss_ptr, g_ptr, xs, gs, n_rows, n_cols, scale,
                      BLOCK: tl.constexpr, STAGES: tl.constexpr, LANE: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        x_row = x_ptr + row * xs
        g_row = g_ptr + row * gs
        target = tl.load(t_ptr + row).to(tl.int32)
        x_t = tl.load(x_row + target).to(tl.float32)
        lse = _row_lse(x_row, n_cols, cols, BLOCK, STAGES, LANE)
        tl.store(loss_ptr + row, lse - x_t)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
            g = (tl.exp2((x - lse) * LOG2E) - tl.where(start + cols == target, 1.0, 0.0)) * scale
            tl.store(g_row + start + cols, g.to(g_ptr.dtype.element_ty), mask=start + cols < n_cols)


@triton.jit
def softmax_bwd_persist(y_ptr, dy_ptr, dx_ptr, n_rows, n_cols, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        off = row * n_cols
        acc = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            mask = start + cols < n_cols
            y = tl.load(y_ptr + off + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += y * dy
        s = tl.sum(acc, axis=0)
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            mask = start + cols < n_cols
            y = tl.load(y_ptr + off + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off + start + cols, (y * (dy - s)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ce_single_unit(x_ptr, t_ptr, loss_ptr, g_ptr, xs, gs, n_cols, scale, BLOCK: tl.constexpr,
                   WIDE: tl.constexpr):
    # the package's one-block path for unit column stride: int32 columns (WIDE: int64, as the package)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if WIDE:
        cols = cols.to(tl.int64)
    target = tl.load(t_ptr + row).to(tl.int32)
    x_row = x_ptr + row * xs
    x_t = tl.load(x_row + target).to(tl.float32)
    x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf"))
    m = tl.max(x, axis=0).to(tl.float32)
    d = tl.sum(tl.exp2((x.to(tl.float32) - m) * LOG2E), axis=0)
    lse = m + tl.log(d)
    tl.store(loss_ptr + row, lse - x_t)
    p = tl.exp2((x.to(tl.float32) - lse) * LOG2E)
    g = (p - tl.where(cols == target, 1.0, 0.0)) * scale
    tl.store(g_ptr + row * gs + cols, g.to(g_ptr.dtype.element_ty), mask=cols < n_cols)


def sms():
    return 4 if SMALL else runtime.cuda_properties(dev).multi_processor_count


def bench(fn):
    if SMALL:
        fn()
        return float("nan")
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def variants():
    blocks = (128,) if SMALL else (4096, 8192, 16384)
    for blk in blocks:
        w = max(1, min(16, blk // 512))
        for progs in ((1,) if SMALL else (1, 2, 4)):
            for stages in ((1, 2) if SMALL else (1, 3)):
                for lane in (False, True):
                    yield blk, w, progs, stages, lane


def report(label, fn, error, nbytes):
    """Time `fn`, run it once more and print one line with `error()`, its largest error; or why it failed."""
    try:
        us = bench(fn)
        fn()
        print(f"{label}: {us:.1f} us {nbytes / us / 1e3:.0f} GB/s err {error():.1e}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"  failed {type(e).__name__}: {str(e)[:300]}")


def softmax():
    shapes = [(5, 1000)] if SMALL else [(8192, 50304)]
    for m, n in shapes:
        x = torch.randn(m, n, device=dev, dtype=torch.float32 if SMALL else torch.bfloat16) * 3
        ref = torch.softmax(x.float(), -1)
        nbytes = 2 * x.numel() * x.element_size()
        print(f"softmax [{m}, {n}] package: {bench(lambda: softmax_forward(x)):.1f} us")
        for blk, w, progs, stages, lane in variants():
            y = torch.empty_like(x)
            grid = (min(m, progs * sms()),)
            fn = lambda: softmax_online_persist[grid](x, y, x.stride(0), y.stride(0), m, n, BLOCK=blk, STAGES=stages,
                                                      LANE=lane, num_warps=w)
            report(f"softmax [{m}, {n}] online b{blk} w{w} p{progs} s{stages} {'lane' if lane else 'block'}", fn,
                   lambda: (y.float() - ref).abs().max().item(), nbytes)


def single():
    shapes = [(7, 100)] if SMALL else [(4096, 4096), (4096, 1024), (16384, 768)]
    for m, n in shapes:
        x = torch.randn(m, n, device=dev, dtype=torch.float32 if SMALL else torch.bfloat16) * 3
        ref = torch.softmax(x.float(), -1)
        nbytes = 2 * x.numel() * x.element_size()
        print(f"softmax [{m}, {n}] package: {bench(lambda: softmax_forward(x)):.1f} us")
        blk = triton.next_power_of_2(n)
        for w in ((1,) if SMALL else (4, 8)):
            for progs in ((1,) if SMALL else (2, 4, 8)):
                for stages in ((1, 2) if SMALL else (1, 2, 3)):
                    y = torch.empty_like(x)
                    grid = (min(m, progs * sms()),)
                    fn = lambda: softmax_single_persist[grid](x, y, x.stride(0), y.stride(0), m, n, BLOCK=blk,
                                                              STAGES=stages, num_warps=w)
                    report(f"softmax [{m}, {n}] single w{w} p{progs} s{stages}", fn,
                           lambda: (y.float() - ref).abs().max().item(), nbytes)


def ce():
    m, n = (5, 1000) if SMALL else (8192, 50304)
    x = torch.randn(m, n, device=dev, dtype=torch.float32 if SMALL else torch.bfloat16) * 3
    t = torch.randint(0, n, (m,), device=dev)
    xr = x.float().requires_grad_()
    ref_loss = torch.nn.functional.cross_entropy(xr, t)
    ref_loss.backward()
    nbytes = 2 * x.numel() * x.element_size()
    import triton_transformer.cross_entropy as C
    C._BadTargetCount.check = lambda *a, **k: None  # the read-back, out of the timing
    print(f"ce [{m}, {n}] package fwd: {bench(lambda: cross_entropy_forward(x, t, with_grad=True)):.1f} us, "
          f"forced online {bench(lambda: cross_entropy_forward(x, t, with_grad=True, single_block=False)):.1f} us")
    blk = triton.next_power_of_2(n)

    def ce_error():  # the loss and gradient buffers of the variant just run (the loops rebind them)
        return max((loss.mean() - ref_loss).abs().item(), (g.float() - xr.grad).abs().max().item() * m)

    for wide in (False, True):
        for w in ((1,) if SMALL else (16, 32)):
            loss = torch.empty(m, device=dev)
            g = torch.empty_like(x)
            fn = lambda: ce_single_unit[(m,)](x, t, loss, g, x.stride(0), g.stride(0), n, 1.0 / m, BLOCK=blk,
                                              WIDE=wide, num_warps=w)
            report(f"ce [{m}, {n}] single {'int64' if wide else 'int32'} w{w}", fn, ce_error, nbytes)
    if "--single" in sys.argv:
        return
    for blk, w, progs, stages, lane in variants():
        loss = torch.empty(m, device=dev)
        g = torch.empty_like(x)
        grid = (min(m, progs * sms()),)
        fn = lambda: ce_online_persist[grid](x, t, loss, g, x.stride(0), g.stride(0), m, n, 1.0 / m, BLOCK=blk,
                                             STAGES=stages, LANE=lane, num_warps=w)
        report(f"ce [{m}, {n}] online b{blk} w{w} p{progs} s{stages} {'lane' if lane else 'block'}", fn, ce_error,
               nbytes)


def bwd():
    m, n = (5, 1000) if SMALL else (8192, 50304)
    dt = torch.float32 if SMALL else torch.bfloat16
    y = torch.softmax(torch.randn(m, n, device=dev), -1).to(dt)
    dy = torch.randn(m, n, device=dev, dtype=dt)
    ref = y.float() * (dy.float() - (y.float() * dy.float()).sum(-1, keepdim=True))
    nbytes = 3 * y.numel() * y.element_size()
    from triton_transformer.softmax import softmax_backward
    print(f"softmax bwd [{m}, {n}] package: {bench(lambda: softmax_backward(y, dy)):.1f} us")
    for blk, w, progs, stages, lane in variants():
        if lane:
            continue
        dx = torch.empty_like(y)
        grid = (min(m, progs * sms()),)
        fn = lambda: softmax_bwd_persist[grid](y, dy, dx, m, n, BLOCK=blk, STAGES=stages, num_warps=w)
        report(f"softmax bwd [{m}, {n}] b{blk} w{w} p{progs} s{stages}", fn,
               lambda: (dx.float() - ref).abs().max().item(), nbytes)


if __name__ == "__main__":
    for what in [a for a in sys.argv[1:] if not a.startswith("--")] or ["softmax", "ce", "bwd", "single"]:
        print(f"==== {what}", flush=True)
        globals()[what]()
