"""Softmax benchmark cases: forward and forward+backward, the shapes of issue 2."""

import torch

from .. import runtime
from ..softmax import softmax
from . import Case

SHAPES = [(4096, 1024), (4096, 4096), (4096, 16384), (8192, 50304)]


def cases(quick: bool = False):
    dtype = runtime.default_dtype()
    compiled = torch.compile(lambda t: torch.softmax(t, dim=-1), dynamic=False)
    for m, n in SHAPES[1:2] if quick else SHAPES:
        x = torch.randn(m, n, device=runtime.DEVICE, dtype=dtype)
        nbytes = x.numel() * x.element_size()
        yield Case("softmax", "fwd", [m, n], dtype, bytes=2 * nbytes, providers={
            "triton": lambda: softmax(x),
            "torch": lambda: torch.softmax(x, dim=-1),
            "torch.compile": lambda: compiled(x),
            "copy": lambda: x.clone(),  # the same bytes read and written: what no softmax can beat
        })
        # forward + backward: read x, write y; read y and dy, write dx
        xg = x.clone().requires_grad_()
        dy = torch.randn_like(x)
        yield Case("softmax", "fwdbwd", [m, n], dtype, bytes=5 * nbytes, grad_to_none=[xg], providers={
            "triton": lambda: softmax(xg).backward(dy),
            "torch": lambda: torch.softmax(xg, dim=-1).backward(dy),
            "torch.compile": lambda: compiled(xg).backward(dy),
        })
        del x, xg, dy
