"""Probe: a long row (GPT-2's 50 304 columns) split over SPLIT programs that exchange (max, sum).

One program per 100 KB row fills an SM's registers: the row is loaded, then reduced, then written,
with nothing overlapping (75% of a copy's speed at (8192, 50304)). Here each program holds a chunk
of a row, publishes its chunk's max and sum of exponentials, waits (spinning on a per-row counter)
until every chunk of its row has published, combines them, and writes its chunk. Smaller
programs, several per SM, overlap one another's loads and arithmetic.

    python3 benchmarks/experiments/split_row.py            # softmax and cross-entropy forward, (8192, 50304)

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16, do_bench median, four calls):
softmax (8192, 50304): the package 729-733 us (2250-2260 GB/s), a copy 548-549 us; split over 7
programs (chunks of 7232 columns, 4 warps) 660-662 us (2489-2497 GB/s, 83% of the copy), 8 x 8 warps
677-682, 13 x 4 warps 670-673, 4 x 8 warps 750-754, 16 or more slower still. Chunks that are not a
multiple of 16 columns (no aligned vector loads) were 1.5-2.5x slower. On a persistent grid launched
cooperatively (every program resident, so none can wait for one that never starts; a group of
SPLIT programs loops over rows) 795-1783 us. (4096, 16384): the package 95.6 us, a copy 93-94, the
best split 104. (8192, 32000): the package 395 us, split 4 x 8 warps 389-390. Cross-entropy's
forward (loss and gradient, with its pre-pass) at (8192, 50304): the package 827-894 us across
runs, split 13 x 4 warps 805-870, within that noise; once the package's read-back waited behind its
main kernel (this session's change), the package 778 us against the split's best 869. Not adopted: 10% at one softmax shape, for a
kernel whose programs wait for one another. The interpreter runs programs one at a time, so there
it would never finish; on the GPU it relies on the programs of a row being started in index order
(what the hardware does, not what CUDA promises) or on a cooperative launch, which was slow.
"""
import sys

import torch
import triton
import triton.language as tl
import triton.testing

import triton_transformer as tt
from triton_transformer import runtime
import importlib

ce_mod = importlib.import_module("triton_transformer.cross_entropy")
sm_mod = importlib.import_module("triton_transformer.softmax")
LOG2E = sm_mod.LOG2E


@triton.jit
def _exchange(m, d, stats_ptr, count_ptr, row, part, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr):
    """Publish this chunk's (max, sum), wait for the row's other chunks, return the row's (max, sum)."""
    base = stats_ptr + (row * SPLIT) * 2
    tl.store(base + part * 2, m)
    tl.store(base + part * 2 + 1, d)
    tl.debug_barrier()
    tl.atomic_add(count_ptr + row, 1, sem="release")
    while tl.atomic_add(count_ptr + row, 0, sem="acquire") < SPLIT:
        pass
    parts = tl.arange(0, SPLIT_P2)
    ms = tl.load(base + parts * 2, mask=parts < SPLIT, other=-float("inf"), volatile=True)
    ds = tl.load(base + parts * 2 + 1, mask=parts < SPLIT, other=0.0, volatile=True)
    return sm_mod.online_combine(ms, ds)  # the chunks' (max, sum) combined as the online softmax's lanes


@triton.jit
def _split_softmax_row(x_ptr, y_ptr, stats_ptr, count_ptr, row, part, cols, mask, stride, SPLIT: tl.constexpr):
    """This program's chunk of softmax(row): chunk statistics, the exchange, the scaled write."""
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=-float("inf"))
    m = tl.max(x, axis=0).to(tl.float32)
    m_safe = tl.where(m == -float("inf"), 0.0, m)  # an all -inf chunk: e = 0, not NaN
    e = tl.exp2((x.to(tl.float32) - m_safe) * LOG2E)
    d = tl.sum(e, axis=0)
    e = e.to(x.dtype)
    m_row, d_row = _exchange(m, d, stats_ptr, count_ptr, row, part, SPLIT, triton.next_power_of_2(SPLIT))
    scale = tl.exp2((m_safe - m_row) * LOG2E) / d_row
    tl.store(y_ptr + row * stride + cols, (e.to(tl.float32) * scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_softmax_kernel(x_ptr, y_ptr, stats_ptr, count_ptr, stride, n_cols, chunk,
                          SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    part = pid % SPLIT
    lanes = tl.arange(0, BLOCK)
    cols = part * chunk + lanes
    _split_softmax_row(x_ptr, y_ptr, stats_ptr, count_ptr, (pid // SPLIT).to(tl.int64), part, cols,
                       (lanes < chunk) & (cols < n_cols), stride, SPLIT)


def _chunk(n_cols, split):
    """Columns per program: a multiple of 64, so that every chunk starts 128-byte aligned."""
    return triton.cdiv(triton.cdiv(n_cols, split), 64) * 64


@triton.jit
def _split_softmax_persistent_kernel(x_ptr, y_ptr, stats_ptr, count_ptr, stride, n_rows, n_cols, chunk,
                                     SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """The same, on a grid the GPU holds at once (a cooperative launch guarantees it): group g of SPLIT
    programs does rows g, g + G, g + 2G, ..."""
    pid = tl.program_id(0)
    part = pid % SPLIT
    lanes = tl.arange(0, BLOCK)
    cols = part * chunk + lanes
    mask = (lanes < chunk) & (cols < n_cols)
    for row in range(pid // SPLIT, n_rows, tl.num_programs(0) // SPLIT):
        _split_softmax_row(x_ptr, y_ptr, stats_ptr, count_ptr, row.to(tl.int64), part, cols, mask, stride, SPLIT)


def _buffers(x, split):
    """(output shaped like x, chunk statistics, per-row counters (zeroed), columns per program, block) of a split row."""
    n_rows, n_cols = x.shape
    chunk = _chunk(n_cols, split)
    return (torch.empty_like(x), torch.empty(n_rows * split * 2, device=x.device, dtype=torch.float32),
            torch.zeros(n_rows, device=x.device, dtype=torch.int32), chunk, triton.next_power_of_2(chunk))


def split_softmax_persistent(x, split, num_warps, per_sm):
    n_rows, n_cols = x.shape
    y, stats, count, chunk, block = _buffers(x, split)
    groups = min(n_rows, per_sm * torch.cuda.get_device_properties(x.device).multi_processor_count // split)
    _split_softmax_persistent_kernel[(groups * split,)](x, y, stats, count, x.stride(0), n_rows, n_cols, chunk,
                                                        SPLIT=split, BLOCK=block, num_warps=num_warps,
                                                        launch_cooperative_grid=True)
    return y


def split_softmax(x, split, num_warps, maxnreg=None):
    n_rows, n_cols = x.shape
    y, stats, count, chunk, block = _buffers(x, split)
    _split_softmax_kernel[(n_rows * split,)](x, y, stats, count, x.stride(0), n_cols, chunk,
                                             SPLIT=split, BLOCK=block, num_warps=num_warps,
                                             **({"maxnreg": maxnreg} if maxnreg else {}))
    return y


@triton.jit
def _split_ce_kernel(x_ptr, target_ptr, loss_ptr, g_ptr, stats_ptr, count_ptr, tstats_ptr, stride, n_cols, chunk,
                     ignore_index, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // SPLIT).to(tl.int64)
    part = pid % SPLIT
    mean_scale = 1.0 / tl.maximum(tl.load(tstats_ptr), 1).to(tl.float32)  # the count of counted rows
    target = tl.load(target_ptr + row).to(tl.int64)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    scale = tl.where(counted, mean_scale, 0.0)
    lanes = tl.arange(0, BLOCK)
    cols = part * chunk + lanes
    mask = (lanes < chunk) & (cols < n_cols)
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=-float("inf"))
    m = tl.max(x, axis=0).to(tl.float32)
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    e = tl.exp2((x.to(tl.float32) - m_safe) * LOG2E)
    d = tl.sum(e, axis=0)
    e = e.to(x.dtype)
    m_row, d_row = _exchange(m_safe, d, stats_ptr, count_ptr, row, part, SPLIT, triton.next_power_of_2(SPLIT))
    lse = m_row + tl.log(d_row)
    if part == 0:
        x_target = tl.load(x_ptr + row * stride + target, mask=counted & in_range, other=0.0).to(tl.float32)
        x_target = tl.where(in_range, x_target, float("nan"))
        tl.store(loss_ptr + row, tl.where(counted, lse - x_target, 0.0))
    target_col = tl.where(in_range, target, -1).to(tl.int32)
    p = e.to(tl.float32) * tl.exp2((m_safe - lse) * LOG2E)
    grad = (p - tl.where(cols == target_col, 1.0, 0.0)) * scale
    tl.store(g_ptr + row * stride + cols, grad.to(g_ptr.dtype.element_ty), mask=mask)


def split_ce(logits, target, split, num_warps, maxnreg=None):
    n_rows, n_cols = logits.shape
    # the package's pre-pass: [ticket, a count of counted rows per part, a count of bad targets per part]
    n_parts = triton.cdiv(n_rows, 1024)
    pre = torch.empty(1 + 2 * n_parts, dtype=torch.int32, device=logits.device)
    ce_mod._target_stats_kernel[(n_parts,)](target, pre, n_rows, n_cols, -100, n_parts, BLOCK=1024)
    bad = ce_mod._BadTargetCount(pre[1 + n_parts:])
    bad.mark()
    bad.check(target, n_cols, -100)
    tstats = pre[1:1 + n_parts].sum().reshape(1).to(torch.int32)  # the count, where the kernel below reads it
    grad, stats, count, chunk, block = _buffers(logits, split)
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    _split_ce_kernel[(n_rows * split,)](logits, target, loss, grad, stats, count, tstats, logits.stride(0), n_cols,
                                        chunk, -100, SPLIT=split, BLOCK=block, num_warps=num_warps,
                                        **({"maxnreg": maxnreg} if maxnreg else {}))
    return loss.sum() / tstats[0], grad


def ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _report(label, run, check, t_copy, gb=None):
    """Run once, check (an error text), time, print one line; a probe reports a failure and goes on."""
    try:
        out = run()
        torch.cuda.synchronize()
        err = check(out)
        t = ms(run)
        speed = f"{gb / t * 1e3:.0f} GB/s, " if gb else ""
        print(f"  {label}: {t * 1e3:7.1f} us ({speed}{t_copy / t:.0%} of copy) {err}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"  {label}: {type(exc).__name__}: {exc}"[:300], flush=True)


def main():
    n_rows, n_cols = 8192, 50304
    x = torch.randn(n_rows, n_cols, device="cuda", dtype=torch.bfloat16) * 3
    gb = 2 * x.numel() * 2 / 1e9
    ref = torch.softmax(x.float(), -1)
    t_copy = ms(lambda: x.clone())
    t_ours = ms(lambda: tt.softmax(x))
    print(f"softmax ({n_rows}, {n_cols}): copy {t_copy*1e3:.1f} us ({gb/t_copy*1e3:.0f} GB/s), "
          f"package {t_ours*1e3:.1f} us ({gb/t_ours*1e3:.0f} GB/s)", flush=True)
    softmax_err = lambda y: f"err {(y.float() - ref).abs().max().item():.1e}"  # noqa: E731
    for split, warps in [(7, 4), (8, 8), (13, 4)]:
        _report(f"split {split:2d} chunk {_chunk(n_cols, split):5d} warps {warps:2d}",
                lambda: split_softmax(x, split, warps), softmax_err, t_copy, gb)
    for split, warps, per_sm in [(7, 4, 1), (7, 4, 2), (7, 4, 3), (8, 8, 1), (8, 8, 2), (13, 4, 2),
                                 (13, 4, 3), (13, 4, 4), (7, 8, 1), (7, 8, 2)]:
        _report(f"persistent split {split:2d} warps {warps} {per_sm}/SM",
                lambda: split_softmax_persistent(x, split, warps, per_sm), softmax_err, t_copy, gb)

    tgt = torch.randint(0, n_cols, (n_rows,), device="cuda")
    tgt[::7] = -100
    ref_loss = torch.nn.functional.cross_entropy(x.float(), tgt)
    t_ce = ms(lambda: ce_mod.cross_entropy_forward(x, tgt, with_grad=True))
    print(f"cross_entropy fwd (loss+grad) ({n_rows}, {n_cols}): package {t_ce*1e3:.1f} us "
          f"({t_copy/t_ce:.0%} of copy)", flush=True)
    _, g_ref, _ = ce_mod.cross_entropy_forward(x, tgt, with_grad=True)
    ce_err = lambda out: (f"loss err {(out[0] - ref_loss).abs().item():.1e} "  # noqa: E731
                          f"grad err {(out[1].float() - g_ref.float()).abs().max().item():.1e}")
    for split, warps, maxnreg in [(7, 4, None), (8, 8, 128), (13, 2, None), (13, 4, None), (25, 2, None),
                                  (25, 4, None)]:
        _report(f"split {split:2d} warps {warps:2d} maxnreg {maxnreg}",
                lambda: split_ce(x, tgt, split, warps, maxnreg), ce_err, t_copy)


if __name__ == "__main__":
    main()

