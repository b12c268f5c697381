"""Probe: tiles for the few-row products of generation (one token at a time). (GPU)

    python3 benchmarks/experiments/skinny.py

Decoding one token runs every projection on 1 row (a batch of prompts: a few). Such a product is too
small to autotune, so `matmul` gives it SMALL_CONFIG, 64 x 64 tiles with a K step of 32: a grid of only
N / 64 programs, each walking the whole K loop. Here each candidate tile replaces SMALL_CONFIG for the
projections of chapter 7's model (the seed's: d = 512, 4d feed-forward, 256 logits) at M = 1, 4, 16, bf16,
timed as generation runs them: 50 calls recorded in one CUDA graph, L2 warm (the weights fit in it).

Measured (H100 80GB HBM3, torch 2.11, Triton 3.6), us per call, the five projections summed: SMALL_CONFIG
26.3-26.5 at M = 1, 4 and 16; 16 x 16 x 256 tiles (3 stages, 4 warps) 16.5-16.7, the best of the seven;
16 x 32 x 128 17.3-17.7; 16 x 64 x 64 22.7-23.0. With 16 x 16 x 256 as `matmul.SKINNY_CONFIG`, the recorded
decoding step of `decode.py` spent 85.6 us a token in `_matmul_kernel` against 168.8 (all kernels: 272 us
against 352).
"""
import importlib

import triton_transformer  # noqa: F401  (first: sets the interpreter up on a CPU)
import torch

MM = importlib.import_module("triton_transformer.matmul")

SHAPES = {"qkv": (512, 1536), "out": (512, 512), "ff in": (512, 2048), "ff out": (2048, 512), "logits": (512, 256)}
CANDIDATES = {
    "SMALL 64x64x32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_stages=3, num_warps=4),
    "16x64x64 s3": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_stages=3, num_warps=4),
    "16x32x128 s3": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_stages=3, num_warps=4),
    "16x32x128 s4": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_stages=4, num_warps=4),
    "16x16x256 s3": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, GROUP_M=1, num_stages=3, num_warps=4),
    "16x32x256 s2 w8": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_stages=2, num_warps=8),
    "16x64x128 s3": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_stages=3, num_warps=4),
}


def per_call_us(fn, calls: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def main():
    torch.manual_seed(0)
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
               for name, (k, n) in SHAPES.items()}
    saved = MM.SMALL_CONFIG
    for m in (1, 4, 16):
        print(f"M = {m}: us per call" + "".join(f" | {name}" for name in SHAPES) + " | sum")
        for label, cfg in CANDIDATES.items():
            MM.SMALL_CONFIG = cfg
            times, worst = [], 0.0
            for name, (k, n) in SHAPES.items():
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                w = weights[name]
                y = MM.matmul(x, w.t())[0]
                worst = max(worst, (y.float() - x.float() @ w.float().t()).abs().max().item())
                times.append(per_call_us(lambda x=x, w=w: MM.matmul(x, w.t())))
            print(f"  {label:>16}: " + " | ".join(f"{t:5.2f}" for t in times) + f" | {sum(times):6.2f}"
                  f"   (max err {worst:.1e})", flush=True)
    MM.SMALL_CONFIG = saved


if __name__ == "__main__":
    main()
