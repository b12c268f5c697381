"""Where a recorded decoding step spends its GPU time, per kernel, on both paths. (GPU)

    python3 benchmarks/experiments/decode.py

Chapter 7's model (the seed's configuration) generates with `generate`'s recorded one-token step
(`DecodeGraph`) under bf16 autocast; torch.profiler records 50 steps of each path and prints the
kernels by total GPU time, so that the Triton path's time per token can be set against PyTorch's.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton_transformer as tt  # noqa: E402

SEED = dict(num_tokens=256, max_seq_len=1024, dim=512, depth=6, heads=8, dim_head=64, causal=True)


def main(steps: int = 50):
    model = tt.Transformer(**SEED).cuda().eval()
    prompt = torch.randint(0, 256, (1, 32), device="cuda")
    for use_triton in (True, False):
        model.use_triton = use_triton
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.generate(prompt, steps + 2)  # compile, tune, record once
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(prompt, steps + 2)
            torch.cuda.synchronize()
            per_token = (time.perf_counter() - t) / (steps + 2)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model.generate(prompt, steps + 2)
                torch.cuda.synchronize()
        totals = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
                totals[e.key] = (e.device_time_total / (steps + 1), e.count / (steps + 1))
        gpu = sum(t for t, _ in totals.values())
        print(f"use_triton={use_triton}: {1e3 * per_token:.3f} ms a token wall, {gpu / 1e3:.3f} ms of kernels a token")
        for name, (us, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:14]:
            print(f"  {us:8.1f} us  {calls:5.1f} calls  {name[:100]}")


if __name__ == "__main__":
    main()
