"""Probe: does the attention forward's autotuner pick its fastest tile, and does the package's kernel run as fast
as the stripped one of `ws_attn.py` with the same tile? (GPU)

    cd benchmarks/experiments && python3 attn_fwd_cfg.py

`ws_attn.py` measured, at [4, 16, 4096, 128] causal, a stripped two-loop kernel with pointer loads at 626 us
(128 x 128 tiles, 8 warps, 3 stages) against 665 for the package. Here, causal, bf16, do_bench medians of
each forward alone (under no_grad: no log-sum-exp stored, as ws_attn timed it), the package as tuned, the
package with every config of its list forced, and the stripped kernel, with the registers and spills of each
compiled kernel.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0): at [4, 16, 4096, 128] the package as tuned
(128 x 64, 8 warps, 3 stages) 619.9 us, its configs forced 639.4-644.3 us for the three best (128 x 64 w8 s3
and s4, 128 x 128 w8 s3), the stripped kernel 627.8 (128 x 128 w8 s3) and 644.9 (128 x 64 w8 s3); at
[4, 16, 4096, 64] the package as tuned (64 x 64 w4 s3) 375.8, forced 368.9-376.9 for its three best, the
stripped kernel 372.8 (128 x 64 w8 s3). So the tuner's pick is within 2-3% of the best tile, which is
the spread of repeated timings here (the tuned call, timed first, read faster than the same tile forced
later), and the package's kernel runs as fast as the stripped one: ws_attn's 626 against 665 was not a
difference between the kernels. Registers: no spills in any config the tuner picked; 128 x 64 on 4 warps
spills 82-84 registers at heads of 128 (2.4x slower), and 128 x 128 on 8 warps uses all 255 there.
"""
import torch
import triton
import triton.testing

import importlib

import triton_transformer as tt

at = importlib.import_module("triton_transformer.attention")  # the package's `attention` is the function

import ws_attn
from attn_ir import compiled_variants


def print_regs(kernel, label):
    """Registers and spills of every variant of `kernel` compiled so far, with its tile (where Triton says it)."""
    for tiles, compiled in compiled_variants(kernel):
        print(f"  {label} {tiles} w{compiled.metadata.num_warps} s{compiled.metadata.num_stages}: "
              f"{compiled.n_regs} registers, {compiled.n_spills} spilled, {compiled.metadata.shared} B shared",
              flush=True)


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    for B, H, N, D in [(4, 16, 4096, 128), (4, 16, 4096, 64)]:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 2 * 2 * B * H * N * N * D / 2
        tf = lambda ms: flops / ms / 1e9  # noqa: E731
        bench = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
        with torch.no_grad():
            t = bench(lambda: tt.attention(q, k, v, causal=True))
            print(f"[{B},{H},{N},{D}] package tuned {t * 1e3:7.1f} us ({tf(t):.0f} TFLOP/s), picked "
                  f"{at._attn_fwd.best_config}", flush=True)
            for cfg in at._fwd_configs():
                run = lambda cfg=cfg: at.attention_forward(q, k, v, causal=True, need_lse=False, config=cfg)  # noqa: E731
                try:
                    t = bench(run)
                    print(f"  package {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} "
                          f"s{cfg.num_stages}: {t * 1e3:7.1f} us ({tf(t):.0f})", flush=True)
                except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
                    print(f"  package {cfg}: FAILED {type(exc).__name__}", flush=True)
            for bm, bn, w, s in [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3)]:
                t = bench(lambda: ws_attn.fwd(q, k, v, bm, bn, w, s, False, False))
                print(f"  stripped {bm}x{bn} w{w} s{s}: {t * 1e3:7.1f} us ({tf(t):.0f})", flush=True)
        print_regs(at._attn_fwd, "package")
        print_regs(ws_attn._fwd, "stripped")


if __name__ == "__main__":
    main()
