"""Probe: the order causal programs start in, longest block first within groups of G (batch, head) pairs. (GPU)

    python3 benchmarks/experiments/attn_group.py [B,H,N,D ...] [G=pick,0,16,...]

`attention._causal_program` reads the launch index with the block varying slowest within a group of G
(batch, head) pairs (`attention._head_group` picks G; here it is replaced by each G in turn, 0 standing for one
group of all the pairs). G = 1 is the order before `attn_order.py`'s change (each head's blocks longest first,
head after head); G = 0 the order that change brought in (the longest blocks of every head first). Small groups
keep the programs running together on few heads, whose K and V can stay in L2; large ones leave the GPU fewer long
programs to end on. Here every G runs
side by side in one process, bf16, causal, forward and forward+backward (`torch.autograd.grad`), GPU time (each
call recorded as a CUDA graph after an L2 flush, `bench.measure_gpu_ms`) in alternating rounds; the autotuner's
picks are shared (the group is a runtime argument), and outputs and gradients are compared bit for bit with
the first's.
Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0), GPU us, two runs on two machines of two rounds each
(the first run without "pick" and with G = 2; its G = 0 is the package as it was before `_head_group`):

    forward+backward   [8, 12, 1024, 64]         [4, 16, 4096, 64]            [4, 16, 4096, 128]
    pick               189.1 189.0               1437.1 1461.5                2638.1 2635.8
    G=0                182.6 184.7 189.6 189.7   1475.2 1468.1 1457.6 1465.8  2704.7 2800.2 2785.9 2762.1
    G=1                210.0 215.3 218.6 218.4   1503.1 1491.8 1492.5 1498.8  2659.2 2680.4 2674.3 2668.0
    G=4                212.3 212.4 219.0 216.6   1487.5 1483.6 1482.9 1472.7  2550.6 2558.9 2596.4 2577.5
    G=8                210.2 210.6 215.1 215.0   1456.1 1456.6 1437.2 1427.1  2616.3 2592.8 2593.6 2581.0
    G=16               200.5 200.6 203.2 205.9   1439.6 1425.9 1430.8 1427.7  2592.2 2630.8 2631.5 2594.5
    G=32               197.3 197.5 201.0 202.0   1452.8 1457.0 1464.7 1422.6  2700.3 2687.1 2680.7 2678.8

    forward            [8, 12, 1024, 64]         [4, 16, 4096, 64]            [4, 16, 4096, 128]
    pick               45.2 45.6                 332.2 345.3                  625.3 647.0
    G=0                47.9 48.2 45.9 45.9       339.7 348.6 346.1 351.2      623.8 660.0 674.6 682.0
    G=1                57.1 57.8 51.3 51.2       379.8 383.5 361.8 368.1      641.6 641.6 663.1 637.3
    G=4                56.9 56.6 50.6 50.4       365.7 365.4 357.4 357.2      601.1 610.9 613.2 606.0
    G=16               53.7 54.1 48.1 48.3       343.2 346.1 341.0 337.9      609.5 644.3 646.0 620.6

The package picks all 96 heads at (8, 12, 1024, 64), 25 at (4, 16, 4096, 64) and 12 at (4, 16, 4096, 128) (half of
the H100's 50 MB L2 over 2 x N x D x 2 bytes of K and V a head). Every order gave bit-identical outputs and
gradients. One group of all wins where every head's K and V fit in L2 (1024 tokens: 24 MB); at 4096 tokens groups
of 4 to 16 heads win, by up to 7% at heads of 128, where one group of all was even slower than a head at a time.

Then `_head_group` made its groups even (as few as hold at most what fits, all of one size but the last). Same GPU
and versions, one run of two rounds each:

    forward+backward   [16, 8, 1024, 64]   [16, 12, 1024, 64]   [4, 16, 4096, 64]   [4, 16, 4096, 128]
    pick (before)      263.2 261.8 (100)   374.9 375.5 (100)
    pick (even)                                                  1423.9 1445.8 (22)  2625.4 2616.7 (11)
    G=0                257.5 256.6         399.2 399.9
    G=64               249.6 250.7         366.0 366.5
    G=96               255.3 254.7         369.8 369.2
    G=16 / G=4                                                   1427.7 1439.4       2604.6 2676.3
    G=25 / G=12                                                  1456.6 1458.4       2704.9 2675.5

With 100 heads and a short last group of 28, the seed model's shape took 5% longer than with two groups of 64,
which the even rule picks; at (16, 12, 1024, 64) it picks two groups of 96.
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
    global GROUPS
    shapes = [[8, 12, 1024, 64], [4, 16, 4096, 64], [4, 16, 4096, 128]]
    args = sys.argv[1:]
    for a in [a for a in args if a.startswith("G=")]:
        GROUPS = [g if g == "pick" else int(g) for g in a[2:].split(",")]
        args.remove(a)
    if args:
        shapes = [[int(x) for x in s.split(",")] for s in args]
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
            print(f"{shape} G={g} ({A._head_group(q, shape[2])}): output and gradients equal to the first's: {same}",
                  flush=True)
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
