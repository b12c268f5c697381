"""Probe: where the host's time goes in an ungraphed training step of the Triton path. (GPU)

    python3 benchmarks/experiments/step_host.py [profile] [gc]

The seed's model (batch 16, 1024 tokens, dim 512, depth 6, bytes), bf16 autocast, AdamW, with and without
GPT-2's dropout of 0.1, run as `bench.transformer.train_step` runs a provider: eager PyTorch, the Triton path
without a CUDA graph, and the Triton path replayed as one. Each step is timed by do_bench (median), and
the Triton path's eager step also by the host alone: the time to hand the step to the GPU, measured with
the GPU held busy by a long sleep kernel so that nothing the host waits for has finished. `profile`
adds cProfile's top functions (by own time) over 20 eager steps of the Triton path. `gc` times the eager
steps in rounds that alternate Python's garbage collector as it is and frozen (`gc.freeze()` after a
`gc.collect()`: every object alive then is moved out of the collector's sight; `gc.unfreeze()` undoes it).

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0; lent machines with noisy hosts), do_bench ms of a
step, and host ms in brackets:

    dropout 0.0: torch eager 15.50 (16.87), triton eager 18.28 (17.49), triton graph 6.60
    dropout 0.1: torch eager 17.57 (17.65), triton eager 24.97 (25.17), triton graph 8.63

So the Triton path's eager step is bound by its host, like eager PyTorch's, with more host time. cProfile
(20 steps, no dropout): 167 kernel launches and 39 autograd Functions a step; the most own time in autograd's
engine (C++, 2.2 ms a step under the profiler), `matmul.matmul` (75 calls a step, 6.9 ms with what it calls,
of which Triton's TMA descriptors 2.3 ms: 200 made a step, 4 a launch) and 210 `torch.empty` a step. The dropout
step made the same calls (86 more a step) and every one of them took about 1.5x as long, which looked like the
process rather than the code. The `gc` rounds, in one process on a later machine, did not settle it: torch
eager 15.56-15.58 ms in all four rounds without dropout, the Triton path 23.47 and 24.33 with the collector as
is, 25.92 and 21.87 frozen; with dropout torch 19.25 / 17.58 as is and 17.59 / 19.93 frozen, Triton 22.40 /
29.56 as is and 19.44 / 25.32 frozen. Eager PyTorch's step time held steady where ours swung by 20-35%,
freezing or not: nothing adopted.
"""
import cProfile
import functools
import gc
import pstats
import sys
import time

import torch
import triton.testing

import triton_transformer as tt  # noqa: F401  (first: GPU or interpreter)
from triton_transformer.bench.transformer import train_step
from triton_transformer.transformer import Transformer

CE = sys.modules["triton_transformer.cross_entropy"]


def ms(fn):
    return triton.testing.do_bench(fn, return_mode="median")


def host_ms(fn, n=10):
    """Host time of a step: the GPU kept busy by a sleep kernel queued first, so that the host never waits for it.
    Cross-entropy's bad-target check, which would wait for the whole forward, is switched off meanwhile."""
    check = CE._BadTargetCount.check
    CE._BadTargetCount.check = lambda *a: None
    fn()
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(n):
        torch.cuda._sleep(2_000_000_000 // 1000 * 50)  # ~50 ms of GPU time, at ~2 GHz
        t = time.perf_counter()
        fn()
        total += time.perf_counter() - t
        torch.cuda.synchronize()
    CE._BadTargetCount.check = check
    return total / n * 1e3


def main():
    dev = tt.runtime.DEVICE
    do_profile = "profile" in sys.argv
    for p in (0.0, 0.1):
        torch.manual_seed(0)
        model = Transformer(num_tokens=256, max_seq_len=1024, dim=512, depth=6, heads=8, dim_head=64, causal=True,
                            attn_dropout=p, ff_dropout=p).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        x = torch.randint(0, 256, (16, 1024), device=dev)
        y = torch.randint(0, 256, (16, 1024), device=dev)
        drop = p > 0
        steps = {
            "torch eager": train_step(functools.partial(model, use_triton=False), opt, x, y, torch.bfloat16),
            "triton eager": train_step(functools.partial(model, use_triton=True), opt, x, y, torch.bfloat16,
                                       dropout=drop),
            "triton graph": train_step(functools.partial(model, use_triton=True), opt, x, y, torch.bfloat16, True,
                                       drop),
        }
        if "gc" in sys.argv:
            for name in ("torch eager", "triton eager"):
                steps[name].prepare()
            for _ in range(2):
                for frozen in (False, True):
                    if frozen:
                        gc.collect()
                        gc.freeze()
                    line = " ".join(f"{name} {ms(steps[name]):6.2f}" for name in ("torch eager", "triton eager"))
                    print(f"dropout {p}: gc {'frozen' if frozen else 'as is '}: {line} ms", flush=True)
                    gc.unfreeze()
            for step in steps.values():
                step.release()
            continue
        for name, step in steps.items():
            step.prepare()
            line = f"dropout {p}: {name:13s} do_bench {ms(step):7.2f} ms"
            if name != "triton graph":
                line += f", host {host_ms(step):7.2f} ms"
            print(line, flush=True)
            if do_profile and name == "triton eager":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(20):
                    step()
                torch.cuda.synchronize()
                prof.disable()
                stats = pstats.Stats(prof)
                stats.sort_stats("tottime").print_stats(60)
                stats.sort_stats("cumulative").print_stats(70)
            step.release()


if __name__ == "__main__":
    main()
