"""Dropout benchmark cases: forward and forward+backward on flat bf16 tensors, p = 0.5 (issue 4)."""

import torch
import torch.nn.functional as F

from .. import runtime
from ..dropout import dropout
from . import Case

SIZES = [1 << 22, 1 << 24, 1 << 26]   # 1 << 24 = 16 777 216: the row issue 4 asks for
P = 0.5


def cases(quick: bool = False):
    dtype = runtime.default_dtype()
    compiled = torch.compile(lambda t: F.dropout(t, P, training=True), dynamic=False)
    for n in [1 << 20] if quick else SIZES:
        x = torch.randn(n, device=runtime.DEVICE, dtype=dtype)
        nbytes = x.numel() * x.element_size()
        # Minimum traffic: read x, write y. PyTorch also writes a 1-byte mask (not counted: it is overhead).
        # Each triton call draws a fresh seed from torch's generator, as in training.
        yield Case("dropout", "fwd", [n], dtype, bytes=2 * nbytes, providers={
            "triton": lambda: dropout(x, P),
            "torch": lambda: F.dropout(x, P, training=True),
            "torch.compile": lambda: compiled(x),
            "copy": lambda: x.clone(),  # the same bytes read and written: the floor
        })
        # forward + backward: read x, write y; read dy, write dx (ours regenerates the mask, torch reads it)
        xg = x.clone().requires_grad_()
        dy = torch.randn_like(x)
        yield Case("dropout", "fwdbwd", [n], dtype, bytes=4 * nbytes, grad_to_none=[xg], providers={
            "triton": lambda: dropout(xg, P).backward(dy),
            "torch": lambda: F.dropout(xg, P, training=True).backward(dy),
            "torch.compile": lambda: compiled(xg).backward(dy),
        })
        del x, xg, dy
