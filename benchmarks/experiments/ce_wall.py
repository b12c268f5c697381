"""Probe: cross-entropy's forward+backward as a call from Python, before and after the pre-pass and the loss sum
were reworked. (GPU)

    git show a26ce69:triton_transformer/cross_entropy.py \
        | sed 's/^from \.runtime/from triton_transformer.runtime/; s/^from \.softmax/from triton_transformer.softmax/' \
        > benchmarks/experiments/_old_ce.py      # the module before the change, not committed
    cd benchmarks/experiments && python3 ce_wall.py [trace]

Before, a call queued: a zeroed two-int buffer (a fill kernel), the pre-pass counting targets into it with
atomics, the counts' copy to the host on the main stream, the main kernel, and a reduction kernel summing the
per-row losses; the host worked out the main kernel's parameters between the copy and its launch. After: the
pre-pass writes each program's counts to slots of its own (no zeroing), the main kernel is queued right behind it,
the copy runs on a side stream that waits for the pre-pass only, and the main kernel sums the loss itself (each
program its rows, the last program to finish the programs' sums, in a fixed order). Timed side by side in one
process at (8192, V), bf16: do_bench medians (three rounds, L2 flushed), the GPU's time (the call recorded as a
CUDA graph, `bench.measure_gpu_ms`), and calls back to back. `trace` prints the GPU's timeline of three
flushed calls (torch.profiler).

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0), two runs on two lent machines whose hosts were
noisy (do_bench rounds spread by up to 50% at the host-bound width, 256):

    V        do_bench us: old / new / torch.compile      GPU us: old / new    back to back us: old / new
    50304    613.5-698.7 / 599.9-679.4 / 1174.5-1174.8    605.3 / 598.1        614.7 / 624.5
             610.3-616.9 / 603.9-646.9 / 1168.6-1169.0    598.0 / 597.4        642.9 / 634.5
    256      389.7-731.9 / 512.9-835.4 / 485.9-893.0      16.9 / 13.0          603.1 / 640.9
             319.9-536.1 / 392.1-690.6 / 371.3-555.5      18.1 / 15.2          697.8 / 797.8
    32000    457.1-802.5 / 603.6-980.2 / 1011.5-1012.7    402.8 / 375.0        743.6 / 497.4
             703.7-738.0 / 761.5-929.6 / 1011.4-1012.4    407.5 / 377.2        543.1 / 955.4

The GPU's time fell at every width (at 50304 by 0.6-7 us, at 32000 by 28-30); the wall times moved within the
hosts' noise. Twice torch.compile at 50304 would need 584-587 us of wall time, and the main kernel alone took
593-598 us in the second run's trace. The trace before the change (50304): after do_bench's flush the fill ran,
the pre-pass started 11 us later, the copy 37 us after that and the main kernel 132 us after the copy (the host
working out its launch while the GPU waited; the profiler slows the host), then 586-591 us of main kernel,
3.7-4.5 us of loss sum, 1.0 us of autograd's ones and 1.6 us of the backward's scale kernel. At V = 256 the
host set the pace: 43 us from the main kernel to the sum, 109 more to the backward's ones, 190 to its scale
kernel. After the change, under the same profiler, the host still left 75-180 us between the pre-pass and the
main kernel at 50304 (Event, launch), and the copy (1.4-7.1 us) ran beside the main kernel.
"""
import sys
import time

import torch
import triton.testing

import triton_transformer as tt  # noqa: F401  (first: GPU or interpreter)
from triton_transformer.bench import measure_gpu_ms

new = sys.modules["triton_transformer.cross_entropy"]
try:
    import _old_ce as old
except ImportError:
    sys.exit("make _old_ce.py first: see this file's docstring")

dev = tt.runtime.DEVICE


def trace(logits, target):
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=dev)

    def call():
        logits.grad = None
        new.cross_entropy(logits, target).backward()

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            flush.zero_()
            call()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    t0 = events[0].time_range.start
    for e in events:
        print(f"  {e.name[:60]:60s} start {e.time_range.start - t0:9.1f} us, {e.time_range.elapsed_us():7.1f} us")


def main():
    for V in (50304, 256, 32000):
        logits = torch.randn(8192, V, device=dev, dtype=torch.bfloat16, requires_grad=True)
        target = torch.randint(0, V, (8192,), device=dev)
        compiled = torch.compile(lambda x, t: torch.nn.functional.cross_entropy(x.float(), t))
        cases = {"old": lambda: old.cross_entropy(logits, target).backward(),
                 "new": lambda: new.cross_entropy(logits, target).backward(),
                 "compile": lambda: compiled(logits, target).backward()}
        print(f"V={V} loss old {old.cross_entropy(logits.detach(), target).item()}, "
              f"new {new.cross_entropy(logits.detach(), target).item()}", flush=True)
        times = {name: [] for name in cases}
        for _ in range(3):
            for name, fn in cases.items():
                times[name].append(1e3 * triton.testing.do_bench(fn, grad_to_none=[logits], return_mode="median"))
        for name in cases:
            print(f"V={V} {name:8s} do_bench us " + " ".join(f"{t:.1f}" for t in times[name]), flush=True)
        for name in ("old", "new"):
            print(f"V={V} {name:8s} GPU (graph) us {1e3 * measure_gpu_ms(cases[name], [logits]):.1f}", flush=True)
        for name, fn in cases.items():
            for _ in range(10):
                logits.grad = None
                fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(300):
                logits.grad = None
                fn()
            torch.cuda.synchronize()
            print(f"V={V} {name:8s} back to back {(time.perf_counter() - start) / 300 * 1e6:.1f} us", flush=True)
        if "trace" in sys.argv:
            trace(logits, target)


if __name__ == "__main__":
    main()
