"""Probe: the backward's two products of `linear` one by one, against cuBLAS in the same layouts. (GPU)

    python3 benchmarks/experiments/bwd_gemms.py [dw-only] [layouts] [sms] [clocks]

At the benchmark's shapes [M, K, N] = [16384, 768, 3072] and [16384, 3072, 768] a linear's forward
runs as fast as cuBLAS's, but its forward+backward takes 7-12% longer in GPU time. The backward is
dX = dY W (dY row-major, W row-major as B) and dW = dY^T X (A = dY^T, column-major; the pointer
kernel with split-K). Here each product is timed alone as the GPU runs it (`bench.measure_gpu_ms`,
a CUDA graph of 20 calls after L2 flushes): the package's choice, the pointer kernel at fixed splits
of the K loop, the TMA kernel forced, and torch.matmul.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16; us, first shape / second shape):

    dX = dY W      package 104.9 / 118.1            cuBLAS 104.4 / 121.6
    dW = dY^T X    package (split 3) 134.2 / 134.1  pointers split 2 175.1 / 179.2, split 4 160.9 / 163.9
                   TMA split 1 152.8 / 153.4, split 3 149.0 / 152.3             cuBLAS 105.1 / 106.3

So the whole gap is dW: 29 us at each shape, dX is at par. dW's output is 72 tiles of 128 x 256 for
132 SMs, so a split of K or a balanced schedule looked like the lever. A kernel was written for it
and measured, then removed: split-K's first wave as now, the items left over (a part-full second wave)
cut along K into one piece per program, partial tiles met in fp32 slots and added by the last part to
arrive (a counter per tile; a fixed order of addition, so bit-identical results). It was slower:
157-166 us over four versions and both shapes (row sums too: 184-196). Its own tile with one whole tile
per program (72 programs, no partials) took 152-154 us, and half tiles in two waves (144 programs)
179-181. A whole tile's K loop at 72 busy SMs is then about 0.6 us a step of 64, which on all 132 SMs
would be 84 us for dW, yet no schedule that kept every SM busy came near it. Every schedule loads the
same bytes per tile step into the SMs, (128 + 256) x 64 x 2 = 48 KiB, 906 MB for the product: 154 us is
5.9 TB/s of that with 72 SMs busy and 134 us (split 3) 6.8 TB/s with all of them. That was first read as
the product being bound by what L2 delivers to the SMs; `sms` and `clocks` below say it is not.

`sms` runs the persistent TMA kernel with 16 to 132 programs (`runtime.num_sms` patched) and times a tile
step of the busiest program. Measured (same GPU and versions): dW split 3, whose tiles the autotuner made
64 x 256 (40 KB a step), 313 ns a step with 16 programs, 363 with 33 and 66, 430 with 99, 450 with 132:
then 1.5 GB moved into the SMs in 154.6 us, about 10 TB/s, well above the 6.8 that L2 was thought to cap.
The 8192^3 product (128 x 256 tiles, 48 KB a step): 564, 567, 585, 674 and 765 ns, 8.5 TB/s into the SMs
at 132 programs, 702 TFLOP/s. `clocks` samples nvidia-smi every 50 ms while the same calls run back to
back for 2 s: with 16 programs the SM clock stays at its 1980 MHz maximum (310-323 W drawn); with 132 the
board nears its 700 W limit (645-690 W) and the clock falls, to a median of 1380-1410 MHz in the 8192^3
product and 1695-1710 MHz in dW (two runs). In the 8192^3 product the clock accounts for the slower steps
(564 ns x 1980 / 1410 = 792, 765 measured); in dW for part of them (366 of 450 ns). So the steps slow down
as SMs are added because the clock falls near the power limit, not because L2 runs out.
The second run also sampled dW as the package runs it (pointers, split 3) and cuBLAS's, back to back
(launched from Python, no L2 flush): ours 152.9 us a call at a median 1695 MHz and 651 W, 99.5 mJ a
call; cuBLAS 124.2 us at 1455 MHz and 675 W, 83.9 mJ. cuBLAS runs at the lower clock and still needs 30%
fewer cycles (181 against 259 thousand) and 16% less energy a call: its kernel does more per cycle and per
joule, which near the power limit is what sets the pace.

`layouts` asks whether dW's operands, both MN-major (the reduction runs down the rows of dY and X), are the
cause, and which kernel cuBLAS runs: the same product with K-major copies of the operands took our kernels
longer, not shorter (150.5 us through pointers, 150.2-152.3 through TMA, against 134.2 for dW as it is),
cuBLAS 106.9 against 105.4. cuBLAS's kernel, by torch.profiler, is nvjet_sm90_tst_128x160_64x5_2x4_h_bz_TNT
(NTT for the K-major copies): tiles of 128 x 160, 120 of them for 132 SMs, one wave with no split and no
partials, and, by its name, clusters of 2 x 4 programs, whose TMA loads can fill several SMs' shared memory
at once (multicast): fewer bytes moved out of L2 per flop, one likely reason it does more per cycle
and per joule (not measured apart). The tile shape was tried later
(`dw_wide.py`: 128 x 160 as two accumulators, one wave of 120 tiles, 137 us, no better); the clusters are not
open to our kernels: Triton 3.6's language has no TMA multicast (upstream
added it in 2026, for Blackwell's two-CTA matmuls, triton-lang/triton#10681 and #10765, after first
pieces in Gluon, #9005, December 2025); our kernels run without clusters.
"""
import sys

import torch

import triton_transformer as tt
from triton_transformer import bench
from triton_transformer import matmul as mm

dev = tt.runtime.DEVICE
dt = torch.bfloat16


def gpu_us(fn):
    return bench.measure_gpu_ms(fn) * 1e3


def variants(a, b, forced: bool):
    """(name, spec) of the product a @ b: ours as the package picks, forced choices (`forced`), cuBLAS.
    A spec is a function to time, or a dict of `matmul` module settings to time the package's call under."""
    out = [("package", lambda: mm.matmul(a, b))]
    if forced:
        out += [(f"pointers split {split}", dict(SPLIT_K=split)) for split in (1, 2, 4)]
        out += [(f"TMA split {split}", dict(SPLIT_K=split, TMA=True)) for split in (1, 3)]
    out.append(("cuBLAS", lambda: torch.matmul(a, b)))
    return out


def timed(a, b, spec):
    if callable(spec):
        return gpu_us(spec)
    saved = {name: getattr(mm, name) for name in spec}
    for name, value in spec.items():
        setattr(mm, name, value)
    try:
        return gpu_us(lambda: mm.matmul(a, b))
    finally:
        for name, value in saved.items():
            setattr(mm, name, value)


def layouts():
    """dW of [16384, 768, 3072] with its operands as they are (MN-major) and as K-major copies; cuBLAS's kernels."""
    from torch.profiler import ProfilerActivity, profile

    m, n, k = 3072, 768, 16384
    dy = torch.randn(k, m, device=dev, dtype=dt)  # dW's A is dy^T: MN-major
    x = torch.randn(k, n, device=dev, dtype=dt)  # dW's B is x: MN-major
    a_k, bt_k = dy.t().contiguous(), x.t().contiguous()  # K-major copies: A (m, k), B^T (n, k)
    cases = {"as is": (dy.t(), x), "K-major": (a_k, bt_k.t())}
    for name, (a, b) in cases.items():
        print(f"dW {name:8s} package {gpu_us(lambda: mm.matmul(a, b)):7.1f} us, cuBLAS "
              f"{gpu_us(lambda: torch.matmul(a, b)):7.1f} us", flush=True)
        for split in (1, 3):
            print(f"dW {name:8s} TMA split {split} {timed(a, b, dict(TMA=True, SPLIT_K=split)):7.1f} us", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for a, b in cases.values():
            torch.matmul(a, b)
        torch.cuda.synchronize()
    for event in prof.key_averages():
        print("CUDA activity:", event.key)


def _forget_plans():
    """Drop `matmul`'s plans and launch memos: the next call plans again (here, for a patched SM count)."""
    for memo in (mm._PLANS, mm._TMA_MEMO, mm._POINTER_MEMO, mm._SUM_MEMO):
        memo.clear()


def busy_sms():
    """How fast one tile step goes as more SMs run at once: the TMA kernel (persistent) given P programs.

    Every program walks its work items' K loops in steps of BLOCK_K; a step loads (BLOCK_M + BLOCK_N) x
    BLOCK_K x 2 bytes of A and B into the SM (the tile the autotuner picks: 64 x 256 x 64 for dW, 40 KiB,
    and 128 x 256 x 64 for the 8192^3 product, 48 KiB). If the steps were bound by each SM's own tensor
    cores, a step would take as long with 132 programs as with 16; if by something the SMs share (L2's
    bandwidth to them, or the board's power), it grows once P passes what that shares out. The bytes per
    second into the SMs at P programs is then P x (bytes of a step) / (time of a step).
    """
    real = tt.runtime.num_sms
    try:
        for label, (a, b), split in [
                ("dW = dY^T X [16384, 768, 3072]", (torch.randn(16384, 3072, device=dev, dtype=dt).t(),
                                                    torch.randn(16384, 768, device=dev, dtype=dt)), 3),
                ("X W^T [8192, 8192, 8192]", (torch.randn(8192, 8192, device=dev, dtype=dt),
                                              torch.randn(8192, 8192, device=dev, dtype=dt).t()), 1)]:
            M, K = a.shape
            N = b.shape[1]
            for programs in (16, 33, 66, 99, 132):
                tt.runtime.num_sms = lambda device, p=programs: p
                _forget_plans()
                us = timed(a, b, dict(TMA=True, SPLIT_K=split))
                cfg = mm._matmul_tma_kernel.best_config.kwargs
                bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
                items = -(-M // bm) * -(-N // bn) * split
                steps = -(-items // programs) * -(-K // (bk * split))  # steps of the busiest program
                step_us = us / steps
                gbps = min(programs, items) * (bm + bn) * bk * 2 / step_us / 1e3
                print(f"{label} split {split}, {programs:3d} programs ({bm}x{bn}x{bk}): {us:7.1f} us, "
                      f"{steps} steps on the busiest, {step_us * 1e3:5.0f} ns a step, {gbps / 1e3:4.1f} TB/s into "
                      f"the SMs, {2 * M * N * K / us / 1e6:4.0f} TFLOP/s", flush=True)
    finally:
        tt.runtime.num_sms = real
        _forget_plans()


def _sampled(label, fn, seconds=2.0):
    """Run `fn` back to back for `seconds` while nvidia-smi samples the SM clock and the board's power every
    50 ms; print the medians, the time per call and the energy per call (median power x time per call)."""
    import subprocess
    import time

    fn()
    torch.cuda.synchronize()
    fields = "clocks.sm,clocks.max.sm,power.draw,power.limit"
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    t0 = time.time()
    calls = 0
    while time.time() - t0 < seconds:
        for _ in range(20):
            fn()
        calls += 20
        torch.cuda.synchronize()
    elapsed = time.time() - t0
    smi.terminate()
    rows = [line.split(",") for line in smi.communicate()[0].splitlines() if line.strip()]
    busy = rows[8:-2]  # after the first 0.4 s of sampling, before the end
    sm = sorted(float(r[0]) for r in busy)
    power = sorted(float(r[2]) for r in busy)
    us = elapsed / calls * 1e6
    watts = power[len(power) // 2]
    print(f"{label}: {us:6.1f} us a call back to back; SM clock median {sm[len(sm) // 2]:.0f} MHz (min {sm[0]:.0f}, "
          f"max {sm[-1]:.0f}; the GPU's max {rows[0][1].strip()}), power median {watts:.0f} W of "
          f"{rows[0][3].strip()}, {watts * us / 1e3:.1f} mJ a call; {len(busy)} samples", flush=True)


def clocks():
    """The SM clock and the board's power while a GEMM runs back to back (`_sampled`): the TMA kernel with 16 or
    132 programs (does the step time of `busy_sms` grow with the programs because the clock falls?), then dW as
    the package runs it (pointers, split 3) and as cuBLAS does, on all SMs: the energy each spends."""
    real = tt.runtime.num_sms
    cases = [("X W^T [8192, 8192, 8192]", torch.randn(8192, 8192, device=dev, dtype=dt),
              torch.randn(8192, 8192, device=dev, dtype=dt).t(), 1),
             ("dW = dY^T X [16384, 768, 3072]", torch.randn(16384, 3072, device=dev, dtype=dt).t(),
              torch.randn(16384, 768, device=dev, dtype=dt), 3)]
    try:
        for label, a, b, split in cases:
            for programs in (16, 132):
                tt.runtime.num_sms = lambda device, p=programs: p
                _forget_plans()
                saved = (mm.TMA, mm.SPLIT_K)
                mm.TMA, mm.SPLIT_K = True, split
                try:
                    _sampled(f"{label}, TMA kernel, {programs:3d} programs", lambda: mm.matmul(a, b))
                finally:
                    mm.TMA, mm.SPLIT_K = saved
    finally:
        tt.runtime.num_sms = real
        _forget_plans()
    label, a, b, _ = cases[1]
    _sampled(f"{label}, the package's choice", lambda: mm.matmul(a, b))
    _sampled(f"{label}, cuBLAS", lambda: torch.matmul(a, b))


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    if "layouts" in sys.argv:
        layouts()
        sys.exit()
    if "sms" in sys.argv:
        busy_sms()
    if "clocks" in sys.argv:
        clocks()
    if "sms" in sys.argv or "clocks" in sys.argv:
        sys.exit()
    for m, k, n in ([16384, 768, 3072], [16384, 3072, 768]):
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
        dy = torch.randn(m, n, device=dev, dtype=dt)
        products = {"dW = dY^T X": (dy.t(), x)}
        if "dw-only" not in sys.argv:
            products["dX = dY W"] = (dy, w)
        for name, (a, b) in products.items():
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            ref = torch.matmul(a, b).float()
            for label, spec in variants(a, b, name.startswith("dW")):
                us = timed(a, b, spec)
                print(f"[{m}, {k}, {n}] {name:12s} {label:18s} {us:7.1f} us {flops / us / 1e6:6.0f} TFLOP/s", flush=True)
            ours = mm.matmul(a, b)[0]
            err = (ours.float() - ref).abs().max().item()
            same = torch.equal(ours, mm.matmul(a, b)[0])
            print(f"    package vs cuBLAS max |diff| {err:.3g}, bit-identical on a second call: {same}")
