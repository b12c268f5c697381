"""Probe: when does a forward+backward's host time set do_bench's wall time, and where does layer norm's go?

    python3 benchmarks/experiments/host_cliff.py [profile]

do_bench runs, per repetition: zero a 256 MB buffer (the L2 flush, some 60-90 us of GPU time by the numbers
below), record a start
event, call fn, record an end event. While the GPU zeroes, the host runs ahead into fn; if the host's
time per repetition is shorter than the GPU's (flush + fn's kernels), launches queue up and the time
measured is the kernels'. If it is longer, the GPU waits on every launch and the time measured is about
the host's time for fn less the flush it hid. `cliff` checks that model with a synthetic fn: a host spin
of H us around one `torch.cuda._sleep(60000)` kernel (34 us at the H100's boost clock; the first timing
below, 182 us, caught the GPU at a low clock). `ln` times layer norm's fwd+bwd at (16384, 768) by do_bench
next to its host time (the same calls at 64 rows, GPU time negligible) and the pieces of it.

Measured (H100 80GB HBM3 machine, torch 2.11.0+cu130, Triton 3.6.0, one process). do_bench of the synthetic
call for H = 0, 50, 100, 125, 150, 175, 200, 250, 300 us of host time: 33.9, 33.9, 40.9, 65.6, 93.8, 126.1,
141.3, 225.2, 255.2 us. Layer norm at 64 x 768, host time per forward+backward: eager 100.1 us, the Skel
floor 84.7, ours 232.2; of ours, layer_norm_forward 25.9, layer_norm_backward 49.9 (two launches),
_check_args 4.0, an empty_like 2.0. At 16384 x 768 do_bench read eager 152.4 us, ours 148.2 (0.060 ms of
GPU time): ours sits past the cliff, its host time less what the flush hid. cProfile: 3 launches a call at
about 32 us each under the profiler (our launcher 8 us of it, Triton's CudaLauncher.__call__ 11.5), the
autograd engine 42 us.
"""
import cProfile
import pstats
import sys
import time

import torch
import triton.testing

import triton_transformer as tt
from triton_transformer import layernorm as L
from triton_transformer import runtime

dev = runtime.DEVICE
F = torch.nn.functional


def spin(us):
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def host_us(fn, n=1000):
    """Per-call time of fn with the GPU never the bottleneck (fn's kernels must be tiny)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n // 5):
            fn()
        times.append((time.perf_counter() - t) / (n // 5) * 1e6)
        torch.cuda.synchronize()
    return sorted(times)[2]


def wall_ms(fn, grads=()):
    return triton.testing.do_bench(fn, grad_to_none=list(grads), return_mode="median")


def cliff():
    # cycles for ~60 us of _sleep at the GPU's clock
    cycles = 60_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    kernel_us = start.elapsed_time(end) * 100
    print(f"_sleep({cycles}): {kernel_us:.1f} us of GPU time")
    for h in (0, 50, 100, 125, 150, 175, 200, 250, 300):
        def fn(h=h):
            spin(h / 2)
            torch.cuda._sleep(cycles)
            spin(h / 2)
        print(f"host {h:3d} us + kernel: do_bench {wall_ms(fn) * 1e3:7.1f} us")


class Skel(torch.autograd.Function):
    """layer_norm's autograd shape with no work: the floor any Function pays (host_split.py uses it too)."""
    @staticmethod
    def forward(ctx, x, w, b, n_rows, n_cols, eps, od):
        y = torch.empty_like(x)
        ctx.save_for_backward(x, w, y, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, m, r = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w), torch.empty_like(w), None, None, None, None


def ln():
    dt = torch.bfloat16
    for rows in (64, 16384):
        x = torch.randn(rows, 768, device=dev, dtype=dt, requires_grad=True)
        w = torch.randn(768, device=dev, dtype=dt, requires_grad=True)
        b = torch.randn(768, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn_like(x)
        cases = {
            "eager": lambda: F.layer_norm(x, (768,), w, b).backward(dy),
            "skel": lambda: Skel.apply(x, w, b, rows, 768, 1e-5, None).backward(dy),
            "triton": lambda: tt.layer_norm(x, (768,), w, b).backward(dy),
        }
        for name, fn in cases.items():
            def call(fn=fn):
                fn()
                x.grad = w.grad = b.grad = None
            line = f"rows {rows:5d} {name:7s}"
            if rows == 64:
                line += f" host {host_us(call):6.1f} us"
            else:
                line += f" do_bench {wall_ms(fn, (x, w, b)) * 1e3:6.1f} us"
            print(line)
    x = torch.randn(64, 768, device=dev, dtype=dt)
    w = torch.randn(768, device=dev, dtype=dt)
    b = torch.randn(768, device=dev, dtype=dt)
    _, mean, rstd = L.layer_norm_forward(x, w, b, 1e-5, store_stats=True)
    pieces = {
        "layer_norm_forward": lambda: L.layer_norm_forward(x, w, b, 1e-5, store_stats=True),
        "layer_norm_backward": lambda: L.layer_norm_backward(x, x, w, mean, rstd, 1e-5),
        "_check_args": lambda: L._check_args(x, (768,), w, b, None),
        "torch.empty_like": lambda: torch.empty_like(x),
        "torch.empty(n, f32)": lambda: torch.empty(64, dtype=torch.float32, device=dev),
    }
    for name, fn in pieces.items():
        print(f"  {name:22s} {host_us(fn):6.1f} us")
    if "profile" in sys.argv:
        xg = x.clone().requires_grad_()
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2000):
            tt.layer_norm(xg, (768,), wg, bg).backward(x)
            xg.grad = wg.grad = bg.grad = None
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    torch.autograd.set_multithreading_enabled(False)
    cliff()
    ln()
