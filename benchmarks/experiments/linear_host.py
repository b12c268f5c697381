"""Host time of one `linear` call at the benchmark's shape, against F.linear: where do the CPU's microseconds go?

    python3 benchmarks/experiments/linear_host.py [profile]

The benchmark's linear forward+backward at [16384, 768, 3072] takes 0.35-0.72 ms of wall time over the
committed runs for the same 0.35 ms of GPU time, so some runs are host-bound. Each call here is timed
on the CPU alone: the GPU is idle before it (synchronize), and a call's few launches return at once, so
perf_counter around it measures what the host spends. Medians of 50 calls; `profile` adds cProfile's
top functions for 200 forward+backward calls of ours; `pointers` repeats ours on the pointer kernel (no TMA
descriptors to build), `pieces` times one forward's parts without autograd.

Measured (H100 80GB HBM3 machine, torch 2.11.0+cu130, Triton 3.6.0), two processes on one machine:
ours forward 166 and 93 us against F.linear's 19 and 18; forward+backward 433 and 817 against 142 and
185; with GELU 605 and 776 against 207 and 334. Without TMA, ours took 79 us forward and 505
forward+backward (against 93 and 817 with it, same process): the three descriptors cost 14 us to build
and the launcher some more to encode, not most of the time. cProfile: about 550 Python calls per
forward+backward, none of them dominant (the autograd engine, `matmul`'s own lines, the launcher,
`torch.empty`). So a host this slow makes a lone projection's call host-bound whatever one trims; the
training step avoids it by replaying the whole step as a CUDA graph.
"""
import cProfile
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import triton_transformer as tt

dev = tt.runtime.DEVICE
M, K, N = 16384, 768, 3072
x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)


def reset():
    x.grad = w.grad = None


cases = {
    "tt fwd": lambda: tt.linear(x, w),
    "F fwd": lambda: F.linear(x, w),
    "tt fwd+bwd": lambda: (tt.linear(x, w).backward(dy), reset()),
    "F fwd+bwd": lambda: (F.linear(x, w).backward(dy), reset()),
    "tt gelu fwd+bwd": lambda: (tt.linear(x, w, activation="gelu").backward(dy), reset()),
    "F gelu fwd+bwd": lambda: (F.gelu(F.linear(x, w), approximate="tanh").backward(dy), reset()),
}


def host_us(fn, n=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    for name, fn in cases.items():
        print(f"{name:18s} {host_us(fn):8.1f} us of host time per call")
    if "pointers" in sys.argv:  # the same calls on the pointer kernel: what the TMA descriptors cost the host
        mm = sys.modules["triton_transformer.matmul"]
        mm.TMA = False
        for name in ("tt fwd", "tt fwd+bwd"):
            print(f"{name + ', no TMA':18s} {host_us(cases[name]):8.1f} us of host time per call")
        mm.TMA = "auto"
    if "pieces" in sys.argv:  # one forward's pieces, no autograd
        mm = sys.modules["triton_transformer.matmul"]
        xd, wt = x.detach(), w.detach().t()
        print(f"{'matmul() alone':18s} {host_us(lambda: mm.matmul(xd, wt)):8.1f} us")
        descriptors = lambda: (mm._tma_operand(xd), mm._tma_operand(wt), mm._tma_output(dy))  # noqa: E731
        print(f"{'3 descriptors':18s} {host_us(descriptors):8.1f} us")
        print(f"{'torch.empty':18s} {host_us(lambda: torch.empty((M, N), dtype=xd.dtype, device=dev)):8.1f} us")
    if "profile" in sys.argv:
        fn = cases["tt fwd+bwd"]
        pr = cProfile.Profile()
        for _ in range(200):
            torch.cuda.synchronize()
            pr.enable()
            fn()
            pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
