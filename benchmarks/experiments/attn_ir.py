"""Probe: what Triton makes of attention's loops on this machine: per kernel and tile config, the shared memory,
registers and spills, and in each loop the global loads left synchronous (`tt.load`) against those turned into
asynchronous copies (cp.async or TMA), and the wgmma waits. (GPU: the kernels the package's own calls compiled,
at [4, 16, 4096, D], causal, bf16, with the tile configs forced; a kernel compiled by hand without the JIT's
alignment and divisibility facts comes out different, unpipelined.)

    cd benchmarks/experiments && python3 attn_ir.py [64|128 | once]

A load the software pipeliner takes becomes an asynchronous copy into a ring of `num_stages` shared-memory
buffers, issued stages ahead of its use; one it leaves is a plain load each iteration waits for.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, D = 64): every loop of every kernel has all its
global loads asynchronous (forward: K and V; dK/dV: Q, dO, L and delta; dQ: K and V), none left synchronous,
and fewer wgmma waits than wgmmas (forward 1 of 2, dK/dV 2 of 4, dQ 2 of 3): one product's wait is deferred
past other work. No config spilled: forward 64 x 64 w4 s3 128 registers and 57 344 B of shared memory,
128 x 64 w8 s3 110 and 65 536; dK/dV 32 x 64 w4 s3 160 and 41 984, 32 x 128 w8 s3 150 and 57 856,
64 x 128 w8 s3 198 and 82 944; dQ 128 x 32 w4 s3 219 and 57 344, 128 x 64 w8 s3 127 and 81 920. So the dK/dV
kernel's lower rate (about 380 TFLOP/s at [4, 16, 4096, 64] against dQ's 530, chapter 5) is not a load the
pipeliner left behind or a spill. The same kernels compiled by hand (`triton.compile` of an ASTSource whose
signature carries no alignment or divisibility facts, as `compile_times.py` does) came out unpipelined, with
every load synchronous, 16-49 KB of shared memory and up to 358 spilled registers: read IR from kernels the
JIT compiled for real calls, as here.

`once` runs a causal forward+backward at [4, 16, 4096, D] for D = 64 and 128, the package's and SDPA's, once each
after a warm-up, for Nsight Compute:

    cd benchmarks/experiments && ncu --profile-from-start off --target-processes all --section SpeedOfLight \
        --section LaunchStats --metrics "regex:sm__pipe_tensor.*cycles_active\.avg\.pct_of_peak_sustained_active" \
        python3 attn_ir.py once
 Measured on the lent H100 (same versions;
ncu ran every kernel at 1.42-1.45 GHz, the memory-only ones at 1.60): us, and the share of cycles the tensor pipe
was active:

    D 64    ours: forward 423.1 (43.8%), dQ 437.2 (63.4%), dK/dV 837.5 (43.1%)
            cuDNN: forward 406.9 (48.2%), backward 1050 (46.2%) with dot(dO, O) 46.4 and the dQ conversion 36.8
    D 128   ours: forward 738.5 (49.8%), dQ 865.9 (63.7%), dK/dV 1460 (50.3%)
            cuDNN: forward 562.0 (70.5%), backward 1560 (62.0%) with dot(dO, O) 91.9 and the dQ conversion 70.3

Our programs: forward 256 threads (126 and 202 registers), dQ 128 / 256 (163 / 238), dK/dV 128 / 256 (166 / 255);
cuDNN's: 384 threads, 168 registers, 132 programs.
"""
import importlib
import re
import sys

import triton_transformer as tt  # noqa: F401  (first: GPU or interpreter)
import torch
import triton
from triton_transformer import bench


attention = importlib.import_module("triton_transformer.attention")

def compiled_variants(kernel):
    """(its BLOCK_* constexprs, the compiled kernel) for every variant of `kernel` (autotuned or plain) that
    calls have compiled so far; the constexprs empty where this Triton version keeps them elsewhere."""
    jit = kernel
    while not isinstance(jit, triton.runtime.jit.JITFunction):
        jit = jit.fn
    for entry in jit.device_caches.values():
        for compiled in entry[0].values():
            try:
                names = compiled.src.fn.arg_names
                tiles = {names[i[0]]: v for i, v in compiled.src.constants.items() if names[i[0]].startswith("BLOCK")}
            except Exception:  # noqa: BLE001 - whatever this Triton version keeps
                tiles = {}
            yield tiles, compiled


def loops(ttgir: str):
    """Per scf.for of the kernel (in order), the counts of the ops that say whether its loads are pipelined."""
    out = []
    for body in ttgir.split("scf.for")[1:]:
        body = body.split("scf.yield")[0]
        ops = {k: len(re.findall(pat, body)) for k, pat in (
            ("sync loads", r"= tt\.load "), ("async copies", r"async_copy_global_to_local"),
            ("TMA loads", r"async_tma_copy_global_to_local|ttng\.async_tma"), ("wgmma", r"warp_group_dot "),
            ("wgmma waits", r"warp_group_dot_wait"), ("layout conversions", r"convert_layout"))}
        out.append(ops)
    return out


def once():
    """Causal forward+backward at [4, 16, 4096, D], D = 64 and 128, the package's (as tuned) and SDPA's, each once
    after a warm-up, for Nsight Compute (ncu --profile-from-start off; `bench.for_profiler`)."""
    import torch.nn.functional as F

    calls = []
    for D in (64, 128):
        q, k, v = (torch.randn(4, 16, 4096, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        calls.append(lambda q=q, k=k, v=v, do=do: tt.attention(q, k, v, causal=True).backward(do))
        calls.append(lambda q=q, k=k, v=v, do=do: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do))
    bench.for_profiler(*calls)


def main():
    if "once" in sys.argv:
        once()
        return
    D = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), f"D = {D}", flush=True)
    B, H, N = 4, 16, 4096
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    cfg = lambda m, n, w, s: triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)  # noqa: E731
    o, lse = attention.attention_forward(q, k, v, causal=True, config=cfg(64, 64, 4, 3))
    attention.attention_forward(q, k, v, causal=True, config=cfg(128, 64, 8, 3))
    for dkdv in [cfg(32, 64, 4, 3), cfg(32, 128, 8, 3), cfg(64, 128, 8, 3)]:
        attention.attention_backward(do, q, k, v, o, lse, causal=True, configs=(dkdv, cfg(128, 32, 4, 3)))
    attention.attention_backward(do, q, k, v, o, lse, causal=True, configs=(cfg(32, 64, 4, 3), cfg(128, 64, 8, 3)))
    torch.cuda.synchronize()
    for name, kernel in (("fwd", attention._attn_fwd), ("dkdv", attention._attn_bwd_dkdv), ("dq", attention._attn_bwd_dq)):
        for tiles, c in compiled_variants(kernel):
            print(f"{name} {tiles} w{c.metadata.num_warps} s{c.metadata.num_stages}: {c.metadata.shared} B shared, "
                  f"{c.n_regs} registers, {c.n_spills} spilled", flush=True)
            for i, ops in enumerate(loops(c.asm["ttgir"])):
                print(f"    loop {i + 1}: " + ", ".join(f"{k} {v}" for k, v in ops.items()), flush=True)


if __name__ == "__main__":
    main()
