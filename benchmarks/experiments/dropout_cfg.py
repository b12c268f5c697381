"""Probe: dropout's forward at 16M elements, the package's call against its kernel launched directly with each
config, and softmax's at (4096, 4096) against its kernel launched directly (GPU).

    python3 benchmarks/experiments/dropout_cfg.py

Timed as benchmarks/run.py times them (do_bench median, L2 flushed before every call), three interleaved rounds.
Shows which config the autotuner chose, and whether the package's call costs more than its kernel alone.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, min of three, us): dropout tt.dropout 27.49
(2441 GB/s; the tuner chose 1024 x 4 warps), x.clone() 27.62, its kernel at 1024/4, 2048/4 and 4096/8 27.55
each, 4096/4 28.86, 8192/8 30.66, 8192/16 27.84; softmax tt.softmax 26.94 (2491 GB/s), its kernel alone 27.26
at 4 warps and 27.46 at 8, x.clone() 27.46. The package's calls cost nothing over their kernels, and both
forwards run at a copy's speed of these bytes (on the machine before, evict.py's copies of the same kernels
differed by up to a microsecond: the 2500 GB/s targets lie within that spread).
"""
import importlib

import torch
import triton

import triton_transformer as tt
from triton_transformer.bench import measure_ms  # how benchmarks/run.py times a call

D = importlib.import_module("triton_transformer.dropout")
S = importlib.import_module("triton_transformer.softmax")



def main(rounds=3):
    n = 16777216
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    fns = {"dropout: tt.dropout": lambda: tt.dropout(x, 0.1, seed=1), "dropout: x.clone()": lambda: x.clone()}
    for cfg in D._dropout_kernel.configs:
        b, w = cfg.kwargs["BLOCK"], cfg.num_warps
        fns[f"dropout: kernel {b}/{w}w"] = lambda b=b, w=w: D._dropout_kernel.fn[(triton.cdiv(n, b),)](
            x, y, n, 0.1, 1 / 0.9, 1, x, SEED_BASE=False, BLOCK=b, num_warps=w)
    xs = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    ys = torch.empty_like(xs)
    block, single, warps = S._launch_params(4096)
    fns["softmax: tt.softmax"] = lambda: tt.softmax(xs)
    fns["softmax: x.clone()"] = lambda: xs.clone()
    for w in (4, 8):
        fns[f"softmax: kernel {w}w"] = lambda w=w: S._softmax_fwd_kernel[(4096,)](
            xs, ys, 4096, 4096, 4096, 4096, 4096, BLOCK=block, PIECE1=0, PIECE2=0, SINGLE_BLOCK=True,
            CAUSAL=False, STAGES=S.ONLINE_STAGES, ROW_STAGES=1, num_warps=w)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(measure_ms(fn))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; package softmax "
          f"warps {warps}; dropout's tuned config: {D._dropout_kernel.best_config}")
    for k in fns:
        moved = 4 * (n if k.startswith("dropout") else xs.numel())
        t = times[k]
        print(f"  {k:28s} {1e3 * min(t):7.2f} {1e3 * max(t):7.2f} us  {moved / min(t) / 1e6:6.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
