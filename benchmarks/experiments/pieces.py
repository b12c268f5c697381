"""Probe: a long row held on chip as up to three power-of-two pieces instead of one padded block.

`tl.arange` needs a power of two, so the package holds a 50 304-column row as a 65 536-wide block:
23% of its lanes are padding that is loaded (masked), exponentiated and reduced all the same. Here
the row is 32 768 + 16 384 + 2 048 = 51 200 lanes (2% padding). Softmax forward, (8192, 50304) bf16,
against the package, a copy, at 16 and 32 warps.

    python3 benchmarks/experiments/pieces.py
"""
import importlib

import torch
import triton_transformer as tt  # first: it decides GPU or interpreter before triton loads
import triton
import triton.language as tl
import triton.testing

sm_mod = importlib.import_module("triton_transformer.softmax")
LOG2E = sm_mod.LOG2E


def bench(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _pieces(on: bool):
    """Let `row_pieces` split long rows (on), or never (off: one padded block, as before)."""
    sm_mod.PIECES_FROM = PIECES_FROM if on else 1 << 40


PIECES_FROM = sm_mod.PIECES_FROM


def main():
    dev, bf16 = tt.DEVICE, torch.bfloat16
    for M, N in ((8192, 50304), (16384, 50304), (8192, 40000), (8192, 20000), (8192, 12000), (8192, 32000)):
        x = torch.randn(M, N, device=dev, dtype=bf16) * 3
        y = torch.empty_like(x)
        moved = 2 * x.numel() * 2
        gbs = lambda us: f"{us:.1f} us {moved / us / 1e3:.0f} GB/s"  # noqa: E731
        line = [f"softmax fwd ({M}, {N}) pieces {sm_mod.row_pieces(N, sm_mod._launch_params(N)[0])}: "
                f"copy {gbs(bench(lambda: y.copy_(x)))}"]
        for rnd in range(2):
            for on in (False, True):
                _pieces(on)
                line.append(f"{'on' if on else 'off'} {gbs(bench(lambda: tt.softmax(x)))}")
        _pieces(True)
        print(" | ".join(line), flush=True)
    for M, N in ((8192, 50304), (16384, 50304), (8192, 40000)):
        logits = torch.randn(M, N, device=dev, dtype=bf16, requires_grad=True)
        target = torch.randint(0, N, (M,), device=dev)
        line = [f"cross_entropy fwd+bwd ({M}, {N})"]

        def step():
            tt.cross_entropy(logits, target).backward()
            logits.grad = None
        for rnd in range(2):
            for on in (False, True):
                _pieces(on)
                line.append(f"{'on' if on else 'off'} {bench(step):.1f} us")
        _pieces(True)
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
