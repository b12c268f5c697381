"""Probe: cross-entropy's row loop with its rows brought in by the Tensor Memory Accelerator. (GPU)

    cd benchmarks/experiments && python3 ce_tma.py

`ce_floor.py` found the package's row loop (one program per SM, each row held whole in three pieces, the next
rows prefetched into shared memory by `tl.range(num_stages=)`, i.e. cp.async) 19-23 us slower than a program
per row when it only moves the rows (571 against 552 us at (8192, 50304)), with no spills and at any depth or
warp count. Here the same loop loads its pieces through TMA descriptors instead: bulk copies of whole boxes
(how Triton splits a piece into copies was not examined), no per-thread addresses or column masks. The row is viewed as (V / 64, 64) so that a piece is a
(rows, 64) box of 128-byte lines (a box edge is at most 256 elements); columns past V come in as 0 and are
masked to -inf where a max would see them. Work per row, both load paths:

  WORK 0  the row stored back as it came (the loop's floor)
  WORK 2  softmax: max, exponentials kept in bf16, their sum, scaled and stored
  WORK 3  cross-entropy: softmax's row, the target's logit loaded by address (as the package does), the row's
          loss stored, the gradient e / d - onehot stored in bf16
  WORK 4  WORK 3 with the target's logit picked out of the row on chip instead (no dependent load)

beside the package's forward+backward and a copy, do_bench medians, L2 flushed, three interleaved rounds.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16, (8192, 50304), 8 warps, one program per SM,
min of three rounds (max), us; registers, spilled, shared memory):

    copy                                   547.8 (548.6)
    package forward+backward               600.1 (600.9)
    WORK 0  pointers, 3 stages             571.5 (571.8)    64, 2, 200 KB
            TMA, 2 stages                  574.8 (575.2)    248, 0, 100 KB
            TMA, 3 stages                  572.5 (572.6)    249, 0, 200 KB
    WORK 2  pointers, 3 stages             581.0 (581.1)    255, 0
            TMA, 2 / 3 stages              591.7 / 598.6    255, 0 / 2
    WORK 3  pointers / TMA 2 / TMA 3       875.3 / 784.4 / 763.5    255, 70 / 44 / 44 spilled
    WORK 4  pointers / TMA 2 / TMA 3       1543.4 / 1320.7 / 1322.5  255, 240 / 126 / 138 spilled

Every variant's output was checked against PyTorch first (rows, softmax, loss and gradient). TMA does not take
the loop below its 571 us: the bare loop is as slow either way, and with softmax's arithmetic the TMA form is
11-18 us slower. (WORK 3 and 4 hold the row as (rows, 64) tiles, whose layout spills where the package's 1-D
pieces do not: they compare the two load paths with each other, not with the package. Picking the target's logit
out of the row costs more spills again than loading it.) Not adopted.
"""

import triton_transformer as tt  # noqa: F401  (first: sets the interpreter up on a CPU)
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ce_floor import package_step  # (this folder is the script's own: Python puts it on the path)
from triton_transformer import runtime
from triton_transformer.bench import rounds
from triton_transformer.softmax import LOG2E, row_pieces

dev = runtime.DEVICE
LINE = 64  # columns a line of the (V / LINE, LINE) view: 128 bytes of bf16


@triton.jit
def _piece(x_desc, x_ptr, offset, row, start, n_cols, R: tl.constexpr, LINE: tl.constexpr, TMA: tl.constexpr):
    """Columns [start, start + R * LINE) of a row as an (R, LINE) tile, -inf past n_cols."""
    cols = start + tl.arange(0, R)[:, None] * LINE + tl.arange(0, LINE)[None, :]
    if TMA:
        x = x_desc.load([row, start // LINE, 0]).reshape([R, LINE])
        x = tl.where(cols < n_cols, x, -float("inf"))
    else:
        x = tl.load(x_ptr + offset + cols, mask=cols < n_cols, other=-float("inf"))
    return x, cols


@triton.jit
def _exp_sum(x, m):
    """exp(x - m) kept in x's dtype, and its sum in fp32 (as `softmax.exp_and_sum`, on a 2-D tile)."""
    e = tl.exp2((x.to(tl.float32) - m) * LOG2E)
    return e.to(x.dtype), tl.sum(tl.sum(e, axis=1), axis=0)


@triton.jit
def _store(y_ptr, offset, cols, n_cols, y, inv_d, target, WORK: tl.constexpr):
    if WORK >= 3:
        y = y.to(tl.float32) * inv_d - tl.where(cols == target, 1.0, 0.0)
    elif WORK == 2:
        y = y.to(tl.float32) * inv_d
    tl.store(y_ptr + offset + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _pick(x, cols, target):
    return tl.sum(tl.sum(tl.where(cols == target, x.to(tl.float32), 0.0), axis=1), axis=0)


@triton.jit
def _tile_max(x):
    return tl.max(tl.max(x, axis=1), axis=0).to(tl.float32)


@triton.jit
def _rows_kernel(d0, d1, d2, x_ptr, y_ptr, t_ptr, loss_ptr, n_rows, n_cols, stride,
                 R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, LINE: tl.constexpr,
                 STAGES: tl.constexpr, WORK: tl.constexpr, TMA: tl.constexpr):
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0), num_stages=STAGES):
        offset = tl.cast(row, tl.int64) * stride
        x0, c0 = _piece(d0, x_ptr, offset, row, 0, n_cols, R0, LINE, TMA)
        x1, c1 = _piece(d1, x_ptr, offset, row, R0 * LINE, n_cols, R1, LINE, TMA)
        x2, c2 = _piece(d2, x_ptr, offset, row, (R0 + R1) * LINE, n_cols, R2, LINE, TMA)
        inv_d = 1.0
        target = 0
        if WORK >= 2:
            if WORK == 3:
                target = tl.load(t_ptr + row).to(tl.int32)
                x_target = tl.load(x_ptr + offset + target).to(tl.float32)
            m = tl.maximum(tl.maximum(_tile_max(x0), _tile_max(x1)), _tile_max(x2))
            if WORK == 4:
                target = tl.load(t_ptr + row).to(tl.int32)
                x_target = _pick(x0, c0, target) + _pick(x1, c1, target) + _pick(x2, c2, target)
            x0, s0 = _exp_sum(x0, m)
            x1, s1 = _exp_sum(x1, m)
            x2, s2 = _exp_sum(x2, m)
            d = s0 + s1 + s2
            inv_d = 1.0 / d
            if WORK >= 3:
                tl.store(loss_ptr + row, (m - x_target) + tl.log(d))
        _store(y_ptr, offset, c0, n_cols, x0, inv_d, target, WORK)
        _store(y_ptr, offset, c1, n_cols, x1, inv_d, target, WORK)
        _store(y_ptr, offset, c2, n_cols, x2, inv_d, target, WORK)


_info = {}


def launcher(x, y, t, loss, work, tma, stages, warps=8):
    n, v = x.shape
    assert v % LINE == 0 and x.stride(1) == 1
    first, second, third = row_pieces(v, triton.next_power_of_2(v))
    r = (first // LINE, second // LINE, third // LINE)
    view = x.view(n, v // LINE, LINE)
    descs = [TensorDescriptor(view, [n, v // LINE, LINE], [x.stride(0), LINE, 1], [1, ri, LINE]) for ri in r]
    grid = (runtime.num_sms(dev),)

    def call():
        return _rows_kernel[grid](*descs, x, y, t, loss, n, v, x.stride(0), R0=r[0], R1=r[1], R2=r[2], LINE=LINE,
                                  STAGES=stages, WORK=work, TMA=tma, num_warps=warps)

    c = call()
    _info[(work, tma, stages)] = (c.n_regs, c.n_spills, c.metadata.shared)
    return call


def main():
    for n, v in ((8192, 50304),):
        x = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 3
        y = torch.empty_like(x)
        t = torch.randint(0, v, (n,), device=dev)
        loss = torch.empty(n, device=dev, dtype=torch.float32)
        xf = x.float().requires_grad_()
        ref_loss = torch.nn.functional.cross_entropy(xf, t, reduction="none")
        ref_loss.sum().backward()
        ref_soft = torch.softmax(x.float(), dim=1)
        xg = x.clone().requires_grad_()
        cases = {"torch copy": lambda: y.copy_(x),
                 "package ce fwd+bwd": lambda: package_step(xg, t, runtime.num_sms(dev))}
        for work in (0, 2, 3, 4):
            for tma, stages in ((False, 3), (True, 2), (True, 3)):
                name = f"WORK {work} {'tma' if tma else 'pointers'} s{stages}"
                try:
                    call = launcher(x, y, t, loss, work, tma, stages)
                except Exception as e:  # noqa: BLE001  (OutOfResources at a depth that does not fit)
                    print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                torch.cuda.synchronize()
                if work == 0:
                    ok = torch.equal(y, x)
                elif work == 2:
                    ok = (y.float() - ref_soft).abs().max().item() < 1e-2
                else:
                    ok = ((y.float() - xf.grad).abs().max().item() < 1e-2
                          and (loss - ref_loss.detach()).abs().max().item() < 1e-2)
                regs, spills, smem = _info[(work, tma, stages)]
                print(f"{name}: correct {ok}, {regs} registers, {spills} spilled, {smem} B shared", flush=True)
                cases[name] = call
        for name, ts in rounds(cases).items():
            print(f"({n}, {v}) {name}: {min(ts):6.1f} us ({max(ts):6.1f})", flush=True)


if __name__ == "__main__":
    main()
