"""Does loading the streamed tiles of attention's dK/dV loop through TMA (4-D tensor descriptors) beat
pointer loads on Hopper? One stripped kernel (causal, no mask or dropout, D a power of two) in both
forms, a constexpr picking the loads, timed side by side per config. Offline (tools: ptxas -v) the TMA form used fewer registers:
D=64 32x128 w8: 213 -> 185; D=128 64x64 w8: 688 bytes of spills -> 4.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, bf16; the best config of each form):
[16,12,1024,64] pointers 167.8 us (32x64 w4) / TMA 177.1 (32x64 w4); [4,16,4096,64] 698.7 (32x64 w4) /
706.0 (32x128 w8); [4,16,4096,128] 1273.9 (64x128 w8 s2) / 1262.0 (same). Fewer registers, no faster
kernel: the package keeps pointer loads. Both forms give bit-identical dK and dV. (Measured with the
loop written out once per form, the pointer form on a (blocks, B*H) grid; since folded into one kernel.)"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

@triton.jit
def _load_rows(src, b, h, start_m, stride_n, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """Rows [start_m, start_m + BLOCK_M) of Q or dO: through a 4-D descriptor, or from a pointer tile."""
    if TMA:
        rows = src.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        rows = tl.load(src + start_m * stride_n)
    return rows


@triton.jit
def _inner(dk, dv, k, v, q_src, do_src, b, h, L, DELTA, stride_qn, lo, hi, offs_n, offs_m0, qk_scale,
           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(q_src, b, h, start_m, stride_qn, BLOCK_M, BLOCK_D, TMA)
        lse = tl.load(L + offs_m)
        qkT = tl.dot(k, tl.trans(q))
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        do = _load_rows(do_src, b, h, start_m, stride_qn, BLOCK_M, BLOCK_D, TMA)
        dpT = tl.dot(v, tl.trans(do))
        dv = tl.dot(pT.to(do.dtype), do, dv)
        delta = tl.load(DELTA + offs_m)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def k_dkdv(Q, K, V, DO, DK, DV, L, DELTA, stride_qh, stride_qn, N_Q, H, qk_scale,
           BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """dK, dV of one key block (causal). TMA: Q and DO are descriptors over (B, H, N, D), else pointers."""
    pid_n = tl.program_id(0); h = tl.program_id(1); b = tl.program_id(2); bh = (b * H + h).to(tl.int64)
    K += bh * stride_qh; V += bh * stride_qh
    DK += bh * stride_qh; DV += bh * stride_qh; L += bh * N_Q; DELTA += bh * N_Q
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N); offs_m0 = tl.arange(0, BLOCK_M); offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(K + offs_n[:, None] * stride_qn + offs_d[None, :])
    v = tl.load(V + offs_n[:, None] * stride_qn + offs_d[None, :])
    if TMA:
        q_src, do_src = Q, DO
    else:
        tile = bh * stride_qh + offs_m0[:, None] * stride_qn + offs_d[None, :]
        q_src, do_src = Q + tile, DO + tile
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32); dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _inner(dk, dv, k, v, q_src, do_src, b, h, L, DELTA, stride_qn, start_n, start_n + BLOCK_N,
                    offs_n, offs_m0, qk_scale, BLOCK_M, BLOCK_D, True, TMA)
    dk, dv = _inner(dk, dv, k, v, q_src, do_src, b, h, L, DELTA, stride_qn, start_n + BLOCK_N, N_Q,
                    offs_n, offs_m0, qk_scale, BLOCK_M, BLOCK_D, False, TMA)
    o = offs_n[:, None] * stride_qn + offs_d[None, :]
    tl.store(DK + o, dk.to(DK.dtype.element_ty)); tl.store(DV + o, dv.to(DV.dtype.element_ty))


def run():
    torch.manual_seed(0)
    dev = "cuda"
    for B, H, N, D in ((16, 12, 1024, 64), (4, 16, 4096, 64), (4, 16, 4096, 128)):
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
        L = torch.randn(B * H * N, device=dev).abs() + 5.0
        delta = torch.randn(B * H * N, device=dev)
        flops = 4 * 2 * B * H * N * N * D / 2  # four dots, causal half
        qk_scale = 0.125 * 1.4426950408889634
        cfgs = [(32, 128, 8, 3), (32, 128, 8, 4), (64, 64, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 3),
                (64, 64, 4, 3), (32, 128, 4, 3)] if D == 64 else \
               [(64, 64, 8, 3), (64, 64, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3), (64, 128, 8, 2),
                (32, 128, 8, 2)]
        for m, n, w, s in cfgs:
            res = []
            outs = []
            for kind in ("ptr", "tma"):
                dk = torch.empty_like(k); dv = torch.empty_like(v)
                tma = kind == "tma"
                if tma:
                    q_src = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, m, D])
                    do_src = TensorDescriptor(do, list(do.shape), list(do.stride()), [1, 1, m, D])
                else:
                    q_src, do_src = q, do
                fn = lambda: k_dkdv[(N // n, H, B)](q_src, k, v, do_src, dk, dv, L, delta, N * D, D, N, H, qk_scale,
                                                    BLOCK_D=D, BLOCK_M=m, BLOCK_N=n, TMA=tma, num_warps=w,
                                                    num_stages=s)
                try:
                    fn()
                    torch.cuda.synchronize()
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                    res.append(f"{kind} {1e3 * ms:7.1f} us {flops / ms / 1e9:4.0f} TF")
                    outs.append((dk.float(), dv.float()))
                except Exception as e:
                    res.append(f"{kind} ERR {type(e).__name__}: {str(e)[:80]}")
            same = ""
            if len(outs) == 2:
                same = f"max|d| dk {(outs[0][0] - outs[1][0]).abs().max().item():.3g} dv {(outs[0][1] - outs[1][1]).abs().max().item():.3g}"
            print(f"[{B},{H},{N},{D}] {m}x{n} w{w} s{s}: " + " | ".join(res) + " " + same, flush=True)


if __name__ == "__main__":
    run()
