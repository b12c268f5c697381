"""Where one training step's time goes: GPU time per kernel, and GPU busy time against wall time.

    python benchmarks/profile_step.py                       # the seed's config, every provider
    python benchmarks/profile_step.py --shape 16 1024 768 12 50304 --providers triton

For each provider of the `transformer_train_step` benchmark it runs a few steps
under torch.profiler and prints the kernels that take the most GPU time. When
the summed kernel time is well below the wall time of a step, the GPU is
waiting for the CPU to launch work (what a CUDA graph removes); when they are
close, the kernels themselves are the cost.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from triton_transformer import runtime  # noqa: E402
from triton_transformer.bench import transformer as bench_transformer  # noqa: E402


def profile(step, steps: int = 5, top: int = 15) -> None:
    for _ in range(3):  # compilation, autotuning, graph recording
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    busy = sum(e.device_time_total for e in kernels) / steps / 1e3
    launches = sum(e.count for e in kernels) / steps
    print(f"  wall {wall:.2f} ms/step · GPU busy {busy:.2f} ms/step · {launches:.0f} kernels/step")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:top]:
        print(f"    {e.device_time_total / steps / 1e3:7.3f} ms  x{e.count // steps:<4} {e.key[:100]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=5, metavar=("BATCH", "SEQ", "DIM", "DEPTH", "TOKENS"))
    p.add_argument("--providers", nargs="+")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    if runtime.DEVICE.type != "cuda":
        raise SystemExit("profile_step.py needs a CUDA GPU")
    if args.shape:
        bench_transformer.SHAPES = [tuple(args.shape)]
    for case in bench_transformer.cases():
        print(f"{case.kernel} {case.shape} {runtime.device_name()}")
        for name, step in case.providers.items():
            if args.providers and name not in args.providers:
                continue
            print(f"{name}:")
            with torch.autograd.set_multithreading_enabled(False):
                profile(step, top=args.top)


if __name__ == "__main__":
    main()
