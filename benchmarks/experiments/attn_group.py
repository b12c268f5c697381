"""Probe: the order causal programs start in, longest block first within groups of G (batch, head) pairs. (GPU)

    python3 benchmarks/experiments/attn_group.py

`attention._causal_program` reads the launch index with the block varying slowest within a group of G
(batch, head) pairs (`attention._head_group` picks G; here it is replaced by each G in turn, 0 standing for one
group of all the pairs). G = 1 is the order before `attn_order.py`'s change (each head's blocks longest first,
head after head); G = 0 the order that change brought in (the longest blocks of every head first). Small groups keep the programs running together on few
heads, whose K and V can stay in L2; large ones leave the GPU fewer long programs to end on. Here every G runs
side by side in one process, bf16, causal, forward and forward+backward (`torch.autograd.grad`), GPU time (each
call recorded as a CUDA graph after an L2 flush, `bench.measure_gpu_ms`) in alternating rounds; the autotuner's
picks are shared (the group is a runtime argument), and outputs and gradients are compared bit for bit with
the first's.
"""
import sys

import torch

import triton_transformer as tt  # noqa: F401  (first: GPU or interpreter)
from triton_transformer.bench import measure_gpu_ms

A = sys.modules["triton_transformer.attention"]
dev = tt.runtime.DEVICE
package_pick = A._head_group


GROUPS = ["pick", 0, 1, 4, 8, 16, 32]  # "pick": the package's own choice (`_head_group`)
ROUNDS = 2
DTYPE = torch.bfloat16 if dev.type == "cuda" else torch.float16  # the interpreter runs a small shape to check the probe


def use_group(g):
    A._head_group = package_pick if g == "pick" else lambda q, n_rows: g or q.shape[0] * q.shape[1]


def main():
    torch.autograd.set_multithreading_enabled(False)  # backward on the calling thread, as bench.run_case runs it
    shapes = [[8, 12, 1024, 64], [4, 16, 4096, 64], [4, 16, 4096, 128]]
    if len(sys.argv) > 1:
        shapes = [[int(x) for x in s.split(",")] for s in sys.argv[1:]]
    for shape in shapes:
        torch.manual_seed(0)
        q, k, v = (torch.randn(*shape, device=dev, dtype=DTYPE, requires_grad=True) for _ in range(3))
        do = torch.randn(*shape, device=dev, dtype=DTYPE)
        leaves = (q, k, v)

        def fwd():
            with torch.no_grad():
                return A.attention(q, k, v, causal=True)

        def fwdbwd():
            return torch.autograd.grad(A.attention(q, k, v, causal=True), leaves, do)

        reference = None
        for g in GROUPS:  # compile and tune before anything is timed
            use_group(g)
            out = (fwd(), *fwdbwd())
            if reference is None:
                reference = out
            same = all(torch.equal(a, b) for a, b in zip(out, reference))
            print(f"{shape} G={g} ({A._head_group(q, shape[2])}): output and gradients equal to the first's: {same}", flush=True)
        times = {(g, p): [] for g in GROUPS for p in ("fwd", "fwdbwd")}
        for _ in range(ROUNDS):
            for g in GROUPS:
                use_group(g)
                for p, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                    ms = measure_gpu_ms(fn) if dev.type == "cuda" else None
                    times[g, p].append(float("nan") if ms is None else 1e3 * ms)
        for p in ("fwd", "fwdbwd"):
            for g in GROUPS:
                print(f"{shape} {p:7s} G={g:<4} GPU us " + " ".join(f"{t:7.1f}" for t in times[g, p]), flush=True)
        A._head_group = package_pick


if __name__ == "__main__":
    main()
