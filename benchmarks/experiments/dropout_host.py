"""Host time of a dropout call before and after the seed could come from device memory (GPU).

    git show a3074ab:triton_transformer/dropout.py \
        | sed 's/^from \.runtime import/from triton_transformer.runtime import/' \
        > benchmarks/experiments/_old_dropout.py      # the module before the change, not committed
    python3 benchmarks/experiments/dropout_host.py

Both modules are called on a 4096-element tensor, where the GPU's time is negligible, so the time per call
is the host's: forward alone and forward+backward, in five alternating rounds of 3000 calls. Also timed:
the capture check that `next_seed` adds, and drawing a seed.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, medians of the five rounds): forward 35.1 us
before, 34.1 after (32.8 inside a `replayable_seeds` block); forward+backward 127.7 before, 110.9 after
(rounds spread over 92-135 for both); `torch.cuda.is_current_stream_capturing()` 0.33 us; `draw_seed()`
2.97 us. No host cost that the machine's noise does not swamp.
"""
import importlib
import sys
import time
from pathlib import Path

import torch
import triton_transformer  # noqa: F401  (first: it decides GPU or interpreter)

sys.path.insert(0, str(Path(__file__).parent))
new = importlib.import_module("triton_transformer.dropout")
try:
    old = importlib.import_module("_old_dropout")
except ImportError:
    sys.exit("make _old_dropout.py first: see this file's docstring")


def per_call_us(fn, n=3000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


torch.autograd.set_multithreading_enabled(False)
x = torch.randn(4096, device="cuda", requires_grad=True)
dy = torch.randn_like(x)
base = torch.zeros(1, dtype=torch.int64, device="cuda")


def in_block():
    with new.replayable_seeds(base):
        return new.dropout(x, 0.1)


cases = {
    "old fwd": lambda: old.dropout(x, 0.1),
    "new fwd": lambda: new.dropout(x, 0.1),
    "new fwd, in a replayable_seeds block": in_block,
    "old fwd+bwd": lambda: old.dropout(x, 0.1).backward(dy),
    "new fwd+bwd": lambda: new.dropout(x, 0.1).backward(dy),
    "is_current_stream_capturing()": torch.cuda.is_current_stream_capturing,
    "draw_seed()": new.draw_seed,
}
results = {k: [] for k in cases}
for _ in range(5):
    for name, fn in cases.items():
        results[name].append(per_call_us(fn))
        x.grad = None
for name, us in results.items():
    us = sorted(us)
    print(f"{name:40s} median {us[2]:7.2f} us   (min {us[0]:.2f}, max {us[-1]:.2f})")
