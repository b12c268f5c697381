"""Probe: host time of fwd+bwd calls with runtime.launch as it is and as it was before it looked for the first
tensor's device (same process, alternating), to see what that check costs.

    python3 benchmarks/experiments/launch_cost.py

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16; host us per fwd+bwd call, three rounds,
now / before): linear 16384x768x3072 700/707, 712/461, 499/356; layer norm 16384x768 278/398, 395/370,
218/237; attention [8,12,1024,64] 518/295, 271/261, 284/279; torch's linear 180/176, 103/100, 107/109.
The host of that machine moved by up to 2x between rounds of the same call: no difference the check
could explain shows through (it is three Python operations a launch).
"""
import torch

import triton_transformer as tt
from triton_transformer import runtime
import importlib

from probe import host_us  # benchmarks/experiments/probe.py, beside this file

modules = [importlib.import_module(f"triton_transformer.{m}")
           for m in ("softmax", "layernorm", "dropout", "matmul", "attention", "cross_entropy")]
current = runtime.launch


def old_launch(kernel, grid, *args, **meta):
    launcher = runtime._launchers.get(id(kernel))
    if launcher is None:
        launcher = runtime._launchers[id(kernel)] = runtime._Launcher(kernel)
    return launcher(grid, args, meta)


def use(fn):
    runtime.launch = fn
    for m in modules:
        if hasattr(m, "launch"):
            m.launch = fn


def main():
    torch.autograd.set_multithreading_enabled(False)
    dev, bf16 = "cuda", torch.bfloat16
    xl = torch.randn(16384, 768, device=dev, dtype=bf16, requires_grad=True)
    wl = torch.randn(3072, 768, device=dev, dtype=bf16, requires_grad=True)
    dyl = torch.randn(16384, 3072, device=dev, dtype=bf16)
    x = torch.randn(16384, 768, device=dev, dtype=bf16, requires_grad=True)
    w = torch.ones(768, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn(16384, 768, device=dev, dtype=bf16)
    q = torch.randn(8, 12, 1024, 64, device=dev, dtype=bf16, requires_grad=True)
    cases = {
        "linear": (lambda: tt.linear(xl, wl).backward(dyl), [xl, wl]),
        "layer_norm": (lambda: tt.layer_norm(x, (768,), w).backward(dy), [x, w]),
        "attention": (lambda: tt.attention(q, q, q, causal=True).backward(q), [q]),
        "torch linear": (lambda: torch.nn.functional.linear(xl, wl).backward(dyl), [xl, wl]),
    }
    for round_ in range(3):
        for name, (fn, grads) in cases.items():
            for label, impl in (("launch now", current), ("launch before", old_launch)):
                use(impl)
                host, wall = host_us(fn, grads)
                print(f"round {round_} {name:>12} {label:>13}: host {host:6.1f} us/call, with drain {wall:6.1f}",
                      flush=True)
    use(current)


if __name__ == "__main__":
    main()
