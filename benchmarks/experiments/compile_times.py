"""How long Triton takes to compile each autotuned config, ahead of time for an H100 (sm_90), on any machine.

    python3 benchmarks/experiments/compile_times.py          # attention's three kernels and the pointer matmul

No GPU is needed: the kernels are compiled to cubins for the target below and never launched (Triton
bundles ptxas). Each config is compiled in bf16 (tensor-core dots) and in exact fp32 (PRECISION
"ieee": FMAs on the CUDA cores), and the totals show what a first call costs before it can run, for
the whole config list and for the short list `runtime.exact_fp32_pruner` lets exact fp32 try.
Timings depend on the machine's CPU; compare them within one run. The signatures here carry no alignment or
divisibility facts, which the JIT adds for real calls: `attn_ir.py` found such hand-compiled attention kernels
unpipelined (every load synchronous) where the JIT's are not, so these times are of different code than a
first call compiles, and can only rank configs and precisions roughly.
"""
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# Import the package as on a GPU machine (plain @triton.jit kernels, every config), without one.
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
# an H100 SXM: runtime.capability (bf16, the fast tanh) and the SM count read these
torch.cuda.get_device_properties = lambda *a, **k: SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0,
                                                                   multi_processor_count=132)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp())  # a fresh cache: every compile is timed
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

attention = importlib.import_module("triton_transformer.attention")
matmul = importlib.import_module("triton_transformer.matmul")

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"qk_scale", "sm_scale", "dropout_p", "inv_keep", "drop_scale"}


def compile_seconds(kernel, pointers, constexprs, config) -> float:
    jit = kernel
    while not isinstance(jit, triton.runtime.jit.JITFunction):
        jit = jit.fn
    consts = {**constexprs, **config.kwargs}
    signature = {}
    for name in jit.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else ("i64" if name == "seed" else "i32")
    start = time.perf_counter()
    triton.compile(ASTSource(fn=jit, signature=signature, constexprs=consts), target=TARGET,
                   options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return time.perf_counter() - start


def cases(dtype):
    attn = dict(CAUSAL=True, HAS_MASK=False, DROPOUT=False, DROP_GROUPED=False, SEED_BASE=False, BLOCK_D=64,
                EVEN_D=True)
    side = {"L": "fp32", "DELTA": "fp32", "KM": "i8", "seed_base_ptr": "i64"}
    # (seed_base_ptr: attention's; a name the kernel does not take is never looked up)
    tensors = lambda *names: {n: side.get(n, dtype) for n in (*names, "seed_base_ptr")}  # noqa: E731
    yield ("attention fwd", attention._attn_fwd, tensors("Q", "K", "V", "O", "L", "KM"), {**attn, "STORE_L": True},
           attention._FWD_EXACT_FP32)
    yield ("attention dK/dV", attention._attn_bwd_dkdv, tensors("Q", "K", "V", "DO", "DK", "DV", "L", "DELTA", "KM"),
           attn, attention._DKDV_EXACT_FP32)
    yield ("attention dQ", attention._attn_bwd_dq, tensors("Q", "K", "V", "O", "DO", "DQ", "L", "DELTA", "KM"),
           attn, attention._DQ_EXACT_FP32)
    yield ("matmul (pointers)", matmul._matmul_kernel,
           tensors("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "z_ptr", "row_sum_ptr"),
           dict(HAS_BIAS=False, ACTIVATION=0, STORE_Z=False, ACT_GRAD=0, SPLIT_K=1, EVEN_K=True, ROW_SUM=False,
                DROPOUT=False, DROP_GROUPED=False, SEED_BASE=False, S_DROPPED=False),
           matmul._exact_fp32)


def main():
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}")
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        for name, kernel, pointers, constexprs, keep in cases(dtype):
            total = short = 0.0
            for config in kernel.configs:
                seconds = compile_seconds(kernel, pointers, {**constexprs, "PRECISION": precision}, config)
                total += seconds
                short += seconds if keep(config) else 0.0
                print(f"  {dtype} {name} {config}: {seconds:.1f} s", flush=True)
            print(f"{dtype} {name}: {total:.1f} s for {len(kernel.configs)} configs; "
                  f"{short:.1f} s for the exact-fp32 short list", flush=True)


if __name__ == "__main__":
    main()
