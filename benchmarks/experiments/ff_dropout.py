"""What dropping the feed-forward's hidden layer inside the first GEMM's epilogue buys (GPU).

    python3 benchmarks/experiments/ff_dropout.py

1. The seed model's training step with dropout 0.1 (bench.transformer's case, replayed as a CUDA graph),
   with `transformer.FUSED_FEED_FORWARD` on (one `feed_forward` node, dropout in the epilogue) and off
   (linear, dropout, linear), in alternating rounds.
2. One feed-forward at the seed model's widths (16384 x 512 -> 2048), GPU time per call (a CUDA graph,
   bench.measure_gpu_ms): forward and forward+backward at p = 0 and p = 0.1, fused and composed, so the
   epilogue's cost (Philox on every hidden element) shows next to the passes it removes.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16, p = 0.1; as chapter 3's section on the
feed-forward reports them): one feed-forward's forward+backward 426 us fused, 511 as three calls (linear,
dropout, linear), 378 without dropout; in the forward the epilogue's Philox added 49 us to the GEMM, against
46 for the dropout kernel it replaces. The training step: 8.95 ms fused against 9.35 as three calls (three
alternating rounds each).
"""
import functools

import torch

import triton_transformer as tt
from triton_transformer import bench, runtime
from triton_transformer import transformer as T
from triton_transformer.bench import transformer as BT

device, dtype = runtime.DEVICE, torch.bfloat16
print(bench.versions())

# 1. the training step: one recorded step per setting (a replay runs the kernels recorded under it)
steps = {}
for fused in (True, False):
    T.FUSED_FEED_FORWARD = fused
    steps[fused] = BT._case(BT.SHAPES[0], dtype, device, BT.DROPOUT).providers["triton"]
    steps[fused].prepare()
T.FUSED_FEED_FORWARD = True
times = {True: [], False: []}
for _ in range(3):
    for fused, step in steps.items():
        times[fused].append(bench.measure_ms(step))
for fused, ms in times.items():
    print(f"train step, dropout {BT.DROPOUT}, fused feed-forward {fused!s:5}: " + " ".join(f"{t:.3f}" for t in ms)
          + f" ms (median {sorted(ms)[1]:.3f})")
del steps
torch.cuda.empty_cache()

# 2. one feed-forward
m, d, h = 16384, 512, 2048
x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
w1 = (torch.randn(h, d, device=device, dtype=dtype) / d ** 0.5).requires_grad_()
b1 = torch.zeros(h, device=device, dtype=dtype, requires_grad=True)
w2 = (torch.randn(d, h, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
b2 = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)
dy = torch.randn(m, d, device=device, dtype=dtype)
leaves = [x, w1, b1, w2, b2]


def composed(p):
    return tt.linear(tt.dropout(tt.linear(x, w1, b1, "relu_squared"), p), w2, b2)


for p in (0.0, 0.1):
    for name, fn in (("fused", lambda p=p: tt.feed_forward(x, w1, b1, w2, b2, "relu_squared", dropout_p=p)),
                     ("composed", functools.partial(composed, p))):
        with torch.no_grad():
            fwd = bench.measure_gpu_ms(fn)
        fb = bench.measure_gpu_ms(lambda fn=fn: fn().backward(dy), leaves)
        print(f"feed-forward {m}x{d}->{h}, p {p}, {name:8}: forward {fwd * 1e3:7.1f} us GPU, "
              f"forward+backward {fb * 1e3:7.1f} us GPU")
