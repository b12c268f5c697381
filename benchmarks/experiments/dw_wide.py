"""Probe: dW = dY^T X in one wave of tiles that are not a power of two wide, as cuBLAS's 128 x 160. (GPU)

    python3 benchmarks/experiments/dw_wide.py [once]

At the benchmark's linear shapes dW's output is 3072 x 768 (or 768 x 3072). In tiles of 128 x 128 that is 144
tiles for 132 SMs, two waves, the second nearly empty; the package's 128 x 256 (or 64 x 256) tiles need a split
of K to fill the GPU, and cuBLAS runs 120 tiles of 128 x 160 in one wave (`bwd_gemms.py`). `tl.arange` and so a
`tl.dot` operand are powers of two, but a tile need not be one: here a program holds two accumulators,
128 x 128 and 128 x 32, fed by the same A tile and two B boxes, 160 columns in all. Variants: (BLOCK_M, BLOCK_N0,
BLOCK_N1, stages, warps[, BLOCK_K, warp_specialize]); BLOCK_N1 = 0 is an ordinary power-of-two tile. GPU time of a
CUDA graph's replay after L2 flushes (`bench.measure_gpu_ms`), against the package's dW and cuBLAS's.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16, two rounds each; us at [16384, 768, 3072] /
[16384, 3072, 768]):

    package (pointers, split 3)              133.8-134.0 / 133.1-133.8     cuBLAS 104.8-105.5 / 105.5-105.8
    128 x (128 + 32), 120 tiles, 4 stages     137.0-137.3 / 139.1-139.8     5 stages 137.9 / 137.8-137.9
                                                                            3 stages 151.4-151.9 / 153.5-153.7
    the same, loop warp-specialised           -           / 140.9 (5 stages 138.1; at 4 warps the pass fails)
    the same, BLOCK_K 32, 8 stages            -           / 176.5
    128 x (128 + 64), 96 tiles                137.4-138.0 / 137.9-138.8
    128 x 128, 144 tiles (two waves)          176.7-176.9 / 188.0
    256 x (64 + 16), 120 tiles                174.2-175.2 / 173.3-175.0
    128 x 256, 72 tiles                       152.8-153.5 / 153.1-154.5

One wave of cuBLAS's tile shape did not close the gap: 137 us against 105, no better than the package's split of
K. A 128 x 160 tile's step of 64 then takes 0.54 us (256 steps) against cuBLAS's 0.41 with the same tile: what
cuBLAS has over our kernel is how fast one SM works through a tile (its clusters of 2 x 4 programs and what its
main loop does), not how the tiles fill the GPU. Not adopted.

`once` runs the three dW kernels once each after a warm-up, between cudaProfilerStart and Stop, for Nsight
Compute, on the lent H100 (the SM clock read 1.35-1.38 GHz in all three):

    cd benchmarks/experiments && ncu --profile-from-start off --target-processes all --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
        --section MemoryWorkloadAnalysis \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" python3 dw_wide.py once

How busy each kept the tensor pipe (ncu's compute workload analysis), and its time at that clock:

    package (pointers, split 3): 72 x 3 programs of 256 threads, 214 registers,
        197 KB shared            71.0%, 147.2 us, then its fp32 partials summed by `_sum_rows_kernel`, 17.1 us
    this probe's 128 x (128 + 32): 120 programs of 256 threads, 106 registers, 148 KB shared
                                 63.1%, 170.7 us
    cuBLAS nvjet_sm90_tst_128x160_64x5_2x4_h_bz_NTT: 120 programs of 384 threads (three warpgroups) in
        clusters of 8, 168 registers, 221 KB shared
                                 85.3%, 129.2 us

cuBLAS keeps the tensor cores busy 85% of its cycles against our 63-71%, with three warpgroups a program (the
usual Hopper design has one loading for two that compute; its insides were not examined further), five
stages of shared memory, and clusters whose loads can be multicast. Triton 3.6's automatic warp specialisation gave this
loop nothing (above), and its language has no clusters or multicast.
"""
import sys

import triton_transformer as tt  # noqa: F401  (first, as every probe)
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from triton_transformer import bench
from triton_transformer import matmul as mm

dev = tt.runtime.DEVICE
dt = torch.bfloat16


@triton.jit
def _dw_kernel(a_desc, b0_desc, b1_desc, c0_desc, c1_desc, M, N, K,
               BLOCK_M: tl.constexpr, BLOCK_N0: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr):
    # a_desc holds A^T (K, M) row-major (A = dY^T); b*_desc hold B (K, N) row-major; c*_desc C (M, N).
    n_tiles = tl.cdiv(N, BLOCK_N0 + BLOCK_N1)
    pid = tl.program_id(0)
    off_m = (pid // n_tiles) * BLOCK_M
    off_n = (pid % n_tiles) * (BLOCK_N0 + BLOCK_N1)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N0), tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N1 if BLOCK_N1 > 0 else 16), tl.float32)
    for k in tl.range(0, K, BLOCK_K, warp_specialize=WS):
        a = a_desc.load([k, off_m]).T
        acc0 = tl.dot(a, b0_desc.load([k, off_n]), acc0)
        if BLOCK_N1 > 0:
            acc1 = tl.dot(a, b1_desc.load([k, off_n + BLOCK_N0]), acc1)
    c0_desc.store([off_m, off_n], acc0.to(c0_desc.dtype))
    if BLOCK_N1 > 0:
        c1_desc.store([off_m, off_n + BLOCK_N0], acc1.to(c1_desc.dtype))


def dw(dy, x, out, bm, bn0, bn1, stages, warps, bk=64, ws=False):
    """out = dy^T x with the probe's kernel."""
    K, M = dy.shape
    N = x.shape[1]
    a = TensorDescriptor(dy, [K, M], [dy.stride(0), 1], [bk, bm])
    b0 = TensorDescriptor(x, [K, N], [x.stride(0), 1], [bk, bn0])
    b1 = TensorDescriptor(x, [K, N], [x.stride(0), 1], [bk, max(bn1, 16)])
    c0 = TensorDescriptor(out, [M, N], [out.stride(0), 1], [bm, bn0])
    c1 = TensorDescriptor(out, [M, N], [out.stride(0), 1], [bm, max(bn1, 16)])
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn0 + bn1),)
    _dw_kernel[grid](a, b0, b1, c0, c1, M, N, K, BLOCK_M=bm, BLOCK_N0=bn0, BLOCK_N1=bn1, BLOCK_K=bk, WS=ws,
                     num_stages=stages, num_warps=warps)
    return out


VARIANTS = [(128, 128, 32, 4, 8), (128, 128, 32, 5, 8), (128, 128, 32, 3, 8), (128, 128, 32, 4, 8, 64, True),
            (128, 128, 32, 5, 8, 64, True), (128, 128, 32, 4, 4, 64, True), (128, 128, 32, 8, 8, 32),
            (128, 128, 64, 4, 8), (128, 128, 0, 4, 8), (256, 64, 16, 4, 8), (128, 256, 0, 3, 8)]


def once():
    """dW at [16384, 768, 3072] once each, after a warm-up (the autotuner's runs): the package's, this probe's
    128 x (128 + 32) and cuBLAS's, for ncu --profile-from-start off (`bench.for_profiler`)."""
    x = torch.randn(16384, 768, device=dev, dtype=dt)
    dy = torch.randn(16384, 3072, device=dev, dtype=dt)
    out = torch.empty(3072, 768, device=dev, dtype=dt)
    bench.for_profiler(lambda: mm.matmul(dy.t(), x), lambda: dw(dy, x, out, 128, 128, 32, 4, 8),
                       lambda: torch.matmul(dy.t(), x))


def main():
    if "once" in sys.argv:
        once()
        return
    torch.manual_seed(0)
    for m_rows, k_in, n_out in ((16384, 768, 3072), (16384, 3072, 768)):
        x = torch.randn(m_rows, k_in, device=dev, dtype=dt)
        dy = torch.randn(m_rows, n_out, device=dev, dtype=dt)
        ref = (dy.float().t() @ x.float())
        flops = 2 * m_rows * k_in * n_out
        rows = {"package": lambda: mm.matmul(dy.t(), x), "cuBLAS": lambda: torch.matmul(dy.t(), x)}
        out = torch.empty(n_out, k_in, device=dev, dtype=dt)
        for v in VARIANTS:
            bm, bn0, bn1, stages, warps = v[:5]
            try:
                got = dw(dy, x, out, *v)
            except Exception as e:  # noqa: BLE001  (a probe: a config that does not fit is reported, not fatal)
                print(f"[{m_rows}, {k_in}, {n_out}] {v}: {type(e).__name__} {str(e)[:120]}", flush=True)
                continue
            err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
            tiles = triton.cdiv(n_out, bm) * triton.cdiv(k_in, bn0 + bn1)
            rows[f"{bm}x{bn0}+{bn1} {v[5:]} s{stages} w{warps} ({tiles} tiles, err {err:.1e})"] = \
                lambda v=v: dw(dy, x, out, *v)
        for rnd in range(2):
            for name, fn in rows.items():
                us = bench.measure_gpu_ms(fn) * 1e3
                print(f"[{m_rows}, {k_in}, {n_out}] round {rnd} dW {name}: {us:6.1f} us, "
                      f"{flops / us / 1e6:4.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
