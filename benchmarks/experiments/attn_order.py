"""Probe: causal attention with its programs started longest first across all heads, against per head. (GPU)

    git show c623612:triton_transformer/attention.py \
        | sed 's/^from \.dropout import/from triton_transformer.dropout import/; s/^from \.runtime import/from triton_transformer.runtime import/' \
        > benchmarks/experiments/_old_attention.py      # the module before the change, not committed
    python3 benchmarks/experiments/attn_order.py

Causal blocks differ in work (the last query block attends to every key block, the first to one), and the GPU
starts programs in launch order, the grid's first axis fastest. The module before read the grid as (block, head,
batch) with each head's blocks longest first: the last heads' longest blocks then start last. The package now
reads the launch index with the block varying slowest (`attention._causal_program`): every head's longest block
first. Here both modules run side by side in one process, bf16, causal, forward and forward+backward, GPU time
(each call recorded as a CUDA graph after an L2 flush, `bench.measure_gpu_ms`) in alternating rounds, with SDPA's
beside them; outputs and gradients are compared bit for bit.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, two rounds), GPU us of the forward, old / new / SDPA:

    [8, 12, 1024, 64]     49.5 49.2 / 44.9 45.2 / 46.5 47.1
    [4, 16, 4096, 64]     355.1 355.5 / 338.9 339.6 / 330.2 332.5
    [4, 16, 4096, 128]    610.1 639.4 / 631.1 640.1 / 473.8 475.0

Outputs and gradients bit-identical at all three shapes. The forward+backward calls could not be recorded in that
run (`measure_gpu_ms` gave None for all three providers), nor in a re-run with autograd's multithreading off
(as `bench.run_case` runs it), which repeated the forward's numbers (49.6 49.3 / 44.8 44.8 / 46.5 46.7;
354.6 358.1 / 339.3 339.0 / 330.6 331.5; 615.7 622.8 / 635.4 644.4 / 481.3 477.4): the cause is not known.
`attn_group.py`, which takes the gradients with `torch.autograd.grad` instead of `.backward`, records them, and
compares more orders. The package's `benchmarks/run.py
attention` rows, run just before on another machine with the new order, read 0.1805 ms of GPU time at
[8, 12, 1024, 64] against SDPA's 0.2015 (0.1986 against 0.2011 in the committed run before the change),
1.4617 against 1.2789 at [4, 16, 4096, 64] (1.4865 against 1.2848) and 2.6805 against 2.0353 at
[4, 16, 4096, 128] (2.6684 against 2.0616). The simulation that prompted it (greedy list scheduling, work
proportional to each block's key blocks, 132 to 396 programs in flight) put the old order's last program
10-60% above the ideal finish at 1024 tokens and 3-23% at 4096, longest-first 0-7%.
"""
import sys

import torch
import torch.nn.functional as F

import triton_transformer as tt  # noqa: F401  (first: GPU or interpreter)
from triton_transformer.bench import measure_gpu_ms

new = sys.modules["triton_transformer.attention"]
try:
    import _old_attention as old
except ImportError:
    sys.exit("make _old_attention.py first: see this file's docstring")

dev = tt.runtime.DEVICE


def main():
    # Backward on the calling thread, as `bench.run_case` runs every provider. With autograd's device thread in
    # use, this probe's forward+backward rounds came back unmeasured (measure_gpu_ms gave None): the likely cause,
    # not checked by a re-run.
    torch.autograd.set_multithreading_enabled(False)
    for shape in ([8, 12, 1024, 64], [4, 16, 4096, 64], [4, 16, 4096, 128]):
        torch.manual_seed(0)
        q, k, v = (torch.randn(*shape, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
        leaves = [q, k, v]
        results = {}
        for name, mod in (("old", old), ("new", new)):
            o = mod.attention(q, k, v, causal=True)
            grads = torch.autograd.grad(o, leaves, do)
            results[name] = (o.detach(), grads)
        same = torch.equal(results["old"][0], results["new"][0]) and all(
            torch.equal(a, b) for a, b in zip(results["old"][1], results["new"][1]))
        print(f"{shape}: outputs and gradients bit-identical: {same}", flush=True)
        cases = {
            "old fwd": lambda: old.attention(q, k, v, causal=True),
            "new fwd": lambda: new.attention(q, k, v, causal=True),
            "sdpa fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "old fwdbwd": lambda: old.attention(q, k, v, causal=True).backward(do),
            "new fwdbwd": lambda: new.attention(q, k, v, causal=True).backward(do),
            "sdpa fwdbwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do),
        }
        for fn in cases.values():  # compiled and tuned before anything is recorded
            for _ in range(3):
                fn()
                for t in leaves:
                    t.grad = None
        times = {name: [] for name in cases}
        for _ in range(2):
            for name, fn in cases.items():
                ms = measure_gpu_ms(fn, leaves)
                times[name].append(float("nan") if ms is None else 1e3 * ms)
        for name in cases:
            print(f"{shape} {name:12s} GPU us " + " ".join(f"{t:.1f}" for t in times[name]), flush=True)


if __name__ == "__main__":
    main()
