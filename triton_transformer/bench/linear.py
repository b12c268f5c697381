"""Linear benchmark cases (issue 5): a plain GEMM and a GEMM with fused bias + gelu, forward and forward+backward,
and a transformer's whole feed-forward, forward+backward.

Shapes are [M, K, N]: x (M, K) times weight (N, K)^T. The first two are a GPT-2-small
feed-forward (768 -> 3072 and back) over 16384 tokens, the third a square 8192 GEMM.
`feed_forward` rows have shape [M, dim, hidden]: relu^2(x W1^T + b1) W2^T + b2, GPT-2 small's and
the seed model's widths, 16384 tokens; `feed_forward_dropout` rows drop the hidden layer with GPT-2's
p = 0.1 (a transformer block's feed-forward in training).

Providers:
  triton         tt.linear
  cublas         torch.matmul(x, w.T): the GEMM alone, no bias or activation (the speed of light)
  torch          eager F.linear (+ bias, + F.gelu(approximate="tanh") for linear_gelu)
  torch.compile  torch.compile of the eager function
  (feed_forward: triton is tt.feed_forward, cublas the two products alone, without bias or activation;
   feed_forward_dropout: triton drops inside the first GEMM's epilogue, "triton unfused" composes
   tt.linear, tt.dropout, tt.linear; in fp16, where feed_forward composes them too, the two are the same)
"""

import torch
import torch.nn.functional as F

from .. import runtime
from ..dropout import dropout as tt_dropout
from ..matmul import feed_forward, linear
from . import DROPOUT, Case

SHAPES = [[16384, 768, 3072], [16384, 3072, 768], [8192, 8192, 8192]]
QUICK_SHAPES = [[2048, 512, 1024]]
FF_SHAPES = [[16384, 768, 3072], [16384, 512, 2048]]


def _torch_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def _torch_plain(x, w, b):
    return F.linear(x, w)


def _torch_ff(x, w1, b1, w2, b2, p=0.0):
    return F.linear(F.dropout(F.relu(F.linear(x, w1, b1)).square(), p), w2, b2)


def _triton_ff_unfused(x, w1, b1, w2, b2, p):
    return linear(tt_dropout(linear(x, w1, b1, "relu_squared"), p), w2, b2)


def _ff_cases(quick: bool):
    dtype = runtime.default_dtype()
    device = runtime.DEVICE
    for m, d, h in QUICK_SHAPES if quick else FF_SHAPES:
        t = tuple(leaf.requires_grad_() for leaf in (
            torch.randn(m, d, device=device, dtype=dtype),
            torch.randn(h, d, device=device, dtype=dtype) / d ** 0.5, torch.zeros(h, device=device, dtype=dtype),
            torch.randn(d, h, device=device, dtype=dtype) / h ** 0.5, torch.zeros(d, device=device, dtype=dtype)))
        dy = torch.randn(m, d, device=device, dtype=dtype)
        compiled = torch.compile(_torch_ff, dynamic=False)
        # two products forward, four backward; bytes: x, y, dy, dx and the (m, h) hidden layer written,
        # read for dW2 and its gradient written and read twice, at the least
        shape = dict(flops=12 * m * d * h, bytes=t[0].element_size() * (4 * m * d + 5 * m * h + 4 * d * h),
                     grad_to_none=list(t))
        yield Case("feed_forward", "fwdbwd", [m, d, h], dtype, **shape, providers={
            "triton": lambda t=t, dy=dy: feed_forward(*t, "relu_squared").backward(dy),
            "cublas": lambda t=t, dy=dy: torch.matmul(torch.matmul(t[0], t[1].t()), t[3].t()).backward(dy),
            "torch": lambda t=t, dy=dy: _torch_ff(*t).backward(dy),
            "torch.compile": lambda t=t, dy=dy, c=compiled: c(*t).backward(dy),
        })
        if not quick:
            p = DROPOUT
            yield Case("feed_forward_dropout", "fwdbwd", [m, d, h], dtype, **shape, extra={"dropout": p}, providers={
                "triton": lambda t=t, dy=dy, p=p: feed_forward(*t, "relu_squared", dropout_p=p).backward(dy),
                "triton unfused": lambda t=t, dy=dy, p=p: _triton_ff_unfused(*t, p).backward(dy),
                "torch": lambda t=t, dy=dy, p=p: _torch_ff(*t, p).backward(dy),
                "torch.compile": lambda t=t, dy=dy, c=compiled, p=p: c(*t, p).backward(dy),
            })
        del t, dy


def cases(quick: bool = False):
    dtype = runtime.default_dtype()
    device = runtime.DEVICE
    for m, k, n in QUICK_SHAPES if quick else SHAPES:
        for kernel, activation, ref in (("linear", None, _torch_plain), ("linear_gelu", "gelu", _torch_gelu)):
            passes = ("fwd",) if quick else ("fwd", "fwdbwd")
            for pass_ in passes:
                x = torch.randn(m, k, device=device, dtype=dtype)
                w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
                b = torch.randn(n, device=device, dtype=dtype) if activation else None
                elt = x.element_size()
                flops = 2 * m * n * k
                # reads x and w, writes y (plus the bias, negligible)
                nbytes = elt * (m * k + n * k + m * n)
                compiled = torch.compile(ref, dynamic=False)
                if pass_ == "fwd":
                    yield Case(kernel, "fwd", [m, k, n], dtype, bytes=nbytes, flops=flops, providers={
                        "triton": lambda x=x, w=w, b=b, a=activation: linear(x, w, b, a),
                        "cublas": lambda x=x, w=w: torch.matmul(x, w.t()),
                        "torch": lambda x=x, w=w, b=b, ref=ref: ref(x, w, b),
                        "torch.compile": lambda x=x, w=w, b=b, c=compiled: c(x, w, b),
                    })
                else:
                    x.requires_grad_()
                    w.requires_grad_()
                    if b is not None:
                        b.requires_grad_()
                    dy = torch.randn(m, n, device=device, dtype=dtype)
                    # forward as above; backward reads dy, x, w and writes dx, dW
                    nbytes_fb = nbytes + elt * (m * n + 2 * m * k + 2 * n * k)
                    leaves = [t for t in (x, w, b) if t is not None]
                    yield Case(kernel, "fwdbwd", [m, k, n], dtype, bytes=nbytes_fb, flops=3 * flops,
                               grad_to_none=leaves, providers={
                                   "triton": lambda x=x, w=w, b=b, a=activation, dy=dy: linear(x, w, b, a).backward(dy),
                                   "cublas": lambda x=x, w=w, dy=dy: torch.matmul(x, w.t()).backward(dy),
                                   "torch": lambda x=x, w=w, b=b, dy=dy, ref=ref: ref(x, w, b).backward(dy),
                                   "torch.compile": lambda x=x, w=w, b=b, dy=dy, c=compiled: c(x, w, b).backward(dy),
                               })
                    del dy
                del x, w, b
    yield from _ff_cases(quick)
