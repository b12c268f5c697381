"""Probe: attention's forward with the next key block's scores issued before this block's softmax. (GPU)

    cd benchmarks/experiments && python3 attn_ahead.py

FlashAttention-3 keeps the tensor cores busy while a warpgroup computes exponentials by overlapping, within one
warpgroup, the softmax of block j with the matmul S_{j+1} = Q K_{j+1}^T (its "intra-warpgroup pipelining").
Triton has no instruction for that, but the order of the source can ask for it: issue `tl.dot(q, k_next)`
first, then the softmax of the scores carried from the iteration before, then `tl.dot(p, v, acc)`. Hopper's
wgmma is asynchronous; whether the exponentials then run under the next block's matmul depends on where Triton
puts the wait for it. The stripped kernel of `ws_attn.py` (causal, pointer loads, two loops, no mask or dropout,
D a power of two, N a multiple of the blocks) with its mask-free loop in both orders, timed side by side with
SDPA and the package (do_bench medians of the forward under no_grad), outputs checked against SDPA; printed per
variant, the waits for wgmma in the compiled PTX (`wgmma.wait_group`).

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16, causal, min of three rounds (max), us):

    [4, 16, 4096, 128]       in order         ahead
    128 x 64, 8 warps, s3    663.6 (677.2)    751.0 (761.3)     164 / 172 registers
    128 x 128, 8 warps, s2   715.2 (724.4)    721.8 (745.1)     231 / 255
    128 x 128, 8 warps, s3   657.5 (662.6)    needs 256 KB of shared memory
    SDPA 485.2, the package 601.2

    [4, 16, 4096, 64]
    64 x 64, 4 warps, s3     380.4 (388.4)    395.0 (400.7)     128 / 148
    128 x 64, 8 warps, s3    383.9 (387.3)    376.9 (389.5)     122 / 128
    128 x 64, 4 warps, s3    386.7 (414.5)    392.4 (401.7)     240 / 255
    128 x 128, 8 warps, s2   528.3 (532.5)    504.6 (509.5)     171 / 255
    SDPA 329.8, the package 347.4

Every output matched SDPA's (max error 2e-3 to 4e-3). In every variant, in either order, the PTX holds one wait per
matmul (4 in order, 6 ahead, for as many `tl.dot`s), each `wgmma.wait_group 0`, a wait for every matmul in flight;
where each wait sits was not examined. (`attn_ir.py` counts fewer waits than matmuls in the package's own kernels,
in Triton's GPU IR: one product's wait deferred past other work.) The order of the source bought nothing: at
heads of 128 it was slower, at heads of 64 the best tile of each order took 380.4 and 376.9 us, within the
spread of the rounds, both slower than the package (the `ahead` form holds two score tiles, and more
registers). Not adopted.
"""
import re

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import triton_transformer as tt
from triton_transformer.bench import rounds
from ws_attn import _inner, _rows_of_program, _store_out, _tile  # (this folder is the script's own: Python puts it on the path)


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, v, qk_scale):
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _inner_ahead(acc, l_i, m_i, q, K, V, kv_row0, stride_n, lo, hi, offs_n, offs_d, qk_scale,
                 BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """The mask-free blocks [lo, hi), the scores of block j + 1 issued before the softmax of block j."""
    if hi > lo:
        k = _tile(K, K, kv_row0 + lo, stride_n, offs_n, offs_d, False)
        qk = tl.dot(q, tl.trans(k))
        for start_n in tl.range(lo, hi - BLOCK_N, BLOCK_N, num_stages=STAGES):
            k = _tile(K, K, kv_row0 + start_n + BLOCK_N, stride_n, offs_n, offs_d, False)
            qk_next = tl.dot(q, tl.trans(k))  # the tensor cores' next job, queued before the exponentials
            v = _tile(V, V, kv_row0 + start_n, stride_n, offs_n, offs_d, False)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
            qk = qk_next
        v = _tile(V, V, kv_row0 + hi - BLOCK_N, stride_n, offs_n, offs_d, False)
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
    return acc, l_i, m_i


@triton.jit
def _fwd(Q, K, V, O, L, N, qk_scale, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         AHEAD: tl.constexpr, STAGES: tl.constexpr):
    """Q, K, V, O: (B*H*N, D) contiguous. Program (m block, b*h), the longest blocks first."""
    row0, start_m, offs_m = _rows_of_program(N, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(Q, Q, row0 + start_m, BLOCK_D, tl.arange(0, BLOCK_M), offs_d, False)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if AHEAD:
        acc, l_i, m_i = _inner_ahead(acc, l_i, m_i, q, K, V, row0, BLOCK_D, 0, start_m, offs_n, offs_d, qk_scale,
                                     BLOCK_N, STAGES)
    else:
        acc, l_i, m_i = _inner(acc, l_i, m_i, q, K, V, K, V, row0, BLOCK_D, 0, start_m, offs_m, offs_n, offs_d,
                               qk_scale, BLOCK_N, False, False, False, STAGES)
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, K, V, K, V, row0, BLOCK_D, start_m, start_m + BLOCK_M,
                           offs_m, offs_n, offs_d, qk_scale, BLOCK_N, True, False, False, STAGES)
    _store_out(O, L, acc, l_i, m_i, row0, offs_m, offs_d, BLOCK_D)


def fwd(q, k, v, bm, bn, warps, stages, ahead, info=None):
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B * H * N, device=q.device, dtype=torch.float32)
    c = _fwd[(N // bm, B * H)](q, k, v, o, lse, N, D ** -0.5 * 1.4426950408889634, BLOCK_D=D, BLOCK_M=bm,
                               BLOCK_N=bn, AHEAD=ahead, STAGES=stages, num_warps=warps, num_stages=stages)
    if info is not None:
        waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", c.asm["ptx"])
        info.update(regs=c.n_regs, spills=c.n_spills, waits=" ".join(waits))
    return o


def main():
    for B, H, N, D in [(4, 16, 4096, 128), (4, 16, 4096, 64)]:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 2 * 2 * B * H * N * N * D / 2
        tf = lambda ms: flops / ms / 1e9  # noqa: E731
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        cases = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                 "package": lambda: tt.attention(q, k, v, causal=True)}
        configs = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)] if D == 128 else \
                  [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2)]
        for bm, bn, warps, stages in configs:
            for ahead in (False, True):
                name = f"{bm}x{bn} w{warps} s{stages} {'ahead' if ahead else 'in order'}"
                info = {}
                try:
                    o = fwd(q, k, v, bm, bn, warps, stages, ahead, info)
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
                    msg = str(exc).strip().splitlines()
                    print(f"  {name}: FAILED {type(exc).__name__}: {msg[-1] if msg else ''}"[:240], flush=True)
                    continue
                err = (o.float() - ref.float()).abs().max().item()
                print(f"  {name}: err {err:.1e}, {info['regs']} registers, {info['spills']} spilled, "
                      f"wgmma waits {info['waits']}", flush=True)
                cases[name] = lambda a=(bm, bn, warps, stages, ahead): fwd(q, k, v, *a)
        with torch.no_grad():
            times = rounds(cases)
        for key, ts in times.items():
            print(f"[{B},{H},{N},{D}] {key:28s} {min(ts):7.1f} us ({max(ts):7.1f}) "
                  f"{flops / min(ts) / 1e6:5.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
