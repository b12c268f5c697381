"""Host time of one `linear` call at the benchmark's shape, against F.linear: where do the CPU's microseconds go?

    python3 benchmarks/experiments/linear_host.py [pointers] [pieces] [busy] [tiny] [backlog] [timeline] [profile]

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

`busy` times the calls behind a 2 ms sleep kernel (does any wait for the GPU?), `tiny` on 64 rows many in a
row (the host's pace alone), `backlog` at the real shape with 40 calls queued behind a ~100 ms sleep kernel
(host time only, nothing waits) next to pieces of the call, and `timeline` stamps where a backlogged
forward+backward's time goes. Measured on two later machines (same GPU and versions), us per call:

    backlog    ours 743 and 1015, F.linear 204 and 236; a Function with linear's inputs and outputs that
               does no work 138 and 154; our three matmul() calls without autograd 276 and 292 (the
               forward's 88-95, dW's 108-109); the checks 6.5-7.4; one torch.empty 9.0-9.1
    timeline   entry to the Function's forward 48, forward body 198, forward's end to backward's start 111
               (autograd's engine), backward body 357, backward's end to the return 88
    tiny       ours 550, F.linear 179 (busy: ours 802, F.linear 386, against 687 and 228 idle)

The bodies take about twice what their calls take alone in a loop (198 against ~95 for one matmul, 357
against ~200 for two), and the engine's share (~250 us around the bodies) is about twice the do-nothing
Function's: the same Python runs slower inside the full call on these hosts. Backlogged and idle times are alike (743
against 825 on one machine): our call does not wait for the GPU.

After `matmul` kept its decisions per kind of call (`matmul._Plan`) and launched through `runtime.launch_memo`,
on a third machine whose host was slower still (the do-nothing Function 178, F.linear 274, one torch.empty
12.6): our three matmul() calls 187 (the forward's 63, dW's 73), against 276-292 (88-95, 108-109) before;
the whole forward+backward 887 backlogged, the forward body 159 and the backward body 316 (198 and 357
before). Against the do-nothing Function our call went from 5.4-6.6 times its cost to 5.0.
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
    if "busy" in sys.argv:  # the same calls with the GPU busy for ~2 ms first: does any of them wait for it?
        def busy(fn):
            return lambda: (torch.cuda._sleep(2_000_000), fn())
        for name in ("tt fwd", "F fwd", "tt fwd+bwd", "F fwd+bwd"):
            print(f"{name + ', GPU busy':22s} {host_us(busy(cases[name])):8.1f} us (a sleep kernel's launch included)")
        print(f"{'sleep launch alone':22s} {host_us(lambda: torch.cuda._sleep(2_000_000)):8.1f} us")
    if "tiny" in sys.argv:  # the calls on 64 rows, many in a row without a synchronize: the host's pace alone
        from host_cliff import host_us as pace_us
        xs = torch.randn(64, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dys = torch.randn(64, N, device=dev, dtype=torch.bfloat16)
        def small(f):
            def call():
                f(xs, w).backward(dys)
                xs.grad = w.grad = None
            return call
        print(f"{'tt fwd+bwd, 64 rows':22s} {pace_us(small(tt.linear), 500):8.1f} us per call")
        print(f"{'F fwd+bwd, 64 rows':22s} {pace_us(small(F.linear), 500):8.1f} us per call")
    if "backlog" in sys.argv:  # host time at the real shape: the calls queue behind a long sleep kernel
        mm = sys.modules["triton_transformer.matmul"]
        xd, wd = x.detach(), w.detach()

        class Skel(torch.autograd.Function):  # linear's autograd shape, no work: what any Function pays
            @staticmethod
            def forward(ctx, x, w):
                ctx.save_for_backward(x, w)
                return x.new_empty((x.shape[0], w.shape[0]))

            @staticmethod
            def backward(ctx, g):
                x, w = ctx.saved_tensors
                return torch.empty_like(x), torch.empty_like(w)

        def three():  # the forward's and backward's products, no autograd
            mm.matmul(xd, wd.t())
            mm.matmul(dy, wd)
            mm.matmul(dy.t(), xd)

        backlog_cases = {
            "tt fwd+bwd": cases["tt fwd+bwd"], "F fwd+bwd": cases["F fwd+bwd"],
            "skel fwd+bwd": lambda: (Skel.apply(x, w).backward(dy), reset()),
            "3 matmul()": three, "matmul() fwd": lambda: mm.matmul(xd, wd.t()),
            "matmul() dW": lambda: mm.matmul(dy.t(), xd),
            "check_layer": lambda: mm._check_layer("linear", x, None, "x", w, None),
            "torch.empty": lambda: torch.empty((M, N), dtype=xd.dtype, device=dev),
        }
        for name, fn in backlog_cases.items():
            rounds = []
            for _ in range(5):
                torch.cuda.synchronize()
                torch.cuda._sleep(200_000_000)  # ~100 ms of GPU time: every launch below queues behind it
                t = time.perf_counter()
                for _ in range(40):
                    fn()
                rounds.append((time.perf_counter() - t) / 40 * 1e6)
            torch.cuda.synchronize()
            print(f"{name + ', backlogged':24s} {statistics.median(rounds):8.1f} us per call")
    if "timeline" in sys.argv:  # where a backlogged forward+backward's host time goes, by timestamps
        mm = sys.modules["triton_transformer.matmul"]
        stamps = {}
        fwd, bwd = mm.LinearFunction.forward, mm.LinearFunction.backward

        def stamped(name, f):
            def g(*args):
                stamps[name + " in"] = time.perf_counter()
                out = f(*args)
                stamps[name + " out"] = time.perf_counter()
                return out
            return staticmethod(g)

        mm.LinearFunction.forward, mm.LinearFunction.backward = stamped("fwd", fwd), stamped("bwd", bwd)
        order = ["start", "fwd in", "fwd out", "bwd in", "bwd out", "end"]
        gaps = {f"{a} -> {b}": [] for a, b in zip(order, order[1:])}
        for _ in range(5):
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)
            for _ in range(40):
                stamps["start"] = time.perf_counter()
                tt.linear(x, w).backward(dy)
                stamps["end"] = time.perf_counter()
                reset()
                for a, b in zip(order, order[1:]):
                    gaps[f"{a} -> {b}"].append((stamps[b] - stamps[a]) * 1e6)
        torch.cuda.synchronize()
        mm.LinearFunction.forward, mm.LinearFunction.backward = staticmethod(fwd), staticmethod(bwd)
        for name, us in gaps.items():
            print(f"{name:18s} {statistics.median(us):8.1f} us (median of {len(us)})")
    if "profile" in sys.argv:
        fn = cases["tt fwd+bwd"]
        pr = cProfile.Profile()
        for _ in range(200):
            torch.cuda.synchronize()
            pr.enable()
            fn()
            pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
