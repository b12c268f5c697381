"""Probe: the dK/dV kernel's tile configs, the package's list and others, at the benchmark's long shapes. (GPU)

    cd benchmarks/experiments && python3 attn_bwd_cfg.py

Causal, bf16, [4, 16, 4096, D] for D = 64 and 128: the backward as tuned (its picks printed), then the backward
with each dK/dV config forced and dQ's tuned pick kept, do_bench medians of the whole backward (dQ's share is the
same in every row, so the differences are dK/dV's), with each dK/dV kernel's registers and spills.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0), backward in us. D = 64: as tuned 1096.9 (dK/dV
32 x 64 w4 s3, dQ 128 x 64 w8 s3); the listed configs forced 1111.4 (the pick) to 2028.9; twelve configs not in
the list, 1108.6-1788.7, none faster than the pick beyond the spread of repeated timings (32 x 64 w4 s5
1108.6, s4 1111.6; 64 x 128 w8 s2 1131.2; 16 x 64 w4 s3 1188.4). D = 128: as tuned 1959.6 (dK/dV 64 x 128 w8
s3, dQ 128 x 64 w8 s3); listed 2001.8 (the pick) to 5356.2; not listed 1981.3 (64 x 128 w8 s4), 1995.3 (s2),
2055.5 (64 x 64 w4 s2) and slower. So the list holds the best tile at both head sizes: the dK/dV kernel's rate
is not a tuning gap.
"""
import importlib

import triton_transformer as tt  # noqa: F401  (first: GPU or interpreter)
import torch
import triton
import triton.testing

from attn_ir import compiled_variants

at = importlib.import_module("triton_transformer.attention")
EXTRA = [(16, 64, 4, 3), (16, 128, 4, 3), (16, 128, 8, 3), (32, 64, 4, 4), (32, 64, 4, 5), (32, 64, 8, 3),
         (64, 64, 4, 4), (64, 64, 4, 2), (32, 128, 4, 4), (64, 128, 8, 2), (64, 128, 8, 4), (128, 128, 8, 2)]


def main():
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    for D in (64, 128):
        B, H, N = 4, 16, 4096
        q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        o, lse = at.attention_forward(q, k, v, causal=True)
        bench = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
        t = bench(lambda: at.attention_backward(do, q, k, v, o, lse, causal=True))
        dq_pick = at._attn_bwd_dq.best_config
        print(f"[{B},{H},{N},{D}] backward as tuned {t * 1e3:7.1f} us; dK/dV picked {at._attn_bwd_dkdv.best_config}; "
              f"dQ picked {dq_pick}", flush=True)
        listed = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in at._dkdv_configs()]
        for m, n, w, s in listed + [c for c in EXTRA if c not in listed]:
            cfg = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            try:
                t = bench(lambda: at.attention_backward(do, q, k, v, o, lse, causal=True, configs=(cfg, dq_pick)))
                print(f"  dK/dV {m}x{n} w{w} s{s}{'' if (m, n, w, s) in listed else ' (not listed)'}: "
                      f"{t * 1e3:7.1f} us", flush=True)
            except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
                print(f"  dK/dV {m}x{n} w{w} s{s}: FAILED {type(exc).__name__}", flush=True)
        for tiles, c in compiled_variants(at._attn_bwd_dkdv):
            if tiles.get("BLOCK_D") == D:
                print(f"    {tiles} w{c.metadata.num_warps} s{c.metadata.num_stages}: {c.n_regs} registers, "
                      f"{c.n_spills} spilled, {c.metadata.shared} B shared", flush=True)


if __name__ == "__main__":
    main()
