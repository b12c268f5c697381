"""Probe: a long row held on chip as up to three power-of-two pieces (`softmax.row_pieces`) against one padded block.

`tl.arange` needs a power of two, so a 50 304-column row used to be held as a 65 536-wide block: 23% of its
lanes padding, loaded (masked), exponentiated and reduced all the same. As pieces it is 32 768 + 16 384 +
2 048 = 51 200 lanes. Softmax forward and cross-entropy forward+backward, bf16, pieces off and on in one
process (two rounds), against a copy.

    python3 benchmarks/experiments/pieces.py

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, do_bench median): softmax (8192, 50304) off
729.7 us (2259 GB/s), on 650.7 us (2533 GB/s), copy 548.4 us; (16384, 50304) 1448 against 1287; (8192, 40000)
642 against 547; (8192, 20000) 333 against 248; (8192, 12000), block 16 384, one block either way (PIECES_FROM),
142-143; (8192, 32000) a whole 32 768 block, unchanged. Cross-entropy fwd+bwd (8192, 50304) 792-794 off against
706-713 on; (16384, 50304) 1539-1542 against 1370-1373; (8192, 40000) 704 against 594-596. A first version,
one kernel of three pieces beside the package's padded block: (8192, 50304) 644 us at 16 warps, 679 at 8 and 703
at 32; three pieces of 16 384 + 8 192 + 8 192 at (8192, 32000) took 466 us against 397 for the one block.
"""
import importlib

import torch
import triton_transformer as tt  # first: it decides GPU or interpreter before triton loads
import triton  # noqa: F401
import triton.testing

sm_mod = importlib.import_module("triton_transformer.softmax")


def bench(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def _pieces(on: bool):
    """Let `row_pieces` split long rows (on), or never (off: one padded block, as before)."""
    sm_mod.PIECES_FROM = PIECES_FROM if on else 1 << 40


PIECES_FROM = sm_mod.PIECES_FROM


def _off_and_on(fn, show) -> list[str]:
    """Two rounds of fn() timed with the pieces off, then on (left on)."""
    times = []
    for _ in range(2):
        for on in (False, True):
            _pieces(on)
            times.append(f"{'on' if on else 'off'} {show(bench(fn))}")
    return times


def main():
    dev, bf16 = tt.DEVICE, torch.bfloat16
    for M, N in ((8192, 50304), (16384, 50304), (8192, 40000), (8192, 20000), (8192, 12000), (8192, 32000)):
        x = torch.randn(M, N, device=dev, dtype=bf16) * 3
        y = torch.empty_like(x)
        moved = 2 * x.numel() * 2
        gbs = lambda us: f"{us:.1f} us {moved / us / 1e3:.0f} GB/s"  # noqa: E731
        line = [f"softmax fwd ({M}, {N}) pieces {sm_mod.row_pieces(N, sm_mod._launch_params(N)[0])}: "
                f"copy {gbs(bench(lambda: y.copy_(x)))}"]
        line += _off_and_on(lambda: tt.softmax(x), gbs)
        print(" | ".join(line), flush=True)
    for M, N in ((8192, 50304), (16384, 50304), (8192, 40000)):
        logits = torch.randn(M, N, device=dev, dtype=bf16, requires_grad=True)
        target = torch.randint(0, N, (M,), device=dev)
        line = [f"cross_entropy fwd+bwd ({M}, {N})"]

        def step():
            tt.cross_entropy(logits, target).backward()
            logits.grad = None
        line += _off_and_on(step, lambda us: f"{us:.1f} us")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
