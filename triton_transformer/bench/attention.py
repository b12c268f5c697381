"""Attention benchmark cases: causal (and full) attention, forward and forward+backward, plus peak memory vs N.

Providers: ``triton`` (this package), ``sdpa`` (``F.scaled_dot_product_attention``,
a fused FlashAttention-style kernel: cuDNN's with torch 2.11 on an H100) and ``naive`` (three PyTorch ops
that materialise the N x N scores), the latter only where its memory fits.

FLOPs (BOOK.md): the forward does two matmuls of 2*N*N*D each per (batch, head),
``fwd = 4 * B * H * N**2 * D``; the backward five, ``bwd = 2.5 * fwd``; so
``fwdbwd = 3.5 * fwd``. Causal attention counts half of each: the masked half is
not useful work. (The backward's five matmuls include recomputing S = QK^T, which a backward that
kept P would not need: this is the FlashAttention papers' count, the one the SDPA figures we compare
with were taken in.) Bytes are the minimum traffic of each pass: q, k, v read and o written
(forward, 4 tensors), q, k, v, o, dO read and dq, dk, dv written (backward, 8).
"""

import math

import torch
import torch.nn.functional as F

from .. import runtime
from ..attention import attention
from . import Case

# [B, H, N, D]: GPT-2 small at 1K context; 4K context with D = 64 and D = 128
SHAPES = [[8, 12, 1024, 64], [4, 16, 4096, 64], [4, 16, 4096, 128]]
# peak memory vs sequence length, at a fixed 16 heads of 64
MEMORY_NS = [1024, 2048, 4096, 8192, 16384]


def naive_attention(q, k, v, causal=False):
    """softmax(q k^T / sqrt(D)) v with the N x N scores in memory, as the seed computed it."""
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def naive_bytes(B, H, N, fwdbwd=True):
    """Rough peak of the naive version in 16-bit: N x N scores (2 bytes), their fp32 softmax (4 + 4), the
    16-bit probabilities (2); the backward adds about as much again for the gradients."""
    return B * H * N * N * (12 if not fwdbwd else 24)


def _flops(B, H, N, D, causal, pass_):
    fwd = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}[pass_]


def _fits(nbytes):
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    return nbytes < 0.7 * free


def _case(kernel, pass_, shape, dtype, causal, with_naive=True):
    B, H, N, D = shape
    dev = runtime.DEVICE
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(3))
    elt = q.element_size()
    io = B * H * N * D * elt
    providers = {}
    naive_ok = with_naive and _fits(naive_bytes(B, H, N, pass_ != "fwd"))
    if pass_ == "fwd":
        providers["triton"] = lambda: attention(q, k, v, causal=causal)
        providers["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if naive_ok:
            providers["naive"] = lambda: naive_attention(q, k, v, causal)
        return Case(kernel, pass_, list(shape), dtype, providers, bytes=4 * io,
                    flops=_flops(B, H, N, D, causal, pass_), extra={"causal": causal})
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    del q, k, v
    providers["triton"] = lambda: attention(qg, kg, vg, causal=causal).backward(do)
    providers["sdpa"] = lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal).backward(do)
    if naive_ok:
        providers["naive"] = lambda: naive_attention(qg, kg, vg, causal).backward(do)
    return Case(kernel, pass_, list(shape), dtype, providers, bytes=(4 + 8) * io,
                flops=_flops(B, H, N, D, causal, pass_), grad_to_none=[qg, kg, vg], extra={"causal": causal})


def cases(quick: bool = False):
    dtype = runtime.default_dtype()
    if quick:
        yield _case("attention_causal", "fwd", [2, 4, 256, 64], dtype, causal=True)
        return
    for shape in SHAPES:
        for pass_ in ("fwd", "fwdbwd"):
            yield _case("attention_causal", pass_, shape, dtype, causal=True)
    for shape in SHAPES[1:2]:
        for pass_ in ("fwd", "fwdbwd"):
            yield _case("attention", pass_, shape, dtype, causal=False)
    # Peak memory (the rows' peak_GiB) against N: linear for triton and sdpa, quadratic for naive.
    for n in MEMORY_NS:
        yield _case("attention_memory", "fwdbwd", [1, 16, n, 64], dtype, causal=True)
