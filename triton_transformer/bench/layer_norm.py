"""Layer norm benchmark cases: forward (inference) and forward+backward, the shapes of issue 3."""

import torch
import torch.nn.functional as F

from .. import runtime
from ..layernorm import layer_norm
from . import Case

#: GPT-2 small and a 768-wide model at 16K tokens, and a 4096-wide model at 8K tokens.
SHAPES = [(16384, 512), (16384, 768), (8192, 4096)]


def reference(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def cases(quick: bool = False):
    dtype = runtime.default_dtype()
    device = runtime.DEVICE
    for m, n in [(1024, 768)] if quick else SHAPES:
        compiled = torch.compile(reference, dynamic=False)
        x = torch.randn(m, n, device=device, dtype=dtype)
        w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
        b = (0.1 * torch.randn(n, device=device)).to(dtype)
        nbytes = x.numel() * x.element_size()
        params = 2 * w.numel() * w.element_size()
        # forward, nothing requires grad: read x, write y (and the N-wide weight and bias)
        yield Case("layer_norm", "fwd", [m, n], dtype, bytes=2 * nbytes + params, providers={
            "triton": lambda: layer_norm(x, (n,), w, b),
            "torch": lambda: reference(x, w, b),
            "torch.compile": lambda: compiled(x, w, b),
            "copy": lambda: x.clone(),  # x read and written once: the floor of any forward
        })
        # forward + backward: read x, write y; read x and dy, write dx; dweight and dbias are N wide
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        dy = torch.randn_like(x)
        yield Case("layer_norm", "fwdbwd", [m, n], dtype, bytes=5 * nbytes + 2 * params, grad_to_none=[xg, wg, bg],
                   providers={
                       "triton": lambda: layer_norm(xg, (n,), wg, bg).backward(dy),
                       "torch": lambda: reference(xg, wg, bg).backward(dy),
                       "torch.compile": lambda: compiled(xg, wg, bg).backward(dy),
                   })
        del x, xg, wg, bg, dy
